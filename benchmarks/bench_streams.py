"""Redis Streams (issue 12): aioevents' stream consumers against FastStream's and a raw loop.

Everything runs in this process on the Redis at ``AIOEVENTS_TEST_REDIS_URL``, under a key
prefix of its own (``bench-streams:<random>``); every key this run made is deleted at the
end, and nothing else is touched. Each contender is fed n events (20,000; ``--quick`` 2,000)
through one consumer group of 4 consumers whose handler is a no-op that notes when it
started:

- raw floor: redis-py asyncio, 4 consumer tasks, each ``XREADGROUP COUNT 100 BLOCK 100`` then
  the no-op handler per entry, then one ``XACK`` of the batch's ids. Nothing can do less.
- FastStream (``faststream[redis]``): one `RedisBroker`, 4 stream subscribers on the same
  stream, group and handler (``StreamSub(stream, group=..., consumer="c<k>", max_records=100)``,
  ``batch=False``), one consumer each, acking after the handler (its default
  ``AckPolicy.REJECT_ON_ERROR``, one ``XACK`` per message). Its fastest configuration as
  measured here: no log line per message (``logger=None``), no FastDepends
  (``apply_types=False``; the handler takes the decoded body, and the bench's stamp is read
  from the raw message in ``broker.context``: an injected ``message: RedisStreamMessage``
  was about 40 % slower); one subscriber with ``max_workers=4`` or 16 (one reader feeding a
  pool), or 4 with ``max_workers=4``, ran about 30 % slower than 4 plain subscribers, and
  ``max_records=None`` about 15 %. The entries are in FastStream's own wire
  format (its ``__data__`` field, `BinaryMessageFormatV1`, the broker's default, made with
  its own encoder), so it parses them as what its publisher writes.
- aioevents: ``consume(bus, StreamPing, streams=Streams(RedisStreams(...), prefix=...),
  concurrency=16)`` on 4 buses (4 `Consumer` instances: 4 consumers of the handler's group),
  the transport shared as FastStream's broker and the raw loop's client are. The entries are
  aioevents envelopes (id, name, version, payload, headers), as ``externalize`` writes them.
  If ``aioevents.redis_streams`` cannot be imported (or its run fails), the other two still
  run and its goals are skipped with the error.

The producer is the same for all three, so only the consuming side differs: the entries'
fields are made before the timing, then they are added with ``XADD`` 100 per pipeline (one
pipeline at a time), each with its send time, ``perf_counter()``, in a ``headers`` field
(``{"sent": "<seconds>"}``: the aioevents envelope's headers, the floor's identical entries,
a field of its own next to FastStream's ``__data__``, read from the raw message). The
producer runs in the same event loop as the consumers (as the issue states it: from ``XADD``
to handler completion), so its work is inside every contender's time; the "producer alone"
line shows the rate it allows at most.

events/s is n over the time from just before the first ``XADD`` to the end of the last
handler (acks still in flight are waited for afterwards, untimed: every run is checked to have
handled each entry exactly once and left nothing pending). Latency is from each entry's send
time to its handler's first line; in a burst it is mostly the queue ahead of the entry. The
consumers are in their first read of the group before the producer starts.
After one untimed warm-up run each, every round runs the contenders in an order rotated by one,
each on a stream of its own; figures are medians over the rounds, ratios taken within a round.

Run alone with ``python -m benchmarks.bench_streams [--quick]``, or as the ``streams``
scenario of ``python -m benchmarks``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from importlib import metadata
from time import perf_counter, process_time
from typing import Any, Final, cast
from urllib.parse import urlsplit

import redis.asyncio as redis
from redis.exceptions import ResponseError

from aioevents import EventBus, event_name

from ._timing import Goal, Skipped, Verdict, figure

REDIS_URL = os.environ.get("AIOEVENTS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
CONSUMERS: Final = 4  # in the one group, for every contender
BATCH: Final = 100  # XADDs per pipeline, and entries per read (COUNT, max_records)
BLOCK_MS: Final = 100  # an idle read's wait: FastStream's default polling_interval
CONCURRENCY: Final = 16  # aioevents: handlers at once per consumer (the documented example)
GROUP: Final = "bench-noop"  # the raw loop's and FastStream's group
FASTSTREAM_GOAL: Final = 2.0  # [12.1] aioevents events/s ÷ FastStream's, at least
RAW_GOAL: Final = 0.5  # [12.2] aioevents events/s ÷ the raw loop's, at least
WAIT: Final = 120.0  # seconds a run may take before it is called stuck


@dataclass(frozen=True, slots=True)
class Size:
    events: int
    rounds: int
    warm_up: int  # events of each contender's untimed first run


FULL = Size(events=20_000, rounds=5, warm_up=2_000)
QUICK = Size(events=2_000, rounds=2, warm_up=500)


@dataclass(frozen=True, slots=True)
class StreamPing:
    """The event: one small field, as a typical id-carrying event."""

    n: int


@dataclass(frozen=True, slots=True)
class Clock:
    """A moment: wall time and this process's CPU time."""

    wall: float
    cpu: float

    @classmethod
    def now(cls) -> Clock:
        return cls(perf_counter(), process_time())


@dataclass(frozen=True, slots=True)
class Run:
    seconds: float  # first XADD to the last handler's end
    cpu: float  # this process's CPU seconds over the same span (producer included)
    latencies: list[float]  # ms from each entry's send time to its handler's start

    @classmethod
    def between(cls, start: Clock, end: Clock, latencies: list[float]) -> Run:
        return cls(end.wall - start.wall, end.cpu - start.cpu, latencies)


Fields = dict[str, str | bytes]
# XREADGROUP's reply: per stream, its name and its entries (id, fields)
Reply = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]


# -- what every contender shares ---------------------------------------------------------------


class Tally:
    """What the handlers note: each entry's send stamp and when its handler started."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.marks: list[tuple[str | bytes, float]] = []
        self.finished = Clock(0.0, 0.0)
        self.done = asyncio.Event()

    def note(self, stamp: str | bytes) -> None:
        self.marks.append((stamp, perf_counter()))
        if len(self.marks) == self.n:
            self.finished = Clock.now()
            self.done.set()

    def latencies(self) -> list[float]:
        """ms from send to handler start; the stamps are parsed now, after the timing."""
        return [(started - _sent(stamp)) * 1e3 for stamp, started in self.marks]


def _stamp(sent: float) -> str:
    return f'{{"sent":"{sent!r}"}}'


def _sent(stamp: str | bytes) -> float:
    """The send time in a stamp: the headers' JSON text, or the "sent" value alone."""
    if isinstance(stamp, bytes) or stamp.startswith("{"):
        return float(json.loads(stamp)["sent"])
    return float(stamp)


async def produce(client: redis.Redis, stream: str, entries: Sequence[Fields]) -> Clock:
    """XADD the entries, BATCH per pipeline, each stamped with its send time; return the
    moment just before the first."""
    started = Clock.now()
    for first in range(0, len(entries), BATCH):
        pipe = client.pipeline(transaction=False)
        for fields in entries[first : first + BATCH]:
            stamped: dict[Any, Any] = {**fields, "headers": _stamp(perf_counter())}
            pipe.xadd(stream, stamped)
        await pipe.execute()
    return started


def _envelopes(n: int, name: str) -> list[Fields]:
    """aioevents envelopes as externalize writes them (headers are added when sent)."""
    return [
        {"id": str(uuid.uuid4()), "name": name, "version": "1", "payload": f'{{"n":{i}}}'}
        for i in range(n)
    ]


async def _joined(client: redis.Redis, stream: str, group: str) -> None:
    """Until the group exists, then long enough for every consumer to be in its first read.

    (Redis 7.0 lists a consumer only once a read gave it an entry: nothing to wait on.)
    """
    deadline = perf_counter() + 30
    while not any(info["name"].decode() == group for info in await _groups(client, stream)):
        if perf_counter() > deadline:
            raise TimeoutError(f"no group {group!r} on {stream!r} after 30 s")
        await asyncio.sleep(0.005)
    await asyncio.sleep(2 * BLOCK_MS / 1000)


async def _groups(client: redis.Redis, stream: str) -> list[dict[str, Any]]:
    try:
        return list(await client.xinfo_groups(stream))
    except ResponseError:  # no stream yet
        return []


async def _settled(client: redis.Redis, stream: str, group: str, tally: Tally) -> None:
    """Until nothing is pending in the group; then every entry was handled exactly once."""
    deadline = perf_counter() + 30
    while (await client.xpending(stream, group))["pending"]:
        if perf_counter() > deadline:
            raise AssertionError(f"entries still pending in {group!r} 30 s after the run")
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)  # a late duplicate would show up now
    if len(tally.marks) != tally.n or len({stamp for stamp, _ in tally.marks}) != tally.n:
        raise AssertionError(f"{len(tally.marks)} handler runs for {tally.n} entries")


Case = Callable[[redis.Redis, str, int], Awaitable[Run]]


# -- the contenders ---------------------------------------------------------------------------


async def producer_alone(client: redis.Redis, prefix: str, n: int) -> Run:
    """The producer with no consumer: the rate it allows at most."""
    stream = f"{prefix}:alone"
    entries = _envelopes(n, event_name(StreamPing))
    started = await produce(client, stream, entries)
    return Run.between(started, Clock.now(), [])


async def raw_loop(client: redis.Redis, prefix: str, n: int) -> Run:
    stream = f"{prefix}:raw"
    entries = _envelopes(n, event_name(StreamPing))
    tally = Tally(n)
    stopping = False

    async def handle(fields: dict[bytes, bytes]) -> None:
        tally.note(fields[b"headers"])

    async def consumer(name: str) -> None:
        while not stopping:
            # (cast: redis-py types every protocol's shape; RESP2, its default, gives this)
            reply = cast(
                "Reply",
                await client.xreadgroup(GROUP, name, {stream: ">"}, count=BATCH, block=BLOCK_MS),
            )
            for _, batch in reply:
                for _, fields in batch:
                    await handle(fields)
                await client.xack(stream, GROUP, *(entry_id for entry_id, _ in batch))

    await client.xgroup_create(stream, GROUP, id="$", mkstream=True)
    tasks = [asyncio.create_task(consumer(f"c{k}")) for k in range(CONSUMERS)]
    try:
        await _joined(client, stream, GROUP)
        started = await produce(client, stream, entries)
        await asyncio.wait_for(tally.done.wait(), WAIT)
        await _settled(client, stream, GROUP, tally)
    finally:
        stopping = True
        await asyncio.gather(*tasks)
    return Run.between(started, tally.finished, tally.latencies())


async def faststream(client: redis.Redis, prefix: str, n: int) -> Run:
    # Imported here: FastStream is a peer of the benchmark session only (noxfile BENCH_PEERS).
    from faststream.redis import RedisBroker, StreamSub
    from faststream.redis.parser import BinaryMessageFormatV1

    stream = f"{prefix}:faststream"
    tally = Tally(n)
    # What `broker.publish({"n": i}, stream=...)` writes: its binary format in "__data__".
    entries: list[Fields] = []
    for i in range(n):
        data = await BinaryMessageFormatV1.encode(
            message={"n": i}, reply_to=None, headers=None, correlation_id=uuid.uuid4().hex
        )
        entries.append({"__data__": data})
    # Its fastest configuration measured: no log line per message (logger=None), and no
    # FastDepends (apply_types=False: the handler gets the decoded body, nothing injected).
    broker = RedisBroker(REDIS_URL, logger=None, apply_types=False)  # type: ignore[arg-type]

    def subscribe(consumer: str) -> None:
        @broker.subscriber(
            stream=StreamSub(stream, group=GROUP, consumer=consumer, max_records=BATCH)
        )
        async def noop(body: Any) -> None:
            # The raw entry from the context: an injected `message: RedisStreamMessage`
            # measured about 40 % slower (FastDepends on), and this is only the bench's own stamp.
            message = broker.context.get_local("message")
            tally.note(message.raw_message["data"][b"headers"])

    for k in range(CONSUMERS):
        subscribe(f"c{k}")
    await broker.start()  # creates the group at "$" (mkstream)
    try:
        await _joined(client, stream, GROUP)
        started = await produce(client, stream, entries)
        await asyncio.wait_for(tally.done.wait(), WAIT)
        await _settled(client, stream, GROUP, tally)
    finally:
        await broker.stop()
    return Run.between(started, tally.finished, tally.latencies())


def aioevents_case() -> Case:
    """The aioevents contender; raises (ImportError, ...) if the library cannot run it."""
    from aioevents.redis_streams import RedisStreams, Streams, consume, current_entry

    async def run(client: redis.Redis, prefix: str, n: int) -> Run:
        streams_prefix = f"{prefix}:aioevents"
        # "<prefix>:<event-name>": partitions=None, one stream for the type
        stream = f"{streams_prefix}:{event_name(StreamPing)}"
        handler = f"{prefix.replace(':', '.')}.noop"  # the group's name: the run's own
        tally = Tally(n)
        entries = _envelopes(n, event_name(StreamPing))
        transport = RedisStreams(REDIS_URL)
        streams = Streams(transport, prefix=streams_prefix)
        buses = []
        for _ in range(CONSUMERS):
            bus = EventBus()

            @bus.on(StreamPing, name=handler)
            async def noop(event: StreamPing) -> None:
                entry = current_entry()
                assert entry is not None  # a handler fed by consume() runs for an entry
                tally.note(entry.envelope.headers["sent"])

            consume(bus, StreamPing, streams=streams, concurrency=CONCURRENCY)
            buses.append(bus)
        async with transport, AsyncExitStack() as running:
            for bus in buses:
                await running.enter_async_context(bus)
            await _joined(client, stream, handler)
            started = await produce(client, stream, entries)
            await asyncio.wait_for(tally.done.wait(), WAIT)
            await _settled(client, stream, handler, tally)
        return Run.between(started, tally.finished, tally.latencies())

    return run


# -- the scenario -----------------------------------------------------------------------------

RAW = "raw redis-py loop, 4 x XREADGROUP 100 + XACK"
FASTSTREAM = "FastStream, 4 StreamSub consumers, acks"
AIOEVENTS = "aioevents, 4 consumers x concurrency 16"
ALONE = "(producer alone, no consumer)"
GOALS = (
    "[12.1] streams: aioevents events/s ÷ FastStream's",
    "[12.2] streams: aioevents events/s ÷ the raw loop's",
)


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), 2).close()
    except OSError:
        return False
    return True


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@asynccontextmanager
async def _redis(prefix: str) -> AsyncIterator[redis.Redis]:
    """A client for the run; afterwards every key under its prefix, or naming its random
    part (an engine's own keys for the group), is deleted: only those."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        token = prefix.rpartition(":")[2]
        keys = [key async for key in client.scan_iter(match=f"*{token}*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@dataclass
class Results:
    runs: dict[str, list[Run]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # contender -> why


async def _measure(size: Size, cases: dict[str, Case], results: Results) -> None:
    prefix = f"bench-streams:{uuid.uuid4().hex[:10]}"
    async with _redis(prefix) as client:
        for name, case in cases.items():  # untimed: imports, connections, caches
            await _attempt(name, case, client, f"{prefix}:warm", size.warm_up, results)
        names = list(cases)
        for round_ in range(size.rounds):
            shift = round_ % len(names)
            for name in [*names[shift:], *names[:shift]]:
                await _attempt(name, cases[name], client, f"{prefix}:{round_}", size.events,
                               results)  # fmt: skip


async def _attempt(
    name: str, case: Case, client: redis.Redis, prefix: str, n: int, results: Results
) -> None:
    """Run a case; aioevents' failures are noted and it is left out from then on."""
    if name in results.unavailable:
        return
    try:
        run = await case(client, prefix, n)
    except Exception as exc:
        if name != AIOEVENTS:
            raise
        results.unavailable[name] = f"{type(exc).__name__}: {exc}"
        return
    if not prefix.endswith(":warm"):
        results.runs.setdefault(name, []).append(run)


def _percentile(values: Sequence[float], percent: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(percent / 100 * (len(ordered) - 1)))]


def _ratios(runs: Sequence[Run], others: Sequence[Run]) -> list[float]:
    """events/s over the other's, per round: the other's time over this one's."""
    return [other.seconds / run.seconds for run, other in zip(runs, others, strict=True)]


def _table(size: Size, results: Results) -> None:
    n = size.events
    runs = results.runs
    width = max(map(len, (RAW, FASTSTREAM, AIOEVENTS, ALONE))) + 2
    print(
        " " * width + f"{'events/s':>10}{'vs FastStream':>15}{'vs raw':>8}{'p50 ms':>9}"
        f"{'p99 ms':>9}{'CPU µs/ev':>11}{'CPU':>6}"
    )
    for name in (RAW, FASTSTREAM, AIOEVENTS, ALONE):
        if name in runs:
            print(f"{name:<{width}}{_row(runs, name, n)}")
        elif name in results.unavailable:
            print(f"{name:<{width}}not available (below)")


def _row(runs: dict[str, list[Run]], name: str, n: int) -> str:
    mine = runs[name]
    rate = statistics.median(n / run.seconds for run in mine)
    versus = [
        f"{statistics.median(_ratios(mine, runs[other])):.2f}x"
        if other in runs and name != ALONE
        else "-"
        for other in (FASTSTREAM, RAW)
    ]
    latency = ["-", "-"]
    if mine[0].latencies:
        latency = [
            figure(statistics.median(_percentile(run.latencies, p) for run in mine))
            for p in (50, 99)
        ]
    cpu_per_event = statistics.median(run.cpu / n * 1e6 for run in mine)
    share = statistics.median(run.cpu / run.seconds for run in mine)
    return (
        f"{rate:>10,.0f}{versus[0]:>15}{versus[1]:>8}{latency[0]:>9}{latency[1]:>9}"
        f"{cpu_per_event:>11.1f}{share:>6.0%}"
    )


def _goals(results: Results) -> list[Verdict]:
    runs = results.runs
    goals: list[Verdict] = []
    for text, other, limit in zip(GOALS, (FASTSTREAM, RAW), (FASTSTREAM_GOAL, RAW_GOAL),
                                  strict=True):  # fmt: skip
        if AIOEVENTS not in runs:
            why = results.unavailable.get(AIOEVENTS, "aioevents did not run")
            goals.append(Skipped(text, f"aioevents: not available ({why})"))
        elif other not in runs:
            goals.append(Skipped(text, f"{other} did not run"))
        else:
            goals.append(Goal(text, _ratios(runs[AIOEVENTS], runs[other]), limit, ">="))
    return goals


def main(quick: bool = False) -> list[Verdict]:
    """Print events/s and latency of aioevents' stream consumers, FastStream's and raw's."""
    if not _reachable(REDIS_URL):
        reason = f"Redis not reachable at {REDIS_URL}"
        print(f"\n== streams: skipped: {reason} ==")
        return [Skipped(goal, reason) for goal in GOALS]
    size = QUICK if quick else FULL
    peer = _version("faststream")
    print(
        f"\n== streams: Redis Streams, 1 group x {CONSUMERS} consumers, no-op handler, "
        f"against {'FastStream ' + peer if peer else 'FastStream (not installed)'} =="
    )
    results = Results()
    cases: dict[str, Case] = {RAW: raw_loop}
    if peer is not None:
        cases[FASTSTREAM] = faststream
    try:
        cases[AIOEVENTS] = aioevents_case()
    except Exception as exc:  # the library's stream modules may be missing or broken
        results.unavailable[AIOEVENTS] = f"{type(exc).__name__}: {exc}"
    cases[ALONE] = producer_alone
    asyncio.run(_measure(size, cases, results))
    print(
        f"\n[12.1] [12.2] {size.events:,} events XADDed {BATCH} per pipeline while the consumers "
        f"run ({size.rounds} rounds, order rotated; medians)"
    )
    print("   events/s: n ÷ (first XADD to the last handler's end); vs: this row's events/s ÷")
    print("   the other's in the same round; p50/p99: send time to handler start; CPU: this")
    print("   process's CPU time (producer included) per event, and ÷ the wall time")
    _table(size, results)
    if AIOEVENTS in results.unavailable:
        print(f"   aioevents: not available ({results.unavailable[AIOEVENTS]})")
    goals = _goals(results)
    for goal in goals:
        print(f"   {goal}")
    return goals


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:])
