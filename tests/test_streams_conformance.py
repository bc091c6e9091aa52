"""The transport conformance kit (`aioevents.testing.TransportConformance`) on every transport.

Each class below only says how to make its transport; the tests are the kit's. The Redis one
runs on the shared Redis: every test has a stream prefix of its own, and the keys under it (and
the heartbeat keys of its groups) are deleted afterwards, nothing else.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from aioevents._streams_kit import TransportFactory
from aioevents.streams import MemoryStreams, Transport
from aioevents.testing import TransportConformance


class TestMemoryStreams(TransportConformance):
    @pytest.fixture
    def transport_factory(self) -> TransportFactory:
        def make(**options: Any) -> Transport:
            return MemoryStreams(**options)

        return make


@pytest.mark.redis
class TestRedisStreams(TransportConformance):
    @pytest.fixture
    async def transport_factory(
        self, redis_url: str, stream_prefix: str
    ) -> AsyncIterator[TransportFactory]:
        from redis.asyncio import Redis

        from aioevents.redis_streams import RedisStreams

        clients: list[Redis] = []

        def make(**options: Any) -> Transport:
            # The kit runs up to 50 consumers in one process on one transport, standing for
            # 50 processes with a pool each: its pool is sized for them (redis-py's default of
            # 100 connections is not: each consumer's blocking read holds one; kit.md #5).
            client = Redis.from_url(redis_url, max_connections=1_000)
            clients.append(client)
            return RedisStreams(client, **options)

        try:
            yield make
        finally:
            for client in clients:
                await client.aclose()
            await _delete_keys(redis_url, stream_prefix)


async def _delete_keys(redis_url: str, prefix: str) -> None:
    """Delete the test's keys: its streams, leases, and its groups' heartbeat sets."""
    from redis.asyncio import Redis

    from aioevents._redis_streams import HEARTBEATS

    async with Redis.from_url(redis_url) as client:
        for pattern in (f"{prefix}*", f"{HEARTBEATS}{prefix}*"):
            keys = [key async for key in client.scan_iter(match=pattern, count=1000)]
            if keys:
                await client.delete(*keys)
