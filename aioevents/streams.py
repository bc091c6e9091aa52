"""Events between processes: streams with consumer groups, dead letters and workers.

The web process publishes events to streams; worker processes (or other services) feed their
handlers from them, each handler a consumer group that acknowledges on its own::

    streams = Streams(RedisStreams("redis://localhost"))     # or MemoryStreams() in one process

    # the producing process: a durable handler that appends each recorded event to its stream
    externalize(bus, DocumentWasCreated, streams=streams)

    # a worker process: this bus's handlers of DocumentWasCreated, fed from the stream
    consume(worker_bus, DocumentWasCreated, streams=streams, concurrency=16)
    # python -m aioevents worker myapp.worker:worker_bus

An entry is acknowledged once its handler succeeded, retried with backoff while it fails, and
moved to the dead-letter stream after ``max_deliveries``. Entries a dead consumer left pending
are reclaimed after ``min_idle``; streams are trimmed behind the slowest group. With
``Streams(..., partitions=N)`` events with one key are handled in order, one at a time.
"""

from __future__ import annotations

try:
    import msgspec  # noqa: F401
except ImportError as missing:  # a newcomer's first import: say which extra brings it
    raise ModuleNotFoundError(
        f"aioevents.streams needs msgspec ({missing}): install the extra with "
        f"pip install 'aioevents[streams]'",
        name=missing.name,
    ) from missing

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
    "Streams",
    "Transport",
    "Trimmed",
    "consume",
    "current_entry",
    "externalize",
]
