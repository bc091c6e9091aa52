"""Engines for the embedded default (SQLite) and for PostgreSQL, and schema creation."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, inspect
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from .models import Base

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///llm_platform.sqlite3"

SessionFactory = async_sessionmaker[AsyncSession]


# URL schemes without a driver, as libpq and most platforms write them, and the async driver
# the example installs for each: SQLAlchemy would pick a synchronous one (psycopg2, pysqlite).
_ASYNC_DRIVERS = {
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
}


def async_url(url: str | URL) -> URL:
    """``url`` with the example's async driver if it names none: ``postgresql://...`` and
    ``postgres://...`` use asyncpg, ``sqlite://...`` aiosqlite; a URL naming a driver is kept."""
    parsed = make_url(url)
    return parsed.set(drivername=_ASYNC_DRIVERS.get(parsed.drivername, parsed.drivername))


def create_engine(url: str | URL, *, search_path: str | None = None) -> AsyncEngine:
    """An engine for ``url`` (see `async_url`); ``search_path`` puts PostgreSQL tables in
    that schema."""
    parsed = async_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed)
    connect_args: dict[str, Any] = {}
    if search_path is not None:
        connect_args["server_settings"] = {"search_path": search_path}
    return create_async_engine(parsed, connect_args=connect_args)


def _sqlite_engine(url: URL) -> AsyncEngine:
    # Handlers run concurrently, each in its own transaction. SQLite's default deferred
    # transactions let two readers both try to upgrade to writers, and one then fails at once
    # with "database is locked"; BEGIN IMMEDIATE takes the write lock up front so writers
    # queue on the busy timeout instead.
    engine = create_async_engine(url, connect_args={"timeout": 30})
    event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
    event.listen(engine.sync_engine, "begin", _sqlite_begin_immediate)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, _record: object) -> None:
    dbapi_connection.isolation_level = None  # SQLAlchemy's begin event issues BEGIN itself
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def _sqlite_begin_immediate(connection: Connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def session_factory(engine: AsyncEngine) -> SessionFactory:
    # expire_on_commit=False: services read ids off rows after the commit that emits.
    return async_sessionmaker(engine, expire_on_commit=False)


class OutdatedSchema(RuntimeError):
    """Raised when the database holds tables of an earlier version of the example."""


async def create_schema(engine: AsyncEngine) -> None:
    """Create the tables that are missing; refuse tables that lack a column (the example has
    no migrations: a schema of an earlier version would fail later, in some handler)."""
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
        missing = await connection.run_sync(_missing_columns)
    if missing:
        raise OutdatedSchema(
            f"the tables are from an earlier version of the example, without {', '.join(missing)}:"
            " delete the SQLite file or drop the PostgreSQL schema, and run again"
        )


def _missing_columns(connection: Connection) -> list[str]:
    inspector = inspect(connection)
    missing = []
    for table in Base.metadata.sorted_tables:
        existing = {column["name"] for column in inspector.get_columns(table.name)}
        missing += [
            f"{table.name}.{column.name}" for column in table.columns if column.name not in existing
        ]
    return missing
