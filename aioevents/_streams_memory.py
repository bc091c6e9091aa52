"""A transport in this process's memory: Redis Streams' model, for tests and the demo.

It keeps what Redis keeps (entries, groups with their last delivered id and pending entries,
consumers, leases) in dicts, with the same rules, so code that runs on it runs on Redis. It
is the reference the conformance kit was written against; nothing outlives the process.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio

from ._checks import check_positive_int
from ._transport import DeadLetter, Entry, Envelope, GroupInfo, Transport, Trimmed

__all__ = ["MemoryStreams"]

_Id = tuple[int, int]


@dataclass
class _Pending:
    consumer: str
    delivered_at: float  # time.monotonic() of the last delivery or keep
    deliveries: int


@dataclass
class _Group:
    last_delivered: _Id = (0, 0)
    pending: dict[_Id, _Pending] = field(default_factory=dict)  # in id order
    consumers: dict[str, float] = field(default_factory=dict)  # name -> last seen


@dataclass
class _Stream:
    entries: dict[_Id, Envelope] = field(default_factory=dict)  # in id order
    groups: dict[str, _Group] = field(default_factory=dict)
    last_id: _Id = (0, 0)
    appended: anyio.Event = field(default_factory=anyio.Event)


class MemoryStreams(Transport):
    """Streams, consumer groups and leases in memory; for tests, the demo, one process.

    >>> MemoryStreams(max_len=10_000)
    MemoryStreams(max_len=10000)
    """

    system = "aioevents.memory"

    def __init__(self, *, max_len: int | None = None) -> None:
        if max_len is not None:
            check_positive_int("max_len", max_len)
        self.max_len = max_len
        self._streams: dict[str, _Stream] = {}
        self._leases: dict[str, tuple[str, float]] = {}  # name -> owner, expiry
        self._alive: dict[str, dict[str, float]] = {}  # group -> consumer -> expiry
        self._letters: dict[tuple[str, str], DeadLetter] = {}  # (id, dead stream) -> letter

    def __repr__(self) -> str:
        return f"MemoryStreams(max_len={self.max_len})"

    def _stream(self, name: str) -> _Stream:
        stream = self._streams.get(name)
        if stream is None:
            stream = self._streams[name] = _Stream()
        return stream

    def _group(self, stream: str, group: str) -> _Group:
        found = self._streams.get(stream)
        if found is None or group not in found.groups:
            raise LookupError(f"no group {group!r} on stream {stream!r} (NOGROUP)")
        return found.groups[group]

    async def publish(self, stream: str, envelope: Envelope) -> str:
        await anyio.lowlevel.checkpoint()
        return _text(_append(self._stream(stream), envelope))

    async def create_group(self, stream: str, group: str) -> None:
        await anyio.lowlevel.checkpoint()
        self._stream(stream).groups.setdefault(group, _Group())

    async def read_new(
        self, streams: Sequence[str], group: str, consumer: str, *, count: int, block: float
    ) -> list[Entry]:
        await anyio.lowlevel.checkpoint()
        with anyio.move_on_after(block):
            while True:
                entries = self._take_new(streams, group, consumer, count)
                if entries or block == 0:
                    return entries
                waits = [self._streams[name].appended for name in streams]
                async with anyio.create_task_group() as waiting:
                    for appended in waits:
                        waiting.start_soon(_wait_then_cancel, appended, waiting.cancel_scope)
        return []

    def _take_new(
        self, streams: Sequence[str], group: str, consumer: str, count: int
    ) -> list[Entry]:
        # No await in here: what is taken is returned, a cancellation cannot come between.
        taken: list[Entry] = []
        for name in streams:
            found, state = self._streams.get(name), self._group(name, group)
            assert found is not None
            state.consumers[consumer] = time.monotonic()
            for entry_id, envelope in found.entries.items():
                if len(taken) == count:
                    break
                if entry_id > state.last_delivered:
                    state.last_delivered = entry_id
                    state.pending[entry_id] = _Pending(consumer, time.monotonic(), 1)
                    taken.append(Entry(name, _text(entry_id), envelope, 1))
        return taken

    async def read_pending(
        self, stream: str, group: str, consumer: str, *, count: int
    ) -> list[Entry]:
        await anyio.lowlevel.checkpoint()
        state, entries = self._group(stream, group), self._streams[stream].entries
        state.consumers[consumer] = time.monotonic()
        found: list[Entry] = []
        for entry_id, pending in list(state.pending.items()):
            if len(found) == count:
                break
            if pending.consumer != consumer:
                continue
            if entry_id not in entries:  # trimmed away: nothing left to deliver
                del state.pending[entry_id]
                continue
            pending.deliveries += 1
            pending.delivered_at = time.monotonic()
            found.append(Entry(stream, _text(entry_id), entries[entry_id], pending.deliveries))
        return found

    async def claim_idle(
        self, stream: str, group: str, consumer: str, *, min_idle: float, count: int
    ) -> tuple[list[Entry], list[str]]:
        await anyio.lowlevel.checkpoint()
        state, entries = self._group(stream, group), self._streams[stream].entries
        now = time.monotonic()
        state.consumers.setdefault(consumer, now)
        claimed: list[Entry] = []
        gone: list[str] = []
        for entry_id, pending in list(state.pending.items()):
            if len(claimed) == count:
                break
            if now - pending.delivered_at < min_idle:
                continue
            if entry_id not in entries:
                del state.pending[entry_id]
                gone.append(_text(entry_id))
                continue
            pending.consumer, pending.delivered_at = consumer, now
            pending.deliveries += 1
            claimed.append(Entry(stream, _text(entry_id), entries[entry_id], pending.deliveries))
        return claimed, gone

    async def keep(self, stream: str, group: str, consumer: str, ids: Sequence[str]) -> list[str]:
        await anyio.lowlevel.checkpoint()
        state, now, kept = self._group(stream, group), time.monotonic(), []
        for text in ids:
            pending = state.pending.get(_id(text))
            if pending is not None and pending.consumer == consumer:
                pending.delivered_at = now
                kept.append(text)
        return kept

    async def redeliver(self, stream: str, group: str, consumer: str, entry_id: str) -> int:
        await anyio.lowlevel.checkpoint()
        pending = self._group(stream, group).pending.get(_id(entry_id))
        if pending is None or pending.consumer != consumer:
            return 0
        pending.deliveries += 1
        pending.delivered_at = time.monotonic()
        return pending.deliveries

    async def ack(self, stream: str, group: str, ids: Sequence[str]) -> None:
        await anyio.lowlevel.checkpoint()
        state = self._group(stream, group)
        for text in ids:
            state.pending.pop(_id(text), None)

    async def dead_letter(self, entry: Entry, group: str, *, dead_stream: str, reason: str) -> None:
        await anyio.lowlevel.checkpoint()
        state = self._group(entry.stream, group)
        if _id(entry.id) not in state.pending:  # acknowledged or dead already: not twice
            return
        found = self._stream(dead_stream)  # a stream of its own, as on Redis
        letter_id = _text(_append(found, entry.envelope))
        self._letters[letter_id, dead_stream] = DeadLetter(
            letter_id, entry.stream, entry.id, group, reason, entry.deliveries, entry.envelope
        )
        state.pending.pop(_id(entry.id), None)

    async def dead_letters(self, dead_stream: str, *, count: int = 100) -> list[DeadLetter]:
        await anyio.lowlevel.checkpoint()
        found = self._streams.get(dead_stream)
        ids = list(found.entries)[:count] if found is not None else []
        return [self._letters[_text(entry_id), dead_stream] for entry_id in ids]

    async def redrive(self, dead_stream: str, ids: Sequence[str]) -> int:
        await anyio.lowlevel.checkpoint()
        moved = 0
        for letter in self._take_letters(dead_stream, ids):
            _append(self._stream(letter.stream), letter.envelope)
            moved += 1
        return moved

    async def remove_dead_letters(self, dead_stream: str, ids: Sequence[str]) -> int:
        await anyio.lowlevel.checkpoint()
        return len(self._take_letters(dead_stream, ids))

    def _take_letters(self, dead_stream: str, ids: Sequence[str]) -> list[DeadLetter]:
        found = self._streams.get(dead_stream)
        taken = []
        for text in dict.fromkeys(ids):  # an id twice in one call is one letter
            letter = self._letters.pop((text, dead_stream), None)
            if letter is not None and found is not None:
                found.entries.pop(_id(text), None)
                taken.append(letter)
        return taken

    async def remove_idle_consumers(
        self, stream: str, group: str, *, idle: float, keep: str
    ) -> list[str]:
        await anyio.lowlevel.checkpoint()
        state, now = self._group(stream, group), time.monotonic()
        busy = {pending.consumer for pending in state.pending.values()}
        removed = [
            name
            for name, seen in state.consumers.items()
            if name != keep and name not in busy and now - seen > idle
        ]
        for name in removed:
            del state.consumers[name]
        return removed

    async def remove_consumer(self, stream: str, group: str, consumer: str) -> bool:
        await anyio.lowlevel.checkpoint()
        found = self._streams.get(stream)
        state = None if found is None else found.groups.get(group)
        if state is None or consumer not in state.consumers:
            return False
        if any(pending.consumer == consumer for pending in state.pending.values()):
            return False
        del state.consumers[consumer]
        return True

    async def trim(self, stream: str) -> Trimmed:
        await anyio.lowlevel.checkpoint()
        found = self._streams.get(stream)
        if found is None:
            return Trimmed(stream, 0)
        removed = capped = 0
        if found.groups:
            needed = min(_oldest_needed(group) for group in found.groups.values())
            for entry_id in [e for e in found.entries if e < needed]:
                del found.entries[entry_id]
                removed += 1
        if self.max_len is not None:
            while len(found.entries) > self.max_len:
                del found.entries[next(iter(found.entries))]
                capped += 1
        return Trimmed(stream, removed, capped, len(found.entries))

    async def groups(self, stream: str) -> list[GroupInfo]:
        await anyio.lowlevel.checkpoint()
        found = self._streams.get(stream)
        if found is None:
            return []
        return [
            GroupInfo(
                stream,
                name,
                len(state.consumers),
                len(state.pending),
                sum(entry_id > state.last_delivered for entry_id in found.entries),
            )
            for name, state in found.groups.items()
        ]

    async def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        await anyio.lowlevel.checkpoint()
        now = time.monotonic()
        holder = self._leases.get(name)
        if holder is not None and holder[0] != owner and holder[1] > now:
            return False
        self._leases[name] = (owner, now + ttl)
        return True

    async def release_lease(self, name: str, owner: str) -> None:
        await anyio.lowlevel.checkpoint()
        if self._leases.get(name, ("", 0.0))[0] == owner:
            del self._leases[name]

    async def heartbeat(self, group: str, consumer: str, ttl: float) -> list[str]:
        await anyio.lowlevel.checkpoint()
        now = time.monotonic()
        alive = self._alive.setdefault(group, {})
        alive[consumer] = now + ttl
        for name in [name for name, expiry in alive.items() if expiry <= now]:
            del alive[name]
        return sorted(alive)

    async def leave(self, group: str, consumer: str) -> None:
        await anyio.lowlevel.checkpoint()
        self._alive.get(group, {}).pop(consumer, None)


def _append(stream: _Stream, envelope: Envelope) -> _Id:
    ms = time.time_ns() // 1_000_000
    last_ms, last_seq = stream.last_id
    entry_id = (ms, 0) if ms > last_ms else (last_ms, last_seq + 1)
    stream.last_id = entry_id
    stream.entries[entry_id] = envelope
    stream.appended.set()
    stream.appended = anyio.Event()
    return entry_id


def _oldest_needed(group: _Group) -> _Id:
    """The oldest entry a group still needs: its oldest pending, else the next undelivered."""
    if group.pending:
        return min(next(iter(group.pending)), _after(group.last_delivered))
    return _after(group.last_delivered)


def _after(entry_id: _Id) -> _Id:
    return (entry_id[0], entry_id[1] + 1)


def _id(text: str) -> _Id:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _text(entry_id: _Id) -> str:
    return f"{entry_id[0]}-{entry_id[1]}"


async def _wait_then_cancel(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
