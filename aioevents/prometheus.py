"""Prometheus metrics of a bus, its outbox and its streams: `Metrics`.

::

    from prometheus_client import start_http_server
    from aioevents.prometheus import Metrics

    metrics = Metrics()                      # a collector of the default REGISTRY
    bus = EventBus(hooks=[metrics])          # or bus.add_hook(metrics): handler metrics
    metrics.watch(bus, name="web")           # its background queue's depth
    async with bus, metrics.polling(outbox=outbox, streams=streams, event_types=(E,)):
        ...                                  # durable stores polled every 15 s

Names are in base units (seconds); label values are the event's stable name
(`aioevents.event_name`) and the handler's subscription name:

======================================  =========  =========================  ===============
name                                    type       labels                     what
======================================  =========  =========================  ===============
aioevents_handler_duration_seconds      histogram  event, handler             handler calls
aioevents_handled_total                 counter    event, handler             finished calls
aioevents_handler_failures_total        counter    event, handler, error_type failed calls
aioevents_background_queue_depth        gauge      bus                        queued events
aioevents_outbox_deliveries             gauge      handler, status            pending | dead
aioevents_stream_lag                    gauge      stream, group              not yet read
aioevents_stream_pending                gauge      stream, group              read, not acked
aioevents_poll_errors_total             counter    source                     outbox | streams
======================================  =========  =========================  ===============

Every handler call that finished counts in ``handled_total`` and the histogram, however it
ended. A failure is a call that raised an `Exception` (a timeout too): what `EmitResult.errors`
records, labelled with the exception's class (qualified by its module unless a builtin). A
call ended by a cancellation (its emitter was cancelled, the bus stopped) did not fail: it
counts as handled, not as a failure (so does one that a cancellation its emit did not ask
for ended, which `EmitResult.errors` reports as a `HandlerCancelledError`).

The hook is on the hot path of every handler, so it only adds plain numbers to a record of
its handler and event type (found by two dict lookups; a `bisect` finds the bucket): no
lock, no metric object per call. Metric families are built from those numbers when
Prometheus scrapes. A scrape from another thread (prometheus_client's HTTP server) reads
them while handlers run: each series is consistent in itself (the count is the sum of its
buckets; counters never go back), but a call finishing meanwhile may be in one series and
not yet in another. Use one `Metrics` per event loop's thread: calls finishing at the same
moment on two threads could miss a count.

The outbox and streams are read by queries, which are async: `polling` runs them every
``interval`` in a task, and scrapes serve the last values. A poll that fails is logged,
counted in ``aioevents_poll_errors_total``, and leaves the last values in place.
"""

from __future__ import annotations

try:
    import prometheus_client  # noqa: F401
except ImportError as missing:  # a newcomer's first import: say which extra brings it
    raise ModuleNotFoundError(
        f"aioevents.prometheus needs prometheus-client ({missing}): install the extra with "
        f"pip install 'aioevents[prometheus]'",
        name=missing.name,
    ) from missing

import itertools
import logging
import math
import weakref
from bisect import bisect_left
from collections.abc import Coroutine, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.abc
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import REGISTRY, CollectorRegistry
from prometheus_client.utils import floatToGoString

from ._bus import EventBus
from ._checks import check_instance, check_seconds
from ._exceptions import BusStateError, ConfigurationError
from ._names import error_type_name, event_name
from ._subscription import Subscription

if TYPE_CHECKING:
    from ._outbox import Outbox
    from ._streams import Streams
    from ._transport import GroupInfo

__all__ = ["DEFAULT_BUCKETS", "Metrics"]

logger = logging.getLogger("aioevents")
T = TypeVar("T")

#: Upper bounds (seconds) of the duration histogram's buckets: from a millisecond, for
#: handlers that do a little I/O, to a minute, for durable handlers that do a lot.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0
)  # fmt: skip

_POLLED_STATUSES = ("pending", "dead")  # the outbox's backlog; completed rows are history
_ERROR_TYPES_KEPT = 256  # exception classes whose label is cached (a bound: see _error_type)


class _Record:
    """What one handler's calls on one event type came to: plain numbers, no lock.

    ``buckets[i]`` counts the calls that fell in bucket ``i`` alone (the last one: above the
    highest bound); the cumulative counts Prometheus wants are summed at scrape time.
    """

    __slots__ = ("buckets", "event", "failures", "handler", "seconds")

    def __init__(self, event: str, handler: str, size: int) -> None:
        self.event = event
        self.handler = handler
        self.buckets = [0] * size
        self.seconds = 0.0
        self.failures: dict[str, int] = {}


@dataclass(frozen=True, slots=True)
class _Sources:
    """What a poll reads: an outbox, streams with the event types whose groups to read."""

    outbox: Outbox | None
    streams: Streams | None
    event_types: tuple[type, ...]


class _Polling:
    """The task that polls while a block runs; the block's own exception goes out as it is
    (a task group around the block would wrap it in an ExceptionGroup)."""

    def __init__(self, metrics: Metrics, sources: _Sources, interval: float) -> None:
        self._metrics = metrics
        self._sources = sources
        self._interval = interval
        self._group: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> Metrics:
        if self._group is not None:
            raise BusStateError("this polling block is already running")
        # The first poll before the task group: nothing is left entered if it is cancelled.
        await self._metrics._poll(self._sources, within=self._interval)
        group = self._group = anyio.create_task_group()
        await group.__aenter__()
        group.start_soon(self._metrics._poll_every, self._sources, self._interval)
        return self._metrics

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._group is not None
        self._group.cancel_scope.cancel()  # the poller only ever ends by this cancellation
        await self._group.__aexit__(None, None, None)


class Metrics:
    """A bus `Hook` and a prometheus_client collector: the metrics in this module's table.

    ``registry`` is where it registers itself (None: nowhere, register it yourself);
    ``buckets`` are the duration histogram's upper bounds in seconds, increasing (``+Inf``
    is always added). Add it to any number of buses as a hook; `watch` a bus for its queue;
    `polling` (or `poll`) reads the outbox and streams.
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = REGISTRY,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        check_instance(
            registry,
            CollectorRegistry,
            "Metrics(registry=...) takes a prometheus_client CollectorRegistry or None",
            none=True,
        )
        self._bounds = _checked_buckets(buckets)
        # handler name -> event type -> record: two lookups cost less than hashing a tuple
        self._records: dict[str, dict[type, _Record]] = {}
        self._error_types: dict[type, str] = {}
        self._buses: dict[str, weakref.ref[EventBus]] = {}
        self._deliveries: dict[tuple[str, str], int] = {}  # (handler, status) -> count
        self._groups: list[GroupInfo] = []
        self._poll_errors = {"outbox": 0, "streams": 0}
        if registry is not None:
            registry.register(self)

    def __repr__(self) -> str:
        handlers = len(self._records)
        return f"<Metrics handlers={handlers} buses={sorted(self._buses)}>"

    # -- the hook: on every handler call ---------------------------------------------------

    def handler_started(self, event: object, subscription: Subscription) -> None:
        """Nothing to do at the start: the bus measures the call's duration."""

    def handler_finished(
        self,
        event: object,
        subscription: Subscription,
        *,
        token: object,
        duration: float,
        error: BaseException | None,
    ) -> None:
        """Count the call in its record: bucket, sum, and its failure if it raised one."""
        # Keyed by the handler's name, not its Subscription: a handler subscribed and
        # unsubscribed over and over (a test's capture, a once handler) adds no record.
        try:
            record = self._records[subscription.name][type(event)]
        except KeyError:  # the first call of this handler on this type
            record = self._new_record(event, subscription)
        record.buckets[bisect_left(self._bounds, duration)] += 1
        record.seconds += duration
        if error is not None and isinstance(error, Exception):  # a cancellation is no failure
            name = self._error_types.get(type(error)) or self._error_type(error)
            record.failures[name] = record.failures.get(name, 0) + 1

    def _new_record(self, event: object, subscription: Subscription) -> _Record:
        # A batch handler's "event" is the list of its batch: it is labelled with the type
        # it subscribed to.
        of = subscription.event_type if subscription.batch is not None else type(event)
        record = _Record(event_name(of), subscription.name, len(self._bounds) + 1)
        by_type = self._records.setdefault(subscription.name, {})
        return by_type.setdefault(type(event), record)

    def _error_type(self, error: Exception) -> str:
        kind = type(error)
        name = error_type_name(kind)
        if len(self._error_types) >= _ERROR_TYPES_KEPT:
            # Code that makes exception classes at run time (one per client, say) must not
            # grow the cache, nor keep each class alive: start it again, it refills quickly.
            self._error_types.clear()
        self._error_types[kind] = name
        return name

    # -- buses -----------------------------------------------------------------------------

    def watch(self, bus: EventBus, *, name: str = "default") -> None:
        """Report ``bus``'s background queue depth, labelled ``bus=name``, while it lives.

        The depth is read at each scrape: events queued by `EventBus.publish` that no worker
        took yet (0 while the bus is not running).
        """
        check_instance(bus, EventBus, "watch() takes an EventBus")
        if type(name) is not str or not name:
            raise TypeError(f"the bus's name must be a non-empty str, got {name!r}")
        watched = self._buses.get(name)
        if watched is not None and watched() not in (None, bus):
            raise ConfigurationError(f"another bus is watched under the name {name!r}")
        self._buses[name] = weakref.ref(bus)

    # -- durable stores: polled ------------------------------------------------------------

    def polling(
        self,
        *,
        outbox: Outbox | None = None,
        streams: Streams | None = None,
        event_types: Iterable[type] = (),
        interval: float = 15.0,
    ) -> AbstractAsyncContextManager[Metrics]:
        """Poll the outbox's backlog and the streams' groups every ``interval`` seconds
        while the block runs (``async with metrics.polling(...):``); the first poll is done
        as the block starts.

        ``event_types`` say whose stream groups to read (`Streams.groups`). A poll that takes
        longer than ``interval`` is given up, and counts as failed.
        """
        sources = _checked_sources(outbox, streams, event_types)
        check_seconds("interval", interval)
        return _Polling(self, sources, interval)

    async def poll(
        self,
        *,
        outbox: Outbox | None = None,
        streams: Streams | None = None,
        event_types: Iterable[type] = (),
    ) -> None:
        """Read the outbox and streams once now (what `polling` does every interval)."""
        await self._poll(_checked_sources(outbox, streams, event_types), within=None)

    async def _poll_every(self, sources: _Sources, interval: float) -> None:
        while True:
            await anyio.sleep(interval)
            await self._poll(sources, within=interval)

    async def _poll(self, sources: _Sources, *, within: float | None) -> None:
        if sources.outbox is not None:
            counts = await self._attempt("outbox", _outbox_counts(sources.outbox), within)
            if counts is not None:
                # Zero, not gone, for what was seen before: the backlog emptied.
                self._deliveries = dict.fromkeys(self._deliveries, 0) | counts
        if sources.streams is not None:
            groups = await self._attempt(
                "streams", sources.streams.groups(*sources.event_types), within
            )
            if groups is not None:
                self._groups = groups

    async def _attempt(
        self, source: str, query: Coroutine[Any, Any, T], within: float | None
    ) -> T | None:
        """What ``query`` returns; None when it failed (logged and counted)."""
        try:
            with anyio.fail_after(within):
                return await query
        except Exception:
            self._poll_errors[source] += 1
            logger.warning(
                "polling the %s for metrics failed; its metrics keep their last values",
                source,
                exc_info=True,
            )
            return None

    # -- the collector: at each scrape -----------------------------------------------------

    def describe(self) -> Iterator[Metric]:
        """The metric families, without samples (for the registry's name checks)."""
        return self._families()

    def collect(self) -> Iterator[Metric]:
        """The metric families with the values of this moment (called by each scrape)."""
        return self._families(sampled=True)

    def _families(self, *, sampled: bool = False) -> Iterator[Metric]:
        yield from self._handler_families(sampled)
        yield self._queue_family(sampled)
        yield from self._polled_families(sampled)

    def _handler_families(self, sampled: bool) -> Iterator[Metric]:
        duration = HistogramMetricFamily(
            "aioevents_handler_duration_seconds",
            "How long handler calls took, in seconds.",
            labels=("event", "handler"),
        )
        handled = CounterMetricFamily(
            "aioevents_handled",
            "Handler calls that finished: succeeded, failed or cancelled.",
            labels=("event", "handler"),
        )
        failures = CounterMetricFamily(
            "aioevents_handler_failures",
            "Handler calls that raised an exception (timeouts included), by its type.",
            labels=("event", "handler", "error_type"),
        )
        if sampled:
            bounds = [*map(floatToGoString, self._bounds), "+Inf"]
            for labels, (buckets, seconds, failed) in self._snapshot().items():
                cumulative = list(itertools.accumulate(buckets))
                duration.add_metric(labels, list(zip(bounds, cumulative, strict=True)), seconds)
                handled.add_metric(labels, cumulative[-1])
                for error_type, count in sorted(failed.items()):
                    failures.add_metric((*labels, error_type), count)
        return iter((duration, handled, failures))

    def _snapshot(self) -> dict[tuple[str, str], tuple[list[int], float, dict[str, int]]]:
        """The records summed by their labels (two event types may share a name)."""
        summed: dict[tuple[str, str], tuple[list[int], float, dict[str, int]]] = {}
        # list() of a dict's values is one C call: safe while the loop's thread adds records
        records = [
            record for by_type in list(self._records.values()) for record in list(by_type.values())
        ]
        for record in records:
            buckets, seconds, failures = list(record.buckets), record.seconds, record.failures
            labels = (record.event, record.handler)
            if labels in summed:
                before, before_seconds, before_failures = summed[labels]
                buckets = [a + b for a, b in zip(before, buckets, strict=True)]
                seconds += before_seconds
                failures = _added(before_failures, failures)
            summed[labels] = (buckets, seconds, dict(failures))
        return summed

    def _queue_family(self, sampled: bool) -> Metric:
        depth = GaugeMetricFamily(
            "aioevents_background_queue_depth",
            "Events published for background delivery that no worker took yet.",
            labels=("bus",),
        )
        if sampled:
            for name, watched in list(self._buses.items()):
                bus = watched()
                if bus is not None:
                    depth.add_metric((name,), bus.queued)
        return depth

    def _polled_families(self, sampled: bool) -> Iterator[Metric]:
        deliveries = GaugeMetricFamily(
            "aioevents_outbox_deliveries",
            "Outbox deliveries waiting or running (pending) and given up (dead), at the last poll.",
            labels=("handler", "status"),
        )
        lag = GaugeMetricFamily(
            "aioevents_stream_lag",
            "Stream entries no consumer of the group has read yet, at the last poll.",
            labels=("stream", "group"),
        )
        pending = GaugeMetricFamily(
            "aioevents_stream_pending",
            "Stream entries read by a consumer of the group and not yet acknowledged, at the "
            "last poll.",
            labels=("stream", "group"),
        )
        errors = CounterMetricFamily(
            "aioevents_poll_errors",
            "Polls of a durable store that failed (its metrics kept their last values).",
            labels=("source",),
        )
        if sampled:
            for (handler, status), count in sorted(self._deliveries.items()):
                deliveries.add_metric((handler, status), count)
            for info in self._groups:
                if info.lag is not None:  # Redis cannot always tell (after a trim, say)
                    lag.add_metric((info.stream, info.group), info.lag)
                pending.add_metric((info.stream, info.group), info.pending)
            for source, count in self._poll_errors.items():
                errors.add_metric((source,), count)
        return iter((deliveries, lag, pending, errors))


# -- helpers ---------------------------------------------------------------------------------


def _checked_buckets(buckets: object) -> tuple[float, ...]:
    """Increasing finite bounds > 0; a trailing ``+Inf`` is dropped (it is always there)."""
    if isinstance(buckets, str | bytes) or not isinstance(buckets, Iterable):
        raise TypeError(f"buckets must be a sequence of seconds, got {buckets!r}")
    bounds = list(buckets)
    if bounds and bounds[-1] == math.inf:
        bounds.pop()
    for bound in bounds:
        check_seconds("a bucket's upper bound", bound)
    if not bounds or any(a >= b for a, b in itertools.pairwise(bounds)):
        raise ConfigurationError(f"buckets must be at least one bound, increasing, got {buckets!r}")
    return tuple(float(bound) for bound in bounds)


def _checked_sources(outbox: object, streams: object, event_types: object) -> _Sources:
    if outbox is not None:
        from ._outbox import Outbox  # here: the hook alone needs no SQLAlchemy

        check_instance(outbox, Outbox, "outbox must be an aioevents.outbox.Outbox or None")
    if streams is not None:
        from ._streams import Streams  # here: the hook alone needs no msgspec

        check_instance(streams, Streams, "streams must be an aioevents.streams.Streams or None")
    if isinstance(event_types, str | bytes | type) or not isinstance(event_types, Iterable):
        raise TypeError(f"event_types must be an iterable of event classes, got {event_types!r}")
    types = tuple(event_types)
    for event_type in types:
        check_instance(event_type, type, "event_types holds event classes")
    if streams is None and types:
        raise TypeError("event_types name whose stream groups to read: give streams too")
    if streams is not None and not types:
        raise TypeError("streams need event_types: the event classes whose groups to read")
    if outbox is None and streams is None:
        raise TypeError("nothing to poll: give an outbox, streams, or both")
    return _Sources(outbox, streams, types)  # type: ignore[arg-type]  # checked above


async def _outbox_counts(outbox: Outbox) -> dict[tuple[str, str], int]:
    """Pending and dead deliveries per handler: one grouped count (the status index)."""
    counts = await outbox.counts(*_POLLED_STATUSES)
    return {(handler, status.value): count for (handler, status), count in counts.items()}


def _added(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {key: a.get(key, 0) + b.get(key, 0) for key in a.keys() | b.keys()}
