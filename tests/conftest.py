"""Shared fixtures: the anyio backends for the core, and the real PostgreSQL and Redis.

Tests that need a server take ``database_url`` or ``redis_url``. When the server is down they
skip with the reason locally, and fail under ``CI=true``: a green CI run always exercised the
real services.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest
import pytest_asyncio

if TYPE_CHECKING:
    from .outbox_support import Database

DATABASE_URL = os.environ.get(
    "AIOEVENTS_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("AIOEVENTS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Core tests marked ``anyio`` run once on asyncio and once on trio."""
    return str(request.param)


def require_server(what: str, url: str, default_port: int) -> str:
    """Return ``url`` if its server accepts a connection; else skip, or fail under CI."""
    parts = urlsplit(url)
    address = (parts.hostname or "127.0.0.1", parts.port or default_port)
    try:
        socket.create_connection(address, timeout=2).close()
    except OSError as exc:
        message = f"{what} is not reachable at {address[0]}:{address[1]} ({exc})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must exercise the real service", pytrace=False)
        pytest.skip(message)
    return url


@pytest.fixture
def database_url() -> str:
    """The PostgreSQL URL (SQLAlchemy form, asyncpg driver) of the test database."""
    return require_server("PostgreSQL", DATABASE_URL, 5432)


@pytest.fixture
def redis_url() -> str:
    """The Redis URL of the test server."""
    return require_server("Redis", REDIS_URL, 6379)


@pytest.fixture(params=[pytest.param("postgresql", marks=pytest.mark.postgres), "sqlite"])
def database_kind(request: pytest.FixtureRequest) -> str:
    """The outbox's database: PostgreSQL, then SQLite."""
    return str(request.param)


@pytest_asyncio.fixture
async def db(
    database_kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Database]:
    """An outbox's tables on PostgreSQL (a schema of the test's own), then on SQLite (a file)."""
    from .outbox_support import open_database

    if database_kind == "postgresql":
        url = str(request.getfixturevalue("database_url"))
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'outbox.db'}"
    async with open_database(database_kind, url) as database:
        yield database
