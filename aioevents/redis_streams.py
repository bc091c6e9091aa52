"""Events between processes on Redis Streams: `RedisStreams` and the `aioevents.streams` API.

::

    streams = Streams(RedisStreams("redis://localhost:6379/0"), partitions=None)
    externalize(web_bus, DocumentWasCreated, streams=streams)          # the web process
    consume(worker_bus, DocumentWasCreated, streams=streams)           # python -m aioevents worker

Redis 7.0 or later: consumer groups (``XREADGROUP``, ``XACK``), reclaiming (``XAUTOCLAIM``),
trimming by ``MINID`` behind the slowest group, leases with ``SET NX PX``. What each operation
does is the contract of `aioevents.streams.Transport`; see `aioevents.streams` for the rest.
"""

from __future__ import annotations

try:
    import msgspec  # noqa: F401
    import redis.asyncio  # noqa: F401
except ImportError as missing:  # a newcomer's first import: say which extra brings them
    raise ModuleNotFoundError(
        f"aioevents.redis_streams needs redis-py and msgspec ({missing}): install the extra "
        f"with pip install 'aioevents[redis]'",
        name=missing.name,
    ) from missing

from ._redis_streams import RedisStreams
from ._streams import Consumer, Streams, consume, current_entry, externalize
from ._streams_memory import MemoryStreams
from ._transport import DeadLetter, Entry, Envelope, GroupInfo, Transport, Trimmed

__all__ = [
    "Consumer",
    "DeadLetter",
    "Entry",
    "Envelope",
    "GroupInfo",
    "MemoryStreams",
    "RedisStreams",
    "Streams",
    "Transport",
    "Trimmed",
    "consume",
    "current_entry",
    "externalize",
]
