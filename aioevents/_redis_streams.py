"""Redis Streams as an aioevents transport: `RedisStreams`, on redis-py's asyncio client.

Redis 7.0 commands only. The hot path (`publish`, `read_new` from one stream, `ack`) is one
command each, one round trip. Every operation that reads and then writes is one Lua script, so
nothing can slip in between (an entry reclaimed by another consumer, a consumer that just read);
scripts are redis-py ``Script`` objects: sent by SHA, loaded again after a server restart.

Keys: the stream and lease names the layer above gives, as they are; the live consumers of a
group in a sorted set ``HEARTBEATS + group`` (score: when the consumer's time is up, in
milliseconds by the Redis server's clock), which expires when its last consumer's time is up.
Groups of the same name share that set, whatever their streams: group names must be unique
per Redis database. Scripts touch several keys (a stream and its dead-letter stream, the
partitions read together): one Redis server, not a cluster.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar, cast

import redis.exceptions
from redis.asyncio import BlockingConnectionPool, Redis

from ._exceptions import ConfigurationError
from ._transport import DeadLetter, Entry, Envelope, GroupInfo, Transport, Trimmed

__all__ = ["HEARTBEATS", "RedisStreams"]

logger = logging.getLogger("aioevents.streams")

#: The prefix of each group's heartbeat key. Not a stream name: those are "<prefix>:<event>".
HEARTBEATS = "aioevents-heartbeats:"

Field = str | int  # a value written to a stream entry
P = ParamSpec("P")
R = TypeVar("R")

# Shared Lua helpers: a flat reply [k1, v1, k2, v2, ...] as a table, and entry id order
# (compared as digit strings: ids go past the 2^53 a Lua number holds exactly).
_LUA_HELPERS = """
local function fields(flat)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end
local function older(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  if #am ~= #bm then return #am < #bm end
  if am ~= bm then return am < bm end
  if #as ~= #bs then return #as < #bs end
  return as < bs
end
local function consumers(stream, group)
  local reply = redis.pcall('XINFO', 'CONSUMERS', stream, group)
  if reply.err then
    if string.find(reply.err, 'NOGROUP', 1, true) or string.find(reply.err, 'no such key', 1, true)
    then return {} end
    error(reply)
  end
  return reply
end
"""

# KEYS: the streams; ARGV: group, consumer, count. The `count` oldest entries no consumer of
# the group has had, across the streams (peeked first, then read: exactly those). When there
# are none, also each stream's last delivered id, to wait for a newer entry with XREAD.
_READ_NEW_MANY = (
    _LUA_HELPERS
    + """
local group, consumer, count = ARGV[1], ARGV[2], tonumber(ARGV[3])
local last, candidates = {}, {}
for i, stream in ipairs(KEYS) do
  if redis.call('EXISTS', stream) == 1 then
    for _, flat in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
      local g = fields(flat)
      if g.name == group then last[i] = g['last-delivered-id'] end
    end
  end
  if not last[i] then
    return redis.error_reply('NOGROUP No such key ' .. stream .. ' or consumer group ' .. group)
  end
  for _, entry in ipairs(redis.call('XRANGE', stream, '(' .. last[i], '+', 'COUNT', count)) do
    table.insert(candidates, {entry[1], i})
  end
end
if #candidates == 0 then return {{}, last} end
table.sort(candidates, function(a, b)
  if a[1] == b[1] then return a[2] < b[2] end
  return older(a[1], b[1])
end)
local take = {}
for k = 1, math.min(count, #candidates) do
  local i = candidates[k][2]
  take[i] = (take[i] or 0) + 1
end
local out = {}
for i, n in pairs(take) do
  local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', n,
    'STREAMS', KEYS[i], '>')
  for _, entry in ipairs(reply[1][2]) do table.insert(out, {i, entry[1], entry[2]}) end
end
return {out, {}}
"""
)

# KEYS: stream; ARGV: group, consumer, count. The consumer's own pending entries (reading
# them counts a delivery), each with its delivery count; an entry the cap trimmed away has no
# fields: it is acknowledged, there is nothing left to deliver.
_READ_PENDING = """
local stream, group = KEYS[1], ARGV[1]
local reply = redis.call('XREADGROUP', 'GROUP', group, ARGV[2], 'COUNT', ARGV[3],
  'STREAMS', stream, '0')
local out = {}
for _, entry in ipairs(reply[1][2]) do
  local id = entry[1]
  if entry[2] then
    table.insert(out, {id, entry[2], redis.call('XPENDING', stream, group, id, id, 1)[1][4]})
  else
    redis.call('XACK', stream, group, id)
  end
end
return out
"""

# KEYS: stream; ARGV: group, consumer, min-idle ms, count. XAUTOCLAIM over the whole pending
# list until `count` are claimed; Redis 7.0 already drops the trimmed ones (its third reply).
_CLAIM_IDLE = """
local stream, group, consumer, count = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[4])
local cursor, claimed, deleted = '0-0', {}, {}
repeat
  local reply = redis.call('XAUTOCLAIM', stream, group, consumer, ARGV[3], cursor,
    'COUNT', count - #claimed)
  cursor = reply[1]
  for _, entry in ipairs(reply[2]) do
    local id = entry[1]
    table.insert(claimed, {id, entry[2], redis.call('XPENDING', stream, group, id, id, 1)[1][4]})
  end
  for _, id in ipairs(reply[3]) do table.insert(deleted, id) end
until cursor == '0-0' or #claimed >= count
return {claimed, deleted}
"""

# KEYS: stream; ARGV: group, consumer, ids... Only entries still pending for this consumer
# (never one another consumer reclaimed meanwhile); XCLAIM JUSTID resets the idle time without
# counting a delivery, and drops an entry the cap trimmed away.
_KEEP = """
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local kept = {}
for i = 3, #ARGV do
  local pending = redis.call('XPENDING', stream, group, ARGV[i], ARGV[i], 1)[1]
  if pending and pending[2] == consumer
    and redis.call('XCLAIM', stream, group, consumer, 0, ARGV[i], 'JUSTID')[1] then
    table.insert(kept, ARGV[i])
  end
end
return kept
"""

# KEYS: stream; ARGV: group, consumer, id. One more delivery of the consumer's own entry.
_REDELIVER = """
local stream, group, consumer, id = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local pending = redis.call('XPENDING', stream, group, id, id, 1)[1]
if not pending or pending[2] ~= consumer then return 0 end
local count = pending[4] + 1
if redis.call('XCLAIM', stream, group, consumer, 0, id, 'RETRYCOUNT', count, 'JUSTID')[1] then
  return count
end
return 0
"""

# KEYS: dead stream, stream; ARGV: group, entry id, fields... Checked first, written after: a
# failing script stops before its first write, and an entry already acknowledged (by another
# consumer that dead-lettered it too) is not written twice.
_DEAD_LETTER = """
local id = ARGV[2]
if not redis.call('XPENDING', KEYS[2], ARGV[1], id, id, 1)[1] then return 0 end
redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
redis.call('XACK', KEYS[2], ARGV[1], id)
return 1
"""

# KEYS: dead stream, stream; ARGV: dead letter id, the envelope's fields... A letter still there
# goes back to its stream and leaves the dead stream at once: a retry sent twice publishes once.
_REDRIVE = """
local id = ARGV[1]
if #redis.call('XRANGE', KEYS[1], id, id) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
redis.call('XDEL', KEYS[1], id)
return 1
"""

# KEYS: stream; ARGV: group, idle ms, the consumer to keep. DELCONSUMER drops a consumer's
# pending entries: only consumers with none are removed, in the same script that looks.
_REMOVE_IDLE_CONSUMERS = (
    _LUA_HELPERS
    + """
local removed = {}
for _, flat in ipairs(consumers(KEYS[1], ARGV[1])) do
  local c = fields(flat)
  if c.name ~= ARGV[3] and c.pending == 0 and c.idle > tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], c.name)
    table.insert(removed, c.name)
  end
end
return removed
"""
)

# KEYS: stream; ARGV: group, consumer.
_REMOVE_CONSUMER = (
    _LUA_HELPERS
    + """
for _, flat in ipairs(consumers(KEYS[1], ARGV[1])) do
  local c = fields(flat)
  if c.name == ARGV[2] then
    if c.pending > 0 then return 0 end
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], c.name)
    return 1
  end
end
return 0
"""
)

# KEYS: stream; ARGV: max_len or "". What each group still needs starts at its oldest pending
# entry, or else at the first entry after its last delivered one (none: it needs nothing);
# entries older than what any group needs go (MINID, exact). Then the cap, counted apart.
_TRIM = (
    _LUA_HELPERS
    + """
local stream = KEYS[1]
if redis.call('EXISTS', stream) == 0 then return {0, 0, 0} end
local groups = redis.call('XINFO', 'GROUPS', stream)
local removed, capped = 0, 0
if #groups > 0 then
  local oldest = nil
  for _, flat in ipairs(groups) do
    local g = fields(flat)
    local needed = nil
    local summary = redis.call('XPENDING', stream, g.name)
    if summary[1] > 0 then
      needed = summary[2]
    else
      local after = redis.call('XRANGE', stream, '(' .. g['last-delivered-id'], '+', 'COUNT', 1)[1]
      if after then needed = after[1] end
    end
    if needed and (not oldest or older(needed, oldest)) then oldest = needed end
  end
  if oldest then
    removed = redis.call('XTRIM', stream, 'MINID', oldest)
  else
    removed = redis.call('XTRIM', stream, 'MAXLEN', 0)
  end
end
local max_len = tonumber(ARGV[1])
if max_len and redis.call('XLEN', stream) > max_len then
  capped = redis.call('XTRIM', stream, 'MAXLEN', max_len)
end
return {removed, capped, redis.call('XLEN', stream)}
"""
)

_GROUPS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
return redis.call('XINFO', 'GROUPS', KEYS[1])
"""

# KEYS: lease; ARGV: owner, ttl ms.
_ACQUIRE_LEASE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: heartbeat set; ARGV: consumer, ttl ms. One clock for every consumer: the server's.
_HEARTBEAT = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], math.floor(tonumber(last[2])))
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


def _translated(method: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Raise redis-py's connection and timeout errors as the builtin `OSError`s the layer
    above retries on (redis-py's are not `OSError`s). Authentication errors stay as they are:
    a wrong password is no outage to wait out."""

    @functools.wraps(method)
    async def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except redis.exceptions.TimeoutError as exc:
            raise TimeoutError(str(exc)) from exc
        except (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError):
            raise
        except redis.exceptions.ConnectionError as exc:
            raise ConnectionError(str(exc)) from exc

    return run


class RedisStreams(Transport):
    """The `Transport` on Redis Streams (7.0 or later), through redis-py's asyncio client.

    ``redis`` is a ``redis.asyncio.Redis`` client, which the caller keeps and closes, or a
    URL, for which the transport makes a client of its own and closes it in `aclose`. Clients
    with ``decode_responses`` on or off both work. ``max_len`` caps each stream at `trim`
    (None: no cap); entries past it are removed even if a group has not read them, and a
    WARNING on the ``aioevents.streams`` logger says how many. `publish` never caps: the cap
    only applies where `trim` can count what it removed.

    A client whose ``socket_timeout`` is shorter than ``read_new``'s ``block`` times out
    while it waits: leave it unset, or longer than any block.

    Made from a URL, the client's pool holds ``max_connections`` connections, and a call
    waits for a free one rather than fail: every consumer's blocking read holds one for up to
    its ``block``, and a burst of publishes must not fail for want of a connection. A client
    given keeps its own pool: redis-py's default one fails a call at once past its size.
    """

    system = "redis"

    def __init__(
        self, redis: Redis | str, *, max_len: int | None = 1_000_000, max_connections: int = 100
    ) -> None:
        self.max_len = _checked_max_len(max_len)
        if type(max_connections) is not int or max_connections < 1:
            raise ConfigurationError(
                f"RedisStreams(max_connections=...) must be an int >= 1, got {max_connections!r}"
            )
        self._redis, self._owned = _client(redis, max_connections)
        # redis-py leaves execute_command untyped; replies are parsed here, whatever they hold
        self._command = cast(Callable[..., Awaitable[Any]], self._redis.execute_command)
        scripts = self._redis.register_script
        self._read_new_many = scripts(_READ_NEW_MANY)
        self._read_pending = scripts(_READ_PENDING)
        self._claim_idle = scripts(_CLAIM_IDLE)
        self._keep = scripts(_KEEP)
        self._redeliver = scripts(_REDELIVER)
        self._dead_letter = scripts(_DEAD_LETTER)
        self._redrive = scripts(_REDRIVE)
        self._remove_idle_consumers = scripts(_REMOVE_IDLE_CONSUMERS)
        self._remove_consumer = scripts(_REMOVE_CONSUMER)
        self._trim = scripts(_TRIM)
        self._groups = scripts(_GROUPS)
        self._acquire_lease = scripts(_ACQUIRE_LEASE)
        self._release_lease = scripts(_RELEASE_LEASE)
        self._heartbeat = scripts(_HEARTBEAT)

    @_translated
    async def publish(self, stream: str, envelope: Envelope) -> str:
        return _text(await self._command("XADD", stream, "*", *_fields(envelope)))

    @_translated
    async def create_group(self, stream: str, group: str) -> None:
        try:
            await self._command("XGROUP", "CREATE", stream, group, "0", "MKSTREAM")
        except redis.exceptions.ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise

    @_translated
    async def read_new(
        self, streams: Sequence[str], group: str, consumer: str, *, count: int, block: float
    ) -> list[Entry]:
        _check_names("streams", streams)
        _check_count(count)
        wait = _milliseconds("block", block, allow_zero=True)
        if len(streams) == 1:
            return await self._read_one(streams[0], group, consumer, count, wait)
        entries, last_ids = await self._read_many(streams, group, consumer, count)
        if entries or not wait:
            return entries
        # Nothing yet: wait for an entry newer than what the group had, then read for real.
        args = ("XREAD", "BLOCK", wait, "COUNT", 1, "STREAMS", *streams, *last_ids)
        if not await self._command(*args):
            return []
        return (await self._read_many(streams, group, consumer, count))[0]

    async def _read_one(
        self, stream: str, group: str, consumer: str, count: int, wait: int
    ) -> list[Entry]:
        args: list[object] = ["XREADGROUP", "GROUP", group, consumer, "COUNT", count]
        if wait:  # BLOCK 0 would wait for ever
            args += ["BLOCK", wait]
        reply = await self._command(*args, "STREAMS", stream, ">")
        return [
            Entry(stream, _text(entry_id), _envelope(fields), 1)
            for entry_id, fields in _entries_of(reply)
        ]

    async def _read_many(
        self, streams: Sequence[str], group: str, consumer: str, count: int
    ) -> tuple[list[Entry], list[str]]:
        read, last_ids = await self._read_new_many(streams, [group, consumer, count])
        entries = [
            Entry(streams[index - 1], _text(entry_id), _envelope(fields), 1)
            for index, entry_id, fields in read
        ]
        entries.sort(key=lambda entry: self.id_key(entry.id))
        return entries, [_text(last_id) for last_id in last_ids]

    @_translated
    async def read_pending(
        self, stream: str, group: str, consumer: str, *, count: int
    ) -> list[Entry]:
        _check_count(count)
        reply = await self._read_pending([stream], [group, consumer, count])
        return [_entry(stream, item) for item in reply]

    @_translated
    async def claim_idle(
        self, stream: str, group: str, consumer: str, *, min_idle: float, count: int
    ) -> tuple[list[Entry], list[str]]:
        _check_count(count)
        idle = _milliseconds("min_idle", min_idle, allow_zero=True)
        claimed, deleted = await self._claim_idle([stream], [group, consumer, idle, count])
        return [_entry(stream, item) for item in claimed], [_text(i) for i in deleted]

    @_translated
    async def keep(self, stream: str, group: str, consumer: str, ids: Sequence[str]) -> list[str]:
        _check_names("ids", ids, allow_empty=True)
        if not ids:
            return []
        return [_text(i) for i in await self._keep([stream], [group, consumer, *ids])]

    @_translated
    async def redeliver(self, stream: str, group: str, consumer: str, entry_id: str) -> int:
        return int(await self._redeliver([stream], [group, consumer, entry_id]))

    @_translated
    async def ack(self, stream: str, group: str, ids: Sequence[str]) -> None:
        _check_names("ids", ids, allow_empty=True)
        if ids:
            await self._command("XACK", stream, group, *ids)

    @_translated
    async def dead_letter(self, entry: Entry, group: str, *, dead_stream: str, reason: str) -> None:
        about: list[Field] = ["stream", entry.stream, "entry_id", entry.id, "group", group]
        about += ["reason", reason, "deliveries", entry.deliveries]
        args = [group, entry.id, *about, *_fields(entry.envelope)]
        await self._dead_letter([dead_stream, entry.stream], args)

    @_translated
    async def dead_letters(self, dead_stream: str, *, count: int = 100) -> list[DeadLetter]:
        _check_count(count)
        reply = await self._command("XRANGE", dead_stream, "-", "+", "COUNT", count)
        return [_dead_letter(_text(entry_id), fields) for entry_id, fields in reply or ()]

    @_translated
    async def redrive(self, dead_stream: str, ids: Sequence[str]) -> int:
        _check_names("ids", ids, allow_empty=True)
        moved = 0
        for dead_id in dict.fromkeys(ids):  # an id twice in one call is one letter
            reply = await self._command("XRANGE", dead_stream, dead_id, dead_id)
            for _, fields in reply or ():
                letter = _dead_letter(dead_id, fields)
                args = [dead_id, *_fields(letter.envelope)]
                moved += int(await self._redrive([dead_stream, letter.stream], args))
        return moved

    @_translated
    async def remove_dead_letters(self, dead_stream: str, ids: Sequence[str]) -> int:
        _check_names("ids", ids, allow_empty=True)
        if not ids:
            return 0
        return int(await self._command("XDEL", dead_stream, *dict.fromkeys(ids)))

    @_translated
    async def remove_idle_consumers(
        self, stream: str, group: str, *, idle: float, keep: str
    ) -> list[str]:
        idle_ms = _seconds("idle", idle, allow_zero=True) * 1000
        removed = await self._remove_idle_consumers([stream], [group, idle_ms, keep])
        return [_text(name) for name in removed]

    @_translated
    async def remove_consumer(self, stream: str, group: str, consumer: str) -> bool:
        return bool(await self._remove_consumer([stream], [group, consumer]))

    @_translated
    async def trim(self, stream: str) -> Trimmed:
        max_len = "" if self.max_len is None else self.max_len
        removed, capped, length = await self._trim([stream], [max_len])
        if capped:
            logger.warning(
                "stream %s is past its cap of %d entries: removed the %d oldest, "
                "maybe before every group had them",
                stream,
                self.max_len,
                capped,
            )
        return Trimmed(stream, int(removed), int(capped), int(length))

    @_translated
    async def groups(self, stream: str) -> list[GroupInfo]:
        reply = await self._groups([stream])
        return [_group_info(stream, flat) for flat in reply]

    @_translated
    async def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        ttl_ms = _milliseconds("ttl", ttl)
        return bool(await self._acquire_lease([name], [owner, ttl_ms]))

    @_translated
    async def release_lease(self, name: str, owner: str) -> None:
        await self._release_lease([name], [owner])

    @_translated
    async def heartbeat(self, group: str, consumer: str, ttl: float) -> list[str]:
        ttl_ms = _milliseconds("ttl", ttl)
        alive = await self._heartbeat([HEARTBEATS + group], [consumer, ttl_ms])
        return sorted(_text(name) for name in alive)

    @_translated
    async def leave(self, group: str, consumer: str) -> None:
        await self._command("ZREM", HEARTBEATS + group, consumer)

    async def aclose(self) -> None:
        """Close the client if the transport made it (from a URL); a given one stays open."""
        if self._owned:
            self._owned = False
            await self._redis.aclose()


# Arguments


def _client(client: object, max_connections: int) -> tuple[Redis, bool]:
    if isinstance(client, str):
        try:
            pool = BlockingConnectionPool.from_url(
                client, max_connections=max_connections, timeout=None
            )
            return Redis.from_pool(pool), True
        except ValueError as exc:
            raise ConfigurationError(
                f"RedisStreams() got a bad Redis URL {client!r}: {exc}"
            ) from exc
    if isinstance(client, Redis):
        return client, False
    hint = ""
    if type(client).__module__.startswith("redis.") and hasattr(client, "connection_pool"):
        hint = " (the synchronous client? use redis.asyncio.Redis)"
    raise TypeError(
        f"RedisStreams() takes a redis.asyncio.Redis client or a URL, got {client!r}{hint}"
    )


def _checked_max_len(max_len: object) -> int | None:
    if max_len is None:
        return None
    if type(max_len) is not int:
        raise TypeError(f"RedisStreams(max_len=...) must be an int or None, got {max_len!r}")
    if max_len < 1:
        raise ConfigurationError(f"RedisStreams(max_len=...) must be >= 1, got {max_len}")
    return max_len


def _check_count(count: object) -> None:
    if type(count) is not int:
        raise TypeError(f"count must be an int, got {count!r}")
    if count < 1:
        raise ConfigurationError(f"count must be >= 1, got {count}")


def _check_names(what: str, names: object, *, allow_empty: bool = False) -> None:
    # A lone str is a sequence too: its characters would be taken for names.
    if isinstance(names, str | bytes) or not isinstance(names, Sequence):
        raise TypeError(f"{what} must be a sequence of str, got {names!r}")
    if not names and not allow_empty:
        raise ConfigurationError(f"{what} must not be empty")


def _seconds(what: str, value: object, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(f"{what} must be a finite number of seconds {bound}, got {value}")
    return float(value)


def _milliseconds(what: str, value: object, *, allow_zero: bool = False) -> int:
    """Whole milliseconds, rounded up: a positive time never becomes 0 (for ever, to BLOCK)."""
    return math.ceil(_seconds(what, value, allow_zero=allow_zero) * 1000)


# Replies


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _fields(envelope: Envelope) -> list[Field]:
    fields: list[Field] = ["id", envelope.id, "name", envelope.name]
    fields += ["version", envelope.version]
    if envelope.key is not None:
        fields += ["key", envelope.key]
    headers = envelope.headers
    text = json.dumps(dict(headers), ensure_ascii=False, separators=(",", ":")) if headers else "{}"
    return [*fields, "payload", envelope.payload, "headers", text]


def _entries_of(reply: Any) -> list[tuple[Any, Any]]:
    """The (id, fields) pairs of a one-stream XREADGROUP, in any shape redis-py gives it:
    ``[[stream, entries]]`` (RESP2), ``{stream: entries}`` or, for RESP3 in redis-py's
    legacy shapes, ``{stream: [entries]}``."""
    if not reply:
        return []
    entries = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
    if entries and isinstance(entries[0], list) and not isinstance(entries[0][0], str | bytes):
        entries = entries[0]
    return [(entry[0], entry[1]) for entry in entries]


def _as_text_dict(fields: Any) -> dict[str, str]:
    if not isinstance(fields, Mapping):
        fields = dict(zip(fields[::2], fields[1::2], strict=True))
    if fields and isinstance(next(iter(fields)), bytes):  # a client without decode_responses
        return {name.decode(): value.decode("utf-8", "replace") for name, value in fields.items()}
    return dict(fields)


def _envelope(fields: Any) -> Envelope:
    """An envelope from an entry's fields. An entry some other writer added without them is
    read all the same (empty text, version 0): the layer above fails to decode it, retries and
    dead-letters it, instead of the read failing for every entry behind it."""
    text = _as_text_dict(fields)
    return _envelope_from(text)


def _envelope_from(text: dict[str, str]) -> Envelope:
    return Envelope(
        id=text.get("id", ""),
        name=text.get("name", ""),
        version=_int(text.get("version", "0")),
        payload=text.get("payload", ""),
        key=text.get("key"),
        headers=_headers(text.get("headers", "{}")),
    )


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


def _headers(text: str) -> dict[str, str]:
    if text == "{}":
        return {}
    try:
        headers = json.loads(text)
    except ValueError:
        return {}
    return headers if isinstance(headers, dict) else {}


def _entry(stream: str, item: Sequence[Any]) -> Entry:
    entry_id, fields, deliveries = item
    return Entry(stream, _text(entry_id), _envelope(fields), int(deliveries))


def _dead_letter(dead_id: str, fields: Any) -> DeadLetter:
    text = _as_text_dict(fields)
    return DeadLetter(
        id=dead_id,
        stream=text.get("stream", ""),
        entry_id=text.get("entry_id", ""),
        group=text.get("group", ""),
        reason=text.get("reason", ""),
        deliveries=_int(text.get("deliveries", "0")),
        envelope=_envelope_from(text),
    )


def _group_info(stream: str, flat: Sequence[Any]) -> GroupInfo:
    info = {_text(name): value for name, value in zip(flat[::2], flat[1::2], strict=True)}
    lag = info.get("lag")
    return GroupInfo(
        stream=stream,
        group=_text(info["name"]),
        consumers=int(info["consumers"]),
        pending=int(info["pending"]),
        lag=None if lag is None else int(lag),
    )
