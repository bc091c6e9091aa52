"""The platform's write throttle: in memory on the embedded default, Redis when configured.

The Redis client is built for a fail-open throttle: a short socket timeout and no retries, so
a Redis that is down costs a handler one quick failed call, not redis-py's default retries
(seconds per call), before `aioevents.throttle.RedisThrottle` grants the claim anyway.
"""

from __future__ import annotations

from typing import Final

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from aioevents.throttle import Claim, FallbackCounter, MemoryThrottle, RedisThrottle, Throttle

SOCKET_TIMEOUT: Final = 0.25


class PlatformThrottle:
    """A `Throttle` and the Redis client it owns, if any: close it with `aclose`."""

    def __init__(self, throttle: Throttle, redis: Redis | None = None) -> None:
        self.throttle = throttle
        self._redis = redis

    @classmethod
    def memory(cls) -> PlatformThrottle:
        return cls(MemoryThrottle())

    @classmethod
    def redis(
        cls, url: str, *, prefix: str = "llm_platform:", warn_interval: float = 60.0
    ) -> PlatformThrottle:
        """Claims as keys ``{prefix}throttle:{key}`` on the Redis server at ``url``."""
        client = Redis.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        )
        counter = FallbackCounter("provider throttle", warn_interval=warn_interval)
        throttle = RedisThrottle(client, prefix=f"{prefix}throttle:", counter=counter)
        return cls(throttle, client)

    async def claim(self, key: str, window: float) -> Claim:
        return await self.throttle.claim(key, window)

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()


def open_throttle(redis_url: str | None, *, prefix: str = "llm_platform:") -> PlatformThrottle:
    """`MemoryThrottle` without a ``redis_url``, else `RedisThrottle` on a client of its own."""
    if redis_url is None:
        return PlatformThrottle.memory()
    return PlatformThrottle.redis(redis_url, prefix=prefix)
