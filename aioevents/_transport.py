"""What a stream engine must do for aioevents: the few operations every transport provides.

A transport moves envelopes through named, append-only streams, and keeps for each consumer
group what was delivered to which consumer and not yet acknowledged (its pending entries), as
Redis Streams do. `aioevents.streams` builds everything else on these operations: the
consumers, retries, dead letters, retention, per-key order. A transport knows nothing of
events or handlers; its names are plain strings, chosen by the layer above:

- a stream: ``"<prefix>:<event-name>"``, or ``"<prefix>:<event-name>:<partition>"`` when the
  stream is split into partitions for per-key order;
- a group: a handler's stable name; a consumer: ``"<host>:<pid>:<random>"``, new per run;
- a lease: a short name the layer above makes up (one per partition and group).

Every operation may raise `OSError` (`ConnectionError`, `TimeoutError`) when the engine cannot
be reached: the layer above retries, nothing is lost because nothing is acknowledged.

`aioevents.testing.TransportConformance` holds every transport to the same behaviour.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["DeadLetter", "Entry", "Envelope", "GroupInfo", "Transport", "Trimmed"]


@dataclass(frozen=True, slots=True)
class Envelope:
    """An event as it travels: its id, name and version, key, payload (JSON text) and headers."""

    id: str
    name: str
    version: int
    payload: str
    key: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Entry:
    """An envelope read from a stream: its entry id there, and how often it was delivered.

    ``deliveries`` counts this delivery: 1 the first time a group's consumer reads it.
    """

    stream: str
    id: str
    envelope: Envelope
    deliveries: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An entry a group gave up on, as kept in the dead-letter stream."""

    id: str  # its id in the dead-letter stream
    stream: str  # where it came from
    entry_id: str  # its id there
    group: str  # the handler that failed it
    reason: str
    deliveries: int
    envelope: Envelope


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """How far a consumer group is: for metrics, the panel and the trimming."""

    stream: str
    group: str
    consumers: int
    pending: int  # delivered to a consumer, not yet acknowledged
    lag: int | None  # in the stream, not yet delivered to any consumer of the group


@dataclass(frozen=True, slots=True)
class Trimmed:
    """What one `Transport.trim` removed: ``removed`` entries every group had acknowledged,
    plus ``capped`` more because the stream was past its cap (some maybe unacknowledged)."""

    stream: str
    removed: int
    capped: int = 0
    length: int = 0  # the stream's length afterwards


class Transport(abc.ABC):
    """The operations of a stream engine with consumer groups (the model of Redis Streams).

    Entry ids are strings that sort as the engine orders them: ``"<ms>-<seq>"`` on Redis;
    a transport's `id_key` turns one into a value that sorts the same way.
    """

    #: Entries kept at most per stream when groups fall behind (None: no cap). Past it `trim`
    #: removes the oldest even if a group has not acknowledged them, and says how many.
    max_len: int | None = None

    #: The engine's name for traces (OpenTelemetry's ``messaging.system``): ``"redis"`` for
    #: `RedisStreams`, ``"aioevents.memory"`` for `MemoryStreams`.
    system: str = "aioevents.streams"

    @abc.abstractmethod
    async def publish(self, stream: str, envelope: Envelope) -> str:
        """Append the envelope; return its entry id once the engine has it."""

    @abc.abstractmethod
    async def create_group(self, stream: str, group: str) -> None:
        """Create the group (and the stream) if missing, reading from the stream's start."""

    @abc.abstractmethod
    async def read_new(
        self, streams: Sequence[str], group: str, consumer: str, *, count: int, block: float
    ) -> list[Entry]:
        """Deliver up to ``count`` entries no consumer of the group has had yet, oldest first.

        They become pending for ``consumer``. Waits up to ``block`` seconds (0: not at all)
        for one to arrive; returns ``[]`` when none did.
        """

    @abc.abstractmethod
    async def read_pending(
        self, stream: str, group: str, consumer: str, *, count: int
    ) -> list[Entry]:
        """The consumer's own pending entries, oldest first, each counted as one more delivery."""

    @abc.abstractmethod
    async def claim_idle(
        self, stream: str, group: str, consumer: str, *, min_idle: float, count: int
    ) -> tuple[list[Entry], list[str]]:
        """Move up to ``count`` entries pending for longer than ``min_idle`` seconds (any
        consumer's) to ``consumer``, oldest first, each counted as one more delivery.

        Also returns the ids of pending entries the stream no longer holds (trimmed by the
        cap): no longer pending afterwards.
        """

    @abc.abstractmethod
    async def keep(self, stream: str, group: str, consumer: str, ids: Sequence[str]) -> list[str]:
        """Reset the idle time of the consumer's pending entries (they are still being worked
        on), without counting a delivery; return the ids that are still its own."""

    @abc.abstractmethod
    async def redeliver(self, stream: str, group: str, consumer: str, entry_id: str) -> int:
        """Count one more delivery of the consumer's pending entry (a retry); return the new
        count, or 0 if the entry is no longer the consumer's."""

    @abc.abstractmethod
    async def ack(self, stream: str, group: str, ids: Sequence[str]) -> None:
        """Acknowledge the entries: no longer pending, never delivered to the group again."""

    @abc.abstractmethod
    async def dead_letter(self, entry: Entry, group: str, *, dead_stream: str, reason: str) -> None:
        """Append the entry with the group and reason to ``dead_stream``, and acknowledge it,
        together: either both happen or neither does."""

    @abc.abstractmethod
    async def dead_letters(self, dead_stream: str, *, count: int = 100) -> list[DeadLetter]:
        """The oldest ``count`` dead letters in ``dead_stream``."""

    @abc.abstractmethod
    async def redrive(self, dead_stream: str, ids: Sequence[str]) -> int:
        """Append each dead letter's envelope to the stream it came from again and remove it
        from ``dead_stream``, together (both or neither); return how many moved. Ids no longer
        in ``dead_stream`` are skipped: a retry sent twice publishes once."""

    @abc.abstractmethod
    async def remove_dead_letters(self, dead_stream: str, ids: Sequence[str]) -> int:
        """Remove the dead letters from ``dead_stream``; return how many were there."""

    @abc.abstractmethod
    async def remove_idle_consumers(
        self, stream: str, group: str, *, idle: float, keep: str
    ) -> list[str]:
        """Remove the group's consumers (other than ``keep``) idle for more than ``idle``
        seconds with nothing pending, atomically (a consumer that has pending entries is never
        removed); return their names."""

    @abc.abstractmethod
    async def remove_consumer(self, stream: str, group: str, consumer: str) -> bool:
        """Remove ``consumer`` from the group if it has nothing pending (a clean leave);
        False if it still has pending entries (left for others to claim) or is not there."""

    @abc.abstractmethod
    async def trim(self, stream: str) -> Trimmed:
        """Remove the entries every group of the stream has acknowledged (all entries older
        than the oldest entry some group still needs: pending, or not yet delivered), then,
        past `max_len`, the oldest entries beyond it. A stream without groups is only capped."""

    @abc.abstractmethod
    async def groups(self, stream: str) -> list[GroupInfo]:
        """The stream's groups with their pending count and lag; ``[]`` if there is no stream."""

    @abc.abstractmethod
    async def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Take the lease for ``ttl`` seconds if it is free or already ``owner``'s (then its
        time is renewed); False if another owner holds it."""

    @abc.abstractmethod
    async def release_lease(self, name: str, owner: str) -> None:
        """Free the lease if ``owner`` holds it."""

    @abc.abstractmethod
    async def heartbeat(self, group: str, consumer: str, ttl: float) -> list[str]:
        """Say ``consumer`` of ``group`` is alive for ``ttl`` more seconds; return the names
        of the group's consumers alive now, sorted (for sharing partitions fairly)."""

    @abc.abstractmethod
    async def leave(self, group: str, consumer: str) -> None:
        """Say ``consumer`` is no longer alive (it stops): no longer in `heartbeat`'s list."""

    @staticmethod
    def id_key(entry_id: str) -> tuple[int, int]:
        """A sort key for entry ids of the form ``"<ms>-<seq>"``."""
        ms, _, seq = entry_id.partition("-")
        return int(ms), int(seq or 0)

    async def aclose(self) -> None:  # noqa: B027 - a transport with nothing to close
        """Close the connections the transport opened itself (not ones it was given)."""

    async def __aenter__(self) -> Transport:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
