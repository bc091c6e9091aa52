"""The database URL: the forms a newcomer writes get the example's async drivers."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from examples.llm_platform.db import async_url, create_engine


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

    engine = create_engine(plain.render_as_string(hide_password=False))
    try:
        async with engine.connect() as connection:
            assert await connection.scalar(text("SELECT 1")) == 1
    finally:
        await engine.dispose()


@pytest.mark.asyncio
async def test_a_plain_sqlite_url_connects(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/plain.sqlite3")
    try:
        async with engine.connect() as connection:
            assert await connection.scalar(text("SELECT 1")) == 1
    finally:
        await engine.dispose()
