"""Events between processes: published to streams, handled by consumer groups elsewhere.

The producing side is one durable handler per event type (`externalize`): the outbox runs it
at least once per recorded event, and it completes only once the transport has the envelope.
The consuming side (`consume`) feeds a bus's handlers from the streams, one consumer group per
handler, so each acknowledges on its own: an entry is acknowledged after its handler's
isolated run succeeded, retried with backoff while it fails (it stays pending, counted as one
more delivery each time), and moved to a dead-letter stream after ``max_deliveries``.

Pending entries of a consumer that died are reclaimed once idle for ``min_idle``; the running
consumer keeps its own in-flight entries fresh meanwhile, so a long handler is not taken from
it. Streams are trimmed behind the slowest group (`Transport.trim`). With ``partitions`` a
stream is split by key into partition streams, each handled in order by one consumer of a
group at a time: the holder of its lease, which moves to a live consumer when the holder dies.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import secrets
import socket
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar, copy_context
from dataclasses import dataclass, field, replace
from typing import Any, Self, TypeVar

import anyio

from ._bus import EventBus
from ._checks import check_positive_int, check_seconds
from ._codec import Codec, uuid7
from ._delivery import current_delivery
from ._dispatch import record_stray_cancellation, run_in_context, run_to_the_end
from ._exceptions import ConfigurationError
from ._names import event_name, event_version
from ._result import HandlerError
from ._sending import send_hooks, start_sends
from ._subscription import Subscription
from ._transport import DeadLetter, Entry, Envelope, GroupInfo, Transport

__all__ = ["Consumer", "Streams", "consume", "consuming", "current_entry", "externalize"]

logger = logging.getLogger("aioevents.streams")
T = TypeVar("T")

_ENTRY_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
_ENTRY_ID_PART_MAX = 2**64 - 1  # each part of an entry id is an unsigned 64-bit integer
_EXTERNALIZE = "externalize:"  # the name prefix of the producing handlers: never fed back
_RETRY_MIN, _RETRY_MAX = 0.05, 2.0  # seconds between attempts to reach the transport
_TRIM_EVERY = 5.0  # seconds between trims of a consumer's streams
_READ_AHEAD_IN_ORDER = 10  # entries a partition's holder reads at once: it runs them all
_STOP_TRIES = 5  # attempts at the final writes of a stop when the transport is unreachable
_FINAL_WRITES = 5.0  # seconds a stop gives its last writes (acks, leaving) at most

_current: ContextVar[Entry | None] = ContextVar("aioevents_entry", default=None)
# (group, transport's system) of the entry in _current: for tracing hooks, see consuming()
_consuming: ContextVar[tuple[str, str] | None] = ContextVar("aioevents_consuming", default=None)


def current_entry() -> Entry | None:
    """The stream entry the calling handler runs for (its envelope, headers, deliveries);
    None outside a handler fed by `consume`."""
    return _current.get()


def consuming() -> tuple[str, str] | None:
    """The group (handler name) and transport system `current_entry` is run for: a handler
    emitting events from there sees the entry too, but does not run for it."""
    return _consuming.get()


class Streams:
    """The streams a set of processes share: a transport and how events map onto it.

    Producers and consumers must agree on ``prefix`` and ``partitions``: build both sides
    from one module. ``partitions=None`` makes one stream per event type, whose entries any
    consumer of a group takes (no order); ``partitions=N`` splits it into N streams by the
    key's hash (the event id's when it has none), each handled in order.

    ``hooks`` are send hooks (such as `aioevents.otel.Tracing`) told of every `publish`;
    ``externalize`` also tells its bus's hooks.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        prefix: str = "aioevents",
        partitions: int | None = None,
        codec: Codec | None = None,
        hooks: Iterable[object] = (),
    ) -> None:
        if not isinstance(transport, Transport):
            raise TypeError(f"transport must be a Transport, got {transport!r}")
        if type(prefix) is not str or not prefix:
            raise TypeError(f"prefix must be a non-empty str, got {prefix!r}")
        if partitions is not None:
            check_positive_int("partitions", partitions)
        if codec is not None and not isinstance(codec, Codec):
            raise TypeError(f"codec must be an aioevents.outbox.Codec, got {codec!r}")
        self.transport = transport
        self.prefix = prefix
        self.partitions = partitions
        self.codec = Codec() if codec is None else codec
        self.hooks = _checked_send_hooks(hooks)

    def __repr__(self) -> str:
        return f"Streams({self.transport!r}, prefix={self.prefix!r}, partitions={self.partitions})"

    def stream(self, event_type: type) -> str:
        """The stream of an event type: ``"<prefix>:<event-name>"``."""
        return f"{self.prefix}:{event_name(event_type)}"

    def partition_streams(self, event_type: type) -> list[str]:
        """The streams entries of the type are in: the stream, or its partitions."""
        stream = self.stream(event_type)
        if self.partitions is None:
            return [stream]
        return [f"{stream}:{p}" for p in range(self.partitions)]

    def dead_stream(self, event_type: type) -> str:
        """Where entries of the type go that a group gave up on."""
        return f"{self.stream(event_type)}:dead"

    async def publish(
        self,
        event: object,
        *,
        as_type: type | None = None,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        event_id: str | None = None,
    ) -> str:
        """Append ``event`` to its stream (``as_type``'s, by default its own type's); return
        the entry id once the transport has it. Not transactional: see `externalize`."""
        return await self._publish(event, as_type, key, headers, event_id, self.hooks)

    async def _publish(
        self,
        event: object,
        as_type: type | None,
        key: str | None,
        headers: Mapping[str, str] | None,
        event_id: str | None,
        hooks: Iterable[object],
    ) -> str:
        if isinstance(event, type):
            raise TypeError(f"publish() takes an event, not the class {event.__name__}")
        event_type = type(event) if as_type is None else as_type
        if not isinstance(event, event_type):
            raise TypeError(f"{event!r} is not a {event_type.__name__}")
        if key is not None and type(key) is not str:
            raise TypeError(f"key must be a str or None, got {key!r}")
        if event_id is not None and type(event_id) is not str:
            raise TypeError(f"event_id must be a str or None, got {event_id!r}")
        headers = _checked_headers(headers)
        self.codec.register(event_type)
        event_id = str(uuid7()) if event_id is None else event_id
        stream = self._stream_for(event_type, event_id if key is None else key)
        with start_sends(
            send_hooks(hooks),
            event,
            system=self.transport.system,
            destination=stream,
            message_id=event_id,
            headers=headers,  # what the hooks add (a trace context) goes in the envelope
        ):
            envelope = Envelope(
                id=event_id,
                name=event_name(event),
                version=event_version(type(event)),
                payload=self.codec.encode(event),
                key=key,
                headers=headers,
            )
            return await self.transport.publish(stream, envelope)

    def _stream_for(self, event_type: type, routing: str) -> str:
        stream = self.stream(event_type)
        if self.partitions is None:
            return stream
        return f"{stream}:{zlib.crc32(routing.encode()) % self.partitions}"

    async def groups(self, *event_types: type) -> list[GroupInfo]:
        """Every group of the event types' streams, with its lag and pending entries."""
        found: list[GroupInfo] = []
        for event_type in event_types:
            for stream in self.partition_streams(event_type):
                found.extend(await self.transport.groups(stream))
        return found

    async def dead_letters(self, event_type: type, *, count: int = 100) -> list[DeadLetter]:
        """The oldest ``count`` entries of the type that a group gave up on."""
        return await self.transport.dead_letters(self.dead_stream(event_type), count=count)

    async def retry_dead_letters(self, event_type: type, ids: Sequence[str]) -> int:
        """Publish these dead letters of the type again, to the streams they came from, and
        remove them from its dead-letter stream; return how many (only letters still there:
        a retry sent twice publishes once). Every group of the stream sees them again.
        An id not of the form `dead_letters` gives (``"<ms>-<seq>"``, each part at most
        2**64-1) is a ValueError naming it, before the transport is asked."""
        return await self.transport.redrive(self.dead_stream(event_type), _dead_ids(ids))

    async def discard_dead_letters(self, event_type: type, ids: Sequence[str]) -> int:
        """Remove these dead letters of the type; return how many were there."""
        return await self.transport.remove_dead_letters(
            self.dead_stream(event_type), _dead_ids(ids)
        )


def _dead_ids(ids: object) -> list[str]:
    """Dead letters' ids, as `dead_letters` gives them (``"<ms>-<seq>"``)."""
    if isinstance(ids, str) or not isinstance(ids, Sequence):
        raise TypeError(f"dead letter ids are a sequence of str, got {ids!r}")
    for dead_id in ids:
        if type(dead_id) is not str or not _ENTRY_ID.fullmatch(dead_id):
            raise ValueError(f"a dead letter id looks like '1700000000000-0', got {dead_id!r}")
        if any(int(part) > _ENTRY_ID_PART_MAX for part in dead_id.split("-")):
            # 20 digits pass the pattern yet may exceed what Redis takes ("Invalid stream ID")
            raise ValueError(f"a dead letter id's parts are at most 2**64-1, got {dead_id!r}")
    return list(ids)


def externalize(
    bus: EventBus, *event_types: type, streams: Streams, durable: object = True
) -> tuple[Subscription, ...]:
    """Publish events of each type to its stream, through a durable handler of the bus.

    The handler is named ``"externalize:<event-name>"``. Recorded in a transaction (see
    `aioevents.outbox`), an event reaches the stream at least once whatever fails when, with
    the outbox's event id, key and headers; the handler completes only once the transport has
    the entry, and is retried (``durable``'s policy) while the transport cannot be reached.
    """
    if not isinstance(streams, Streams):
        raise TypeError(f"streams must be a Streams, got {streams!r}")
    if not event_types:
        raise TypeError("externalize() needs at least one event type")
    subs = []
    for event_type in event_types:
        if not isinstance(event_type, type):
            raise TypeError(f"externalize() takes event classes, got {event_type!r}")
        streams.codec.register(event_type)
        subs.append(
            bus.subscribe(
                event_type,
                _forwarder(bus, streams, event_type),
                name=f"{_EXTERNALIZE}{event_name(event_type)}",
                durable=durable,  # type: ignore[arg-type]  # checked by the bus
            )
        )
    return tuple(subs)


def _forwarder(
    bus: EventBus, streams: Streams, event_type: type
) -> Callable[[Any], Awaitable[None]]:
    async def forward(event: Any) -> None:
        # The bus's send hooks and the streams' own (a hook given to both is told once).
        hooks = (*bus._hooks, *streams.hooks)
        delivery = current_delivery()
        if delivery is None:  # emitted, not recorded: a new id, no key
            await streams._publish(event, event_type, None, None, None, hooks)
            return
        # The outbox's headers go on; a send hook replaces the trace context among them.
        await streams._publish(
            event, event_type, delivery.key, delivery.headers, str(delivery.event_id), hooks
        )

    return forward


def consume(
    bus: EventBus,
    *event_types: type,
    streams: Streams,
    concurrency: int = 16,
    min_idle: float = 30.0,
    max_deliveries: int = 5,
    wait_initial: float = 0.5,
    wait_max: float = 30.0,
    wait_jitter: float = 0.5,
    drain_timeout: float = 30.0,
    handlers: Iterable[str] | None = None,
    batch_size: int = 100,
    block: float = 2.0,
) -> Consumer:
    """Feed the bus's handlers of these event types from their streams while the bus runs.

    Each handler (by its name; ``handlers`` to pick some) is a consumer group of each stream;
    this process is one consumer in every group, named `Consumer.name`. At most
    ``concurrency`` handlers run at once. See `Consumer` for what happens to an entry.
    """
    consumer = Consumer(
        bus,
        streams,
        event_types,
        concurrency=concurrency,
        min_idle=min_idle,
        max_deliveries=max_deliveries,
        wait_initial=wait_initial,
        wait_max=wait_max,
        wait_jitter=wait_jitter,
        drain_timeout=drain_timeout,
        handlers=handlers,
        batch_size=batch_size,
        block=block,
    )
    bus._attach(lambda: consumer)
    return consumer


@dataclass(eq=False)
class _Feed:
    """One handler fed from one event type's streams: a consumer group of each."""

    event_type: type
    sub: Subscription
    streams: list[str]
    dead_stream: str
    heartbeat_key: str  # where the group's live consumers are listed (partitioned only)

    @property
    def group(self) -> str:
        return self.sub.name


@dataclass(eq=False)
class _Holder:
    """A partition this consumer holds the lease of, and the task that handles it."""

    partition: int
    expires: float  # time.monotonic() when the lease runs out unless renewed
    active: bool = True  # False: handle no further entry, then give the lease back
    lost: bool = False  # the lease ran out and another consumer took it

    def holds(self) -> bool:
        """Whether the lease is still this consumer's: not taken, and not run out here
        (a renewal that failed or hangs must not let two holders run one partition)."""
        return not self.lost and time.monotonic() < self.expires

    reading: anyio.CancelScope = field(default_factory=anyio.CancelScope)


class Consumer:
    """A bus's handlers fed from streams: made by `consume`, run while the bus runs.

    An entry is decoded and handed to the handler in an isolated run (its own timeout and
    retry policies apply). Success: acknowledged. Failure: left pending, run again after a
    backoff as one more delivery; after ``max_deliveries`` it goes to the dead-letter stream
    with the reason and the handler's name, acknowledged. An entry that cannot be decoded
    goes there at once. Stopping, the consumer reads no more, lets running handlers finish
    within ``drain_timeout`` (those cut short stay pending, for another consumer), writes
    every acknowledgement, gives up its leases and leaves its groups.
    """

    def __init__(
        self,
        bus: EventBus,
        streams: Streams,
        event_types: Sequence[type],
        *,
        concurrency: int = 16,
        min_idle: float = 30.0,
        max_deliveries: int = 5,
        wait_initial: float = 0.5,
        wait_max: float = 30.0,
        wait_jitter: float = 0.5,
        drain_timeout: float = 30.0,
        handlers: Iterable[str] | None = None,
        batch_size: int = 100,
        block: float = 2.0,
    ) -> None:
        if not isinstance(bus, EventBus):
            raise TypeError(f"bus must be an EventBus, got {bus!r}")
        if not isinstance(streams, Streams):
            raise TypeError(f"streams must be a Streams, got {streams!r}")
        if not event_types:
            raise TypeError("consume() needs at least one event type")
        for event_type in event_types:
            if not isinstance(event_type, type):
                raise TypeError(f"consume() takes event classes, got {event_type!r}")
        for name, value in (("concurrency", concurrency), ("max_deliveries", max_deliveries)):
            check_positive_int(name, value)
        check_positive_int("batch_size", batch_size)
        check_seconds("min_idle", min_idle)
        check_seconds("drain_timeout", drain_timeout, zero=True)
        check_seconds("block", block)  # 0 would make every idle reader spin
        for name, seconds in (("wait_initial", wait_initial), ("wait_max", wait_max)):
            check_seconds(name, seconds, zero=True)
        check_seconds("wait_jitter", wait_jitter, zero=True)
        if isinstance(handlers, str):
            raise TypeError("handlers takes an iterable of handler names, not one str")
        if handlers is not None:
            handlers = list(handlers)
            if not all(type(name) is str for name in handlers):
                raise TypeError(f"handlers takes handler names (str), got {handlers!r}")
        self.bus = bus
        self.streams = streams
        self.event_types = tuple(event_types)
        self.handlers = None if handlers is None else frozenset(handlers)
        self.name = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.concurrency = concurrency
        self.min_idle = min_idle
        self.max_deliveries = max_deliveries
        self.drain_timeout = drain_timeout
        self.batch_size = batch_size
        self.block = block
        self._wait = (wait_initial, wait_max, wait_jitter)
        for event_type in self.event_types:
            streams.codec.register(event_type)
        self._feeds: list[_Feed] = []
        self._reset()

    def _reset(self) -> None:
        self._accepting = False
        self._stopping = anyio.Event()
        # Entries this consumer holds, read and not yet done: queued or running.
        self._in_flight: set[tuple[str, str, str]] = set()
        self._queue: deque[tuple[_Feed, Entry]] = deque()
        self._workers_left = 0
        self._room, self._work, self._done = _Signal(), _Signal(), _Signal()
        self._acks: dict[tuple[str, str], list[str]] = {}
        self._ack_wanted = anyio.Event()
        self._holders: dict[tuple[str, int], _Holder] = {}
        self._group: Any = None
        self._jobs: Any = None
        self._fatal: BaseException | None = None

    def __repr__(self) -> str:
        names = ", ".join(event_name(t) for t in self.event_types)
        return f"<Consumer {self.name} of {names} running={len(self._in_flight)}>"

    async def groups(self) -> list[GroupInfo]:
        """The lag and pending entries of this consumer's groups, on every stream."""
        wanted = {feed.group for feed in self._feeds or self._find_feeds()}
        found: list[GroupInfo] = []
        for event_type in self.event_types:
            for stream in self.streams.partition_streams(event_type):
                infos = await self.streams.transport.groups(stream)
                found.extend(info for info in infos if info.group in wanted)
        return found

    # -- which handlers, which streams ---------------------------------------------------------

    def _find_feeds(self) -> list[_Feed]:
        feeds = []
        for event_type in self.event_types:
            for sub in self.bus.subscriptions:
                related = issubclass(event_type, sub.event_type) or issubclass(
                    sub.event_type, event_type
                )
                wanted = self.handlers is None or sub.name in self.handlers
                if related and wanted and not _is_forwarder(sub):
                    stream = self.streams.stream(event_type)
                    feeds.append(
                        _Feed(
                            event_type,
                            sub,
                            self.streams.partition_streams(event_type),
                            self.streams.dead_stream(event_type),
                            f"{stream}:consumers:{sub.name}",
                        )
                    )
        _check_feeds(feeds, self.bus)
        missing = set(self.handlers or ()) - {feed.group for feed in feeds}
        if missing:
            raise ConfigurationError(
                f"no handler named {', '.join(sorted(missing))} for "
                f"{', '.join(t.__name__ for t in self.event_types)} on {self.bus!r}"
            )
        return feeds

    # -- running -------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._reset()
        self._feeds = self._find_feeds()
        if not self._feeds:
            logger.warning("%r: no handlers on the bus for its event types: reads nothing", self)
        self._accepting = True
        self._readers = anyio.CancelScope(shield=True)
        self._workers = anyio.CancelScope(shield=True)  # handlers and partition holders
        self._services = anyio.CancelScope(shield=True)
        self._services_done = anyio.Event()
        self._group = anyio.create_task_group()
        # No await from here on: a cancellation must not leave the task group half entered.
        await self._group.__aenter__()
        self._group.start_soon(self._run_workers)  # which starts the readers
        self._group.start_soon(self._run_services)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await run_to_the_end(self._stop(), what="the stream consumer's stop")
        finally:
            for scope in (self._readers, self._workers, self._services):
                scope.cancel()
            await self._group.__aexit__(None, None, None)
        if self._fatal is not None:  # a handler's KeyboardInterrupt and the like, as itself
            raise self._fatal

    async def _run_workers(self) -> None:
        with self._workers:
            async with anyio.create_task_group() as self._jobs:
                if self.streams.partitions is None:  # partitions have a holder each instead
                    self._workers_left = self.concurrency
                    for _ in range(self.concurrency):
                        self._jobs.start_soon(self._work_loop)
                self._group.start_soon(self._run_readers)  # holders start in self._jobs
                await self._stopping.wait()  # then waits for the handlers still running

    async def _run_readers(self) -> None:
        with self._readers:
            async with anyio.create_task_group() as readers:
                for feed in self._feeds:
                    reader = (
                        self._read_loop if self.streams.partitions is None else self._lease_loop
                    )
                    readers.start_soon(reader, feed)

    async def _run_services(self) -> None:
        try:
            with self._services:
                await self._services_running()
        finally:
            self._services_done.set()

    async def _services_running(self) -> None:
        async with anyio.create_task_group() as services:
            services.start_soon(self._ack_loop)
            services.start_soon(self._keep_loop)
            services.start_soon(self._trim_loop)
            if self.streams.partitions is None:
                services.start_soon(self._claim_loop)
            else:
                services.start_soon(self._renew_loop)

    def _begin_stop(self) -> None:
        """Read and claim nothing more; what was read is run (within the drain timeout)."""
        self._accepting = False
        self._stopping.set()
        self._readers.cancel()
        for holder in self._holders.values():
            holder.active = False
            holder.reading.cancel()
        self._work.notify()
        self._room.notify()

    def _give_up_queue(self) -> None:
        # Read but not started: left pending, for the next consumer (one delivery more).
        self._in_flight.difference_update(_slot(feed, entry) for feed, entry in self._queue)
        self._queue.clear()
        self._done.notify()

    def _crash(self, error: BaseException) -> None:
        """A handler raised a BaseException (not a cancellation): stop, and raise it from
        `__aexit__`, as the bus does with its background handlers'."""
        if self._fatal is None:
            self._fatal = error
            logger.critical("%r stops: a handler raised %r", self, error)
        self._begin_stop()
        self._give_up_queue()

    async def _stop(self) -> None:
        self._begin_stop()
        with anyio.move_on_after(self.drain_timeout):
            await self._drained()
        if self._in_flight or self._holders:
            logger.warning(
                "%r: %d handler(s) still running after %ss: cancelled, their entries left "
                "pending for another consumer",
                self,
                len(self._in_flight),
                self.drain_timeout,
            )
            self._workers.cancel()
            self._give_up_queue()
            await self._drained()
        self._services.cancel()
        # Bounded: a Redis that does not answer (stopped, a network gone) must not hold the
        # stop forever; what is not written is redelivered, at least once.
        with anyio.move_on_after(_FINAL_WRITES):
            await self._services_done.wait()  # an acknowledgement it was writing is in _acks
            await self._flush_acks(tries=_STOP_TRIES)
            await self._leave()

    async def _drained(self) -> None:
        while self._in_flight or self._holders or self._workers_left:
            await self._done.wait()

    async def _leave(self) -> None:
        transport = self.streams.transport
        for feed in self._feeds:
            for stream in feed.streams:
                await self._try(transport.remove_consumer(stream, feed.group, self.name))
            if self.streams.partitions is not None:
                await self._try(transport.leave(feed.heartbeat_key, self.name))

    async def _try(self, call: Awaitable[object]) -> None:
        try:
            await call
        except Exception as exc:
            logger.warning("%r: %r (carrying on)", self, exc)

    # -- reading (no partitions: any consumer takes any entry) ---------------------------------

    async def _read_loop(self, feed: _Feed) -> None:
        transport = self.streams.transport
        for stream in feed.streams:
            await self._retrying(transport.create_group, stream, feed.group)
        while True:
            while self._room_left() <= 0:
                await self._room.wait()
            room = min(self.batch_size, self._room_left())
            entries = await self._retrying(
                transport.read_new,
                feed.streams,
                feed.group,
                self.name,
                count=room,
                block=self.block,
            )
            for entry in entries:
                self._start(feed, entry)

    async def _claim_loop(self) -> None:
        """Take over what dead consumers left pending, and remove them once it is taken."""
        transport = self.streams.transport
        while self._accepting:  # not while a stop drains: it would start new handlers
            await anyio.sleep(self.min_idle / 2)
            for feed in self._feeds:
                for stream in feed.streams:
                    room = self._room_left()
                    try:
                        if room > 0:
                            entries, gone = await transport.claim_idle(
                                stream, feed.group, self.name, min_idle=self.min_idle, count=room
                            )
                            _report_gone(stream, feed.group, gone)
                            for entry in entries:
                                self._start(feed, entry)
                        await transport.remove_idle_consumers(
                            stream, feed.group, idle=self.min_idle, keep=self.name
                        )
                    except Exception as exc:
                        logger.warning("%r: claiming idle entries failed: %r", self, exc)

    def _room_left(self) -> int:
        # A batch besides the running handlers: the next read overlaps the work on the last
        # one, so workers do not wait for a round trip while entries are there.
        return self.concurrency + self.batch_size - len(self._in_flight)

    def _start(self, feed: _Feed, entry: Entry) -> None:
        slot = _slot(feed, entry)
        if slot in self._in_flight or not self._accepting:
            return  # reclaimed while it still runs here; or got as a stop began: left pending
        self._in_flight.add(slot)
        self._queue.append((feed, entry))
        self._work.notify()

    async def _work_loop(self) -> None:
        try:
            while True:
                while not self._queue:
                    if not self._accepting:
                        return  # what was read is run first, even when stopping
                    await self._work.wait()
                feed, entry = self._queue.popleft()
                try:
                    await self._deliver(feed, entry)
                except anyio.get_cancelled_exc_class():
                    raise
                except BaseException as exc:  # KeyboardInterrupt and the like: stays pending
                    self._crash(exc)
                    return
                finally:
                    self._in_flight.discard(_slot(feed, entry))
                    self._room.notify()
                    self._done.notify()
        finally:
            self._workers_left -= 1
            self._done.notify()

    # -- reading (partitions: one holder per partition and group, in order) --------------------

    async def _lease_loop(self, feed: _Feed) -> None:
        """Hold a fair share of the partitions, renewing their leases; take free ones."""
        transport = self.streams.transport
        partitions = len(feed.streams)
        for stream in feed.streams:
            await self._retrying(transport.create_group, stream, feed.group)
        while True:
            try:
                live = await transport.heartbeat(feed.heartbeat_key, self.name, self.min_idle)
                share = math.ceil(partitions / max(1, len(live)))
                self._shed(feed, share)
                first = live.index(self.name) * share if self.name in live else 0
                for offset in range(partitions):
                    held = sum(key[0] == feed.group for key in self._holders)
                    if held >= share:
                        break
                    await self._take(feed, (first + offset) % partitions)
                for group, partition in list(self._holders):
                    if group == feed.group:  # dead holders of ours go, once left idle enough
                        await transport.remove_idle_consumers(
                            feed.streams[partition], group, idle=self.min_idle, keep=self.name
                        )
            except Exception as exc:
                logger.warning("%r: taking partitions failed: %r", self, exc)
            await anyio.sleep(self.min_idle / 3)

    def _lease(self, feed: _Feed, partition: int) -> str:
        return f"{feed.streams[partition]}:lease:{feed.group}"

    async def _renew_loop(self) -> None:
        """Renew the leases of the partitions held, until the last holder is done: a
        service, so it goes on while a stop drains them."""
        feeds = {feed.group: feed for feed in self._feeds}
        while True:
            await anyio.sleep(self.min_idle / 3)
            try:
                for (group, partition), holder in list(self._holders.items()):
                    if not holder.lost:  # one being given back too, until it is done
                        await self._renew(feeds[group], partition, holder)
            except Exception as exc:
                logger.warning("%r: renewing partition leases failed: %r", self, exc)

    async def _renew(self, feed: _Feed, partition: int, holder: _Holder) -> None:
        lease, asked = self._lease(feed, partition), time.monotonic()
        if await self.streams.transport.acquire_lease(lease, self.name, self.min_idle):
            holder.expires = asked + self.min_idle
        else:
            logger.warning("%r lost partition %d of %s", self, partition, feed.group)
            holder.active, holder.lost = False, True
            holder.reading.cancel()
            self._room.notify()

    def _shed(self, feed: _Feed, share: int) -> None:
        """Give back partitions beyond a fair share, once their current entry is done."""
        mine = sorted(p for (group, p) in self._holders if group == feed.group)
        for partition in mine[share:]:
            holder = self._holders[(feed.group, partition)]
            holder.active = False
            holder.reading.cancel()

    async def _take(self, feed: _Feed, partition: int) -> None:
        if (feed.group, partition) in self._holders or not self._accepting:
            return
        asked = time.monotonic()  # the lease runs from about now: a safe lower bound
        if await self.streams.transport.acquire_lease(
            self._lease(feed, partition), self.name, self.min_idle
        ):
            holder = _Holder(partition, asked + self.min_idle)
            self._holders[(feed.group, partition)] = holder
            self._jobs.start_soon(self._hold, feed, holder)

    async def _hold(self, feed: _Feed, holder: _Holder) -> None:
        try:
            await self._handle_partition(feed, holder)
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as exc:  # a handler's KeyboardInterrupt and the like
            self._crash(exc)
        finally:
            if not holder.lost:  # free it for the next holder now
                lease = self._lease(feed, holder.partition)
                with anyio.move_on_after(_FINAL_WRITES, shield=True):
                    await self._try(self.streams.transport.release_lease(lease, self.name))
            del self._holders[(feed.group, holder.partition)]
            self._done.notify()

    async def _handle_partition(self, feed: _Feed, holder: _Holder) -> None:
        transport = self.streams.transport
        stream = feed.streams[holder.partition]
        # First what the last holder left pending, oldest first: it comes before the rest.
        while holder.active and holder.holds():
            entries, gone = await self._retrying(
                transport.claim_idle,
                stream,
                feed.group,
                self.name,
                min_idle=0,
                count=self.batch_size,
            )
            _report_gone(stream, feed.group, gone)
            if not entries:
                break
            await self._deliver_in_order(feed, holder, entries)
        while holder.active and holder.holds():
            entries = []
            holder.reading = anyio.CancelScope()  # one per read: trio allows no reuse
            with holder.reading:
                entries = await self._retrying(
                    transport.read_new,
                    [stream],
                    feed.group,
                    self.name,
                    count=min(self.batch_size, _READ_AHEAD_IN_ORDER),
                    block=self.block,
                )
            await self._deliver_in_order(feed, holder, entries)

    async def _deliver_in_order(self, feed: _Feed, holder: _Holder, entries: list[Entry]) -> None:
        # The whole batch, even when the partition is being given back: an entry read but
        # not run would count a delivery it never had. Not when the lease is lost: those
        # left stay pending, and the next holder claims them, oldest first.
        for entry in entries:
            while len(self._in_flight) >= self.concurrency and holder.holds():
                await self._room.wait()  # held partitions share the consumer's concurrency
            if not holder.holds():
                return
            slot = _slot(feed, entry)
            self._in_flight.add(slot)
            try:
                done = await self._deliver(feed, entry, holder)
            finally:
                self._in_flight.discard(slot)
                self._room.notify()
            if not done:  # it stays pending: the ones after it must wait for it
                holder.active = False
                return

    # -- one entry -----------------------------------------------------------------------------

    async def _deliver(self, feed: _Feed, entry: Entry, holder: _Holder | None = None) -> bool:
        """Run the entry's handler until it succeeded or is dead (True), or this consumer
        stops or lost it (False: it stays pending)."""
        envelope = entry.envelope
        try:
            event = self.streams.codec.decode(envelope.name, envelope.version, envelope.payload)
        except Exception as exc:  # retrying would not help, whatever the event's own checks raise
            await self._dead(feed, entry, f"{type(exc).__name__}: {exc}")
            return True
        if not isinstance(event, feed.sub.event_type):  # a sibling type on the same stream
            await self._ack(feed, entry)
            return True
        while True:
            errors = await self._run(feed.sub, event, entry)
            if not errors:
                await self._ack(feed, entry)
                return True
            if entry.deliveries >= self.max_deliveries:
                await self._dead(feed, entry, _reason(errors[0].exception))
                return True
            with anyio.move_on_after(self._backoff(entry.deliveries)):
                await self._stopping.wait()
            if not self._accepting or (holder is not None and not holder.holds()):
                return False  # left pending, for the next consumer or holder
            count = await self._retrying(
                self.streams.transport.redeliver, entry.stream, feed.group, self.name, entry.id
            )
            if not count:  # another consumer took it meanwhile: its to run now
                return False
            entry = replace(entry, deliveries=count)

    async def _run(self, sub: Subscription, event: object, entry: Entry) -> list[HandlerError]:
        errors: list[HandlerError] = []
        context = copy_context()
        context.run(_current.set, entry)
        context.run(_consuming.set, (sub.name, self.streams.transport.system))
        try:
            await run_in_context(context, self.bus._guarded(sub, event, errors))
        except anyio.get_cancelled_exc_class() as exc:
            if not self._accepting:  # cut short by the drain timeout: stays pending
                raise
            record_stray_cancellation(sub, event, exc, errors)
        return errors

    def _backoff(self, deliveries: int) -> float:
        initial, longest, jitter = self._wait
        exponent = min(deliveries - 1, 62)
        return min(longest, initial * 2.0**exponent) + random.random() * jitter

    async def _dead(self, feed: _Feed, entry: Entry, reason: str) -> None:
        logger.error(
            "%s: entry %s of %s is dead after %d deliveries: %s",
            feed.group,
            entry.id,
            entry.stream,
            entry.deliveries,
            reason,
        )
        await self._retrying(
            self.streams.transport.dead_letter,
            entry,
            feed.group,
            dead_stream=feed.dead_stream,
            reason=reason,
        )

    async def _ack(self, feed: _Feed, entry: Entry) -> None:
        if self.streams.partitions is not None:
            # In order: acknowledged before the next entry, or a new holder would run this
            # one again after it.
            await self._retrying(self.streams.transport.ack, entry.stream, feed.group, [entry.id])
            return
        self._acks.setdefault((entry.stream, feed.group), []).append(entry.id)
        self._ack_wanted.set()

    # -- writing acknowledgements, keeping entries, trimming ------------------------------------

    async def _ack_loop(self) -> None:
        while True:
            await self._ack_wanted.wait()
            self._ack_wanted = anyio.Event()
            # Those acknowledged meanwhile wait for this write: one round trip for many.
            await self._flush_acks(tries=None)

    async def _flush_acks(self, *, tries: int | None) -> None:
        transport = self.streams.transport
        while self._acks:
            (stream, group), ids = self._acks.popitem()
            try:
                await self._retrying(transport.ack, stream, group, ids, tries=tries)
            except Exception:
                logger.warning(
                    "%r: %d acknowledgement(s) not written: redelivered later", self, len(ids)
                )
            except BaseException:  # cut short by a stop: given back to its final flush
                self._acks.setdefault((stream, group), []).extend(ids)
                raise

    async def _keep_loop(self) -> None:
        """Reset the idle time of the entries this consumer works on, so that no other
        consumer reclaims them however long their handlers take."""
        transport = self.streams.transport
        while True:
            await anyio.sleep(self.min_idle / 3)
            held: dict[tuple[str, str], list[str]] = {}
            for stream, group, entry_id in self._in_flight:
                held.setdefault((stream, group), []).append(entry_id)
            for (stream, group), ids in held.items():
                try:
                    await transport.keep(stream, group, self.name, ids)
                except Exception as exc:
                    logger.warning("%r: keeping its entries failed: %r", self, exc)

    async def _trim_loop(self) -> None:
        transport = self.streams.transport
        streams = sorted({stream for feed in self._feeds for stream in feed.streams})
        while True:
            for stream in streams:
                try:
                    trimmed = await transport.trim(stream)
                except Exception as exc:
                    logger.warning("%r: trimming %s failed: %r", self, stream, exc)
                    continue
                if trimmed.capped:
                    logger.warning(
                        "%s was past its cap of %s entries: the oldest %d removed, some maybe "
                        "not handled by every group",
                        stream,
                        transport.max_len,
                        trimmed.capped,
                    )
            await anyio.sleep(_TRIM_EVERY)

    async def _retrying(
        self,
        call: Callable[..., Awaitable[T]],
        *args: Any,
        tries: int | None = None,
        **kwargs: Any,
    ) -> T:
        """``call(*args, **kwargs)`` until the transport answers; at most ``tries`` times.

        Any exception is retried, not only `OSError`: a consumer that stopped on an error the
        next attempt does not meet (a stream deleted under it) would leave its handlers unfed.
        """
        delay, attempt = _RETRY_MIN, 0
        while True:
            attempt += 1
            try:
                return await call(*args, **kwargs)
            except Exception as exc:
                if tries is not None and attempt >= tries:
                    raise
                if attempt == 1:
                    logger.warning("%r: the transport failed, retrying: %r", self, exc)
            await anyio.sleep(delay)
            delay = min(_RETRY_MAX, delay * 2)


class _Signal:
    """Wakes every task waiting for a change; costs next to nothing when none waits."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: anyio.Event | None = None

    def notify(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait(self) -> None:
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()


def _slot(feed: _Feed, entry: Entry) -> tuple[str, str, str]:
    return entry.stream, feed.group, entry.id


def _check_feeds(feeds: Sequence[_Feed], bus: EventBus) -> None:
    """A group per handler name: two handlers of one name would split its entries."""
    seen: dict[tuple[str, str], Subscription] = {}
    for feed in feeds:
        if feed.sub.batch is not None or feed.sub.once:
            what = "a batch handler" if feed.sub.batch is not None else "a once=True handler"
            raise ConfigurationError(
                f"{feed.group} is {what}: it cannot be fed from streams (name the handlers "
                f"to feed with consume(..., handlers=[...]))"
            )
        earlier = seen.setdefault((feed.streams[0], feed.group), feed.sub)
        if earlier is not feed.sub:
            raise ConfigurationError(
                f"two handlers on {bus!r} are named {feed.group!r}: each is a consumer group "
                f"of its own, so give them names of their own (bus.on(..., name=...))"
            )


def _checked_headers(headers: object) -> dict[str, str]:
    if headers is None:
        return {}
    if not isinstance(headers, Mapping) or not all(
        type(name) is str and type(value) is str for name, value in headers.items()
    ):
        raise TypeError(f"headers must be a mapping of str to str, got {headers!r}")
    return dict(headers)


def _checked_send_hooks(hooks: object) -> tuple[object, ...]:
    if isinstance(hooks, str | bytes) or not isinstance(hooks, Iterable):
        raise TypeError(f"hooks must be an iterable of send hooks, got {hooks!r}")
    hooks = tuple(hooks)
    for hook in hooks:
        if not all(callable(getattr(hook, m, None)) for m in ("send_started", "send_finished")):
            raise TypeError(f"a send hook needs send_started() and send_finished(), got {hook!r}")
    return hooks


def _is_forwarder(sub: Subscription) -> bool:
    return sub.name.startswith(_EXTERNALIZE)


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _report_gone(stream: str, group: str, gone: Sequence[str]) -> None:
    if gone:
        logger.error(
            "%s: %d pending entries of %s were trimmed (past the stream's cap) before they "
            "were handled: %s",
            group,
            len(gone),
            stream,
            ", ".join(gone[:10]),
        )
