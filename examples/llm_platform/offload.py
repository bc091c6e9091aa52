"""The heavy handlers in worker processes: their events travel through streams.

The heavy handlers are indexing a document and cleaning up after a deleted document or dataset
(`handlers.heavy_router`, events `handlers.HEAVY_EVENTS`). The original queues each of them as a
Celery task for its workers; here the web process externalizes their events instead of running
them (``app.open_platform(..., streams=...)``): a durable handler per event type,
``externalize:<event-name>``, that the outbox runs after the COMMIT and that completes once the
stream has the entry. So an event recorded is in the stream at least once.

A worker feeds the same handlers from the streams (`worker_bus`): one consumer group per handler,
named after it; an entry is acknowledged once its handler succeeded, retried as the durable
handlers are (`handlers.DURABLE`) and then moved to the dead-letter stream. As a process::

    REDIS_URL=redis://... DATABASE_URL=... \\
        python -m aioevents worker examples.llm_platform.worker:heavy_bus

(`STREAMS_PREFIX` names the streams, `STREAMS_PREFIX_DEFAULT` if unset; web process and workers
must agree on it.) It runs until SIGTERM or SIGINT, then finishes what it runs and leaves.

The ledger is the demo's instrument (``--workers``, see `workers_demo`): a hook that writes every
successful run of a worker's handler, with the worker's consumer name and pid, before its entry
is acknowledged. An entry acknowledged is in it; one run again (its worker died before the
acknowledgement) is in it twice. Worker processes append to a file (`HANDLED_LEDGER`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from aioevents import EventBus, Hook, Subscription
from aioevents.streams import Consumer, Entry, MemoryStreams, Streams, consume, current_entry

from . import handlers
from .deps import Deps

__all__ = [
    "STREAMS_PREFIX_DEFAULT",
    "FileLedger",
    "Handled",
    "Ledger",
    "LedgerHook",
    "MemoryLedger",
    "open_streams",
    "worker_bus",
]

STREAMS_PREFIX_DEFAULT = "llm-platform"


def open_streams(redis_url: str | None, prefix: str) -> Streams:
    """The streams on Redis at ``redis_url``, or in memory (one process only) without it."""
    if redis_url is None:
        return Streams(MemoryStreams(), prefix=prefix)
    from aioevents.redis_streams import RedisStreams  # only here: the embedded demo needs no redis

    return Streams(RedisStreams(redis_url), prefix=prefix)


def worker_bus(
    deps: Deps, streams: Streams, *, hooks: Iterable[Hook] = (), ledger: Ledger | None = None
) -> tuple[EventBus, Consumer]:
    """A bus with the heavy handlers fed from ``streams`` while it runs, and its consumer."""
    bus = EventBus(hooks=hooks)
    bus.include(handlers.heavy_router(deps, durable=False))
    policy = handlers.DURABLE
    consumer = consume(
        bus,
        *handlers.HEAVY_EVENTS,
        streams=streams,
        max_deliveries=policy.max_attempts,
        wait_initial=policy.wait_initial,
        wait_max=policy.wait_max,
        wait_jitter=policy.wait_jitter,
    )
    if ledger is not None:
        bus.add_hook(LedgerHook(ledger, consumer.name))
    return bus, consumer


# -- the ledger ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Handled:
    """One successful run of a worker's handler, for one stream entry."""

    event: str  # the event's name
    event_id: str  # the outbox's event id, which the envelope carries
    handler: str
    consumer: str  # the worker's name in its consumer groups
    pid: int
    stream: str
    entry: str  # the entry's id in the stream
    deliveries: int  # 1 when the entry was run for the first time


class Ledger(Protocol):
    def write(self, handled: Handled) -> None: ...

    def read(self) -> list[Handled]: ...


class MemoryLedger:
    """The ledger of workers in this process."""

    def __init__(self) -> None:
        self._records: list[Handled] = []

    def write(self, handled: Handled) -> None:
        self._records.append(handled)

    def read(self) -> list[Handled]:
        return list(self._records)


class FileLedger:
    """A file every worker process appends to, a JSON line per record.

    Each line is one ``write`` to a descriptor opened with ``O_APPEND``: lines of several
    processes never interleave, and a line written stays even if its process is killed.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def write(self, handled: Handled) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(self._fd, (json.dumps(asdict(handled)) + "\n").encode())

    def read(self) -> list[Handled]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        lines = text.split("\n")[:-1]  # a last line without its newline is not written yet
        return [Handled(**json.loads(line)) for line in lines]


class LedgerHook:
    """Writes each successful run of a handler fed from a stream to the ledger (a hook: the
    handlers stay as they are)."""

    def __init__(self, ledger: Ledger, consumer: str) -> None:
        self.ledger = ledger
        self.consumer = consumer

    def handler_started(self, event: object, subscription: Subscription) -> object:
        return current_entry()

    def handler_finished(
        self,
        event: object,
        subscription: Subscription,
        *,
        token: object,
        duration: float,
        error: BaseException | None,
    ) -> None:
        if error is not None or not isinstance(token, Entry):
            return  # failed (the entry stays pending, to be run again), or not from a stream
        self.ledger.write(
            Handled(
                token.envelope.name,
                token.envelope.id,
                subscription.name,
                self.consumer,
                os.getpid(),
                token.stream,
                token.id,
                token.deliveries,
            )
        )
