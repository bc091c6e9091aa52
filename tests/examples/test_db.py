"""The database URL: the forms a newcomer writes get the example's async drivers."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from examples.llm_platform.db import OutdatedSchema, async_url, create_engine, create_schema


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://ann:secret@db:5432/app", "postgresql+asyncpg://ann:secret@db:5432/app"),
        ("postgres://ann@db/app?ssl=require", "postgresql+asyncpg://ann@db/app?ssl=require"),
        ("postgresql+asyncpg://ann@db/app", "postgresql+asyncpg://ann@db/app"),
        ("postgresql+psycopg://ann@db/app", "postgresql+psycopg://ann@db/app"),  # as chosen
        ("sqlite:///platform.sqlite3", "sqlite+aiosqlite:///platform.sqlite3"),
        ("sqlite+aiosqlite:///platform.sqlite3", "sqlite+aiosqlite:///platform.sqlite3"),
    ],
)
def test_a_url_without_a_driver_gets_the_async_one(url: str, expected: str) -> None:
    assert async_url(url).render_as_string(hide_password=False) == expected


@pytest.mark.asyncio
@pytest.mark.postgres
async def test_a_plain_postgresql_url_connects(database_url: str) -> None:
    # The form libpq, psql and most hosting platforms give, with no driver in it.
    plain = async_url(database_url).set(drivername="postgresql")
    assert plain.render_as_string(hide_password=False).startswith("postgresql://")

    assert await _answers(plain.render_as_string(hide_password=False))


@pytest.mark.asyncio
async def test_a_plain_sqlite_url_connects(tmp_path: Path) -> None:
    assert await _answers(f"sqlite:///{tmp_path}/plain.sqlite3")


async def _answers(url: str) -> bool:
    """True when the example's engine for ``url`` connects and runs a query."""
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            return bool(await connection.scalar(text("SELECT 1")) == 1)
    finally:
        await engine.dispose()


@pytest.mark.asyncio
async def test_tables_of_an_earlier_version_are_refused_with_what_to_do(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/old.sqlite3")
    old_plans = (  # as the example made it before plans had a next_run_at
        "CREATE TABLE workflow_schedule_plans (id VARCHAR(36) PRIMARY KEY, created_at DATETIME,"
        " tenant_id VARCHAR(36), app_id VARCHAR(36) UNIQUE, node_id VARCHAR(64),"
        " cron_expression VARCHAR(255), timezone VARCHAR(64))"
    )
    try:
        async with engine.begin() as connection:
            await connection.execute(text(old_plans))

        with pytest.raises(
            OutdatedSchema, match=r"without workflow_schedule_plans\.next_run_at: delete"
        ):
            await create_schema(engine)
    finally:
        await engine.dispose()


@pytest.mark.asyncio
async def test_creating_the_schema_twice_is_fine(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/twice.sqlite3")
    try:
        await create_schema(engine)
        await create_schema(engine)
    finally:
        await engine.dispose()
