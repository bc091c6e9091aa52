"""The key-value cache handlers use: Redis, or an in-memory dict on the embedded default."""

from __future__ import annotations

from typing import Protocol

from redis.asyncio import Redis


class Cache(Protocol):
    async def get(self, key: str) -> str | None: ...

    async def set(self, key: str, value: str) -> None: ...

    async def delete(self, *keys: str) -> int:
        """Delete ``keys``; return how many existed."""
        ...

    async def aclose(self) -> None: ...


class MemoryCache:
    """One process's cache: enough for the embedded default and tests."""

    def __init__(self) -> None:
        self._data: dict[str, str] = {}

    async def get(self, key: str) -> str | None:
        return self._data.get(key)

    async def set(self, key: str, value: str) -> None:
        self._data[key] = value

    async def delete(self, *keys: str) -> int:
        return sum(self._data.pop(key, None) is not None for key in keys)

    async def aclose(self) -> None:
        self._data.clear()


class RedisCache:
    """Redis, with every key under ``prefix`` so several platforms can share one server."""

    def __init__(self, url: str, *, prefix: str = "llm_platform:") -> None:
        self._redis: Redis = Redis.from_url(url, decode_responses=True)
        self._prefix = prefix

    async def get(self, key: str) -> str | None:
        value = await self._redis.get(self._prefix + key)
        return None if value is None else str(value)

    async def set(self, key: str, value: str) -> None:
        await self._redis.set(self._prefix + key, value)

    async def delete(self, *keys: str) -> int:
        if not keys:
            return 0
        deleted: int = await self._redis.delete(*(self._prefix + key for key in keys))
        return deleted

    async def aclose(self) -> None:
        await self._redis.aclose()


def open_cache(redis_url: str | None, *, prefix: str = "llm_platform:") -> Cache:
    return MemoryCache() if redis_url is None else RedisCache(redis_url, prefix=prefix)
