"""Tests for RedisStreams, the Redis Streams transport: what Redis itself must show.

Every test runs on the shared Redis under a key prefix of its own and deletes only its keys.
The transport tests run once per kind of client (RESP2, RESP3, decoded replies, redis-py's
default), since each gives replies another shape. Restarts, refusals and passwords use a
throwaway redis-server of the test's own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import anyio
import pytest
import pytest_asyncio
import redis
import redis.exceptions
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from aioevents import ConfigurationError
from aioevents._redis_streams import HEARTBEATS, RedisStreams
from aioevents._transport import DeadLetter, Entry, Envelope, GroupInfo, Transport, Trimmed

T = TypeVar("T", bound=Callable[..., Coroutine[Any, Any, None]])

CLIENT_KINDS: dict[str, dict[str, Any]] = {
    "resp2": {"protocol": 2},
    "resp3": {"protocol": 3},
    "decoded": {"decode_responses": True},
    "default": {},
}
WAIT = 10.0  # an upper bound for what should happen at once: a hang fails, never a slow run


def on_redis(test: T) -> T:
    return cast(T, pytest.mark.redis(pytest.mark.asyncio(test)))


# Fixtures


@pytest.fixture
def prefix() -> str:
    return f"aioevents-test:{uuid.uuid4().hex}:"


@pytest_asyncio.fixture
async def raw(redis_url: str, prefix: str) -> AsyncIterator[Redis]:
    """A plain client (RESP2, text) to look at what the transport wrote; afterwards it
    deletes this test's keys, and only those."""
    client = Redis.from_url(redis_url, protocol=2, decode_responses=True)
    try:
        yield client
    finally:
        for pattern in (prefix + "*", HEARTBEATS + prefix + "*"):
            keys = [key async for key in client.scan_iter(match=pattern)]
            if keys:
                await client.delete(*keys)
        await client.aclose()


@pytest_asyncio.fixture(params=list(CLIENT_KINDS))
async def transport(
    request: pytest.FixtureRequest, redis_url: str, raw: Redis
) -> AsyncIterator[RedisStreams]:
    client = Redis.from_url(redis_url, **CLIENT_KINDS[request.param])
    try:
        yield RedisStreams(client, max_len=None)
    finally:
        await client.aclose()


@pytest.fixture
def stream(prefix: str) -> str:
    return prefix + "doc-created"


@pytest.fixture
def group(prefix: str) -> str:
    return prefix + "on-created"


def envelope(number: int, **fields: Any) -> Envelope:
    return Envelope(
        id=f"event-{number}", name="doc-created", version=1, payload=f"[{number}]", **fields
    )


async def publish(transport: Transport, stream: str, count: int) -> list[str]:
    return [await transport.publish(stream, envelope(n)) for n in range(count)]


async def pending(raw: Redis, stream: str, group: str) -> dict[str, tuple[str, int]]:
    """Each pending entry's consumer and delivery count, as Redis has them."""
    rows: list[dict[str, Any]] = await raw.xpending_range(stream, group, "-", "+", 1000)
    return {row["message_id"]: (row["consumer"], row["times_delivered"]) for row in rows}


async def entries_in(raw: Redis, stream: str) -> dict[str, dict[str, str]]:
    """The stream's entries as Redis has them: id -> fields."""
    return dict(cast(list[tuple[str, dict[str, str]]], await raw.xrange(stream)))


async def move(
    raw: Redis, stream: str, group: str, to: str, ids: list[str], **options: Any
) -> None:
    """XCLAIM, as another consumer would (or to set an entry's idle time)."""
    await raw.xclaim(stream, group, to, 0, list[Any](ids), **options)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def client_for(port: int, **options: Any) -> Redis:
    """A client that fails at once on a refused connection instead of retrying."""
    return Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0), **options)


def start_server(directory: Path, *options: str) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not on PATH"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must exercise the real service", pytrace=False)
        pytest.skip(message)
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    args += ["--appendonly", "no", "--daemonize", "no", "--dir", str(directory), *options]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + WAIT
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            if time.monotonic() > deadline:
                server.kill()
                raise
            time.sleep(0.02)
        else:
            return server, port


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[int]:
    """A throwaway redis-server (SCRIPT FLUSH is server-wide: never on the shared one)."""
    server, port = start_server(tmp_path)
    try:
        yield port
    finally:
        server.terminate()
        server.wait(timeout=WAIT)


# Publish and read


@on_redis
@pytest.mark.parametrize(
    "sent",
    [
        envelope(1),
        Envelope(
            id="0190a5e0-7c1a-7000-8000-000000000001",
            name="dokument.erstellt",
            version=3,
            payload='{"title": "Zürich ✓ 日本語"}',
            key="clé-7",
            headers={"traceparent": "00-abc-01", "ünïcode": "ß ✓"},
        ),
        envelope(2, key=""),
    ],
    ids=["no-key-no-headers", "unicode-key-headers", "empty-key"],
)
async def test_an_envelope_goes_round_trip(
    transport: RedisStreams, stream: str, group: str, sent: Envelope
) -> None:
    await transport.create_group(stream, group)
    entry_id = await transport.publish(stream, sent)
    entries = await transport.read_new([stream], group, "c1", count=10, block=0)
    assert entries == [Entry(stream, entry_id, sent, deliveries=1)]


@on_redis
async def test_publish_writes_the_documented_fields(
    transport: RedisStreams, raw: Redis, stream: str
) -> None:
    plain = await transport.publish(stream, envelope(1))
    keyed = await transport.publish(stream, envelope(2, key="k", headers={"h": "v"}))
    rows = await entries_in(raw, stream)
    assert rows[plain] == {
        "id": "event-1",
        "name": "doc-created",
        "version": "1",
        "payload": "[1]",
        "headers": "{}",
    }  # no key field at all when the key is None
    assert rows[keyed]["key"] == "k"
    assert rows[keyed]["headers"] == '{"h":"v"}'


@on_redis
async def test_publish_never_caps_the_stream(redis_url: str, raw: Redis, stream: str) -> None:
    async with RedisStreams(redis_url, max_len=2) as transport:
        await publish(transport, stream, 5)
    assert await raw.xlen(stream) == 5  # only trim caps, and says so


@on_redis
async def test_read_new_with_block_zero_returns_at_once(
    transport: RedisStreams, stream: str, group: str, prefix: str
) -> None:
    other = prefix + "other"
    await transport.create_group(stream, group)
    await transport.create_group(other, group)
    with anyio.fail_after(WAIT):  # BLOCK 0 would wait for ever
        assert await transport.read_new([stream], group, "c1", count=10, block=0) == []
        assert await transport.read_new([stream, other], group, "c1", count=10, block=0) == []


@on_redis
async def test_read_new_returns_empty_when_nothing_arrives_in_time(
    transport: RedisStreams, stream: str, group: str, prefix: str
) -> None:
    other = prefix + "other"
    await transport.create_group(stream, group)
    await transport.create_group(other, group)
    assert await transport.read_new([stream], group, "c1", count=10, block=0.05) == []
    assert await transport.read_new([stream, other], group, "c1", count=10, block=0.05) == []


@on_redis
@pytest.mark.parametrize("streams", [1, 3])
async def test_read_new_waits_for_an_entry(
    transport: RedisStreams, prefix: str, group: str, streams: int
) -> None:
    names = [f"{prefix}s{i}" for i in range(streams)]
    for name in names:
        await transport.create_group(name, group)
    received: list[Entry] = []

    async def read() -> None:
        received.extend(await transport.read_new(names, group, "c1", count=10, block=WAIT))

    with anyio.fail_after(WAIT * 2):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(read)
            await anyio.sleep(0.1)  # most likely blocked by now; either way it gets the entry
            entry_id = await transport.publish(names[-1], envelope(1))
    assert [(entry.stream, entry.id) for entry in received] == [(names[-1], entry_id)]


@on_redis
async def test_read_new_gives_each_entry_to_one_consumer_oldest_first(
    transport: RedisStreams, stream: str, group: str
) -> None:
    await transport.create_group(stream, group)
    ids = await publish(transport, stream, 5)
    first = await transport.read_new([stream], group, "c1", count=2, block=0)
    rest = await transport.read_new([stream], group, "c2", count=10, block=0)
    assert [entry.id for entry in first] == ids[:2]
    assert [entry.id for entry in rest] == ids[2:]
    assert await transport.read_new([stream], group, "c1", count=10, block=0) == []


@on_redis
async def test_each_group_gets_every_entry(
    transport: RedisStreams, stream: str, prefix: str
) -> None:
    groups = [prefix + "g1", prefix + "g2"]
    for group in groups:
        await transport.create_group(stream, group)
    ids = await publish(transport, stream, 3)
    for group in groups:
        entries = await transport.read_new([stream], group, "c1", count=10, block=0)
        assert [entry.id for entry in entries] == ids


@on_redis
async def test_create_group_on_a_key_that_is_no_stream_fails(
    transport: RedisStreams, raw: Redis, prefix: str, group: str
) -> None:
    await raw.set(prefix + "string", "x")
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        await transport.create_group(prefix + "string", group)


@on_redis
async def test_create_group_twice_is_fine_and_reads_from_the_start(
    transport: RedisStreams, stream: str, group: str
) -> None:
    ids = await publish(transport, stream, 2)  # before the group exists
    await transport.create_group(stream, group)
    await transport.create_group(stream, group)
    entries = await transport.read_new([stream], group, "c1", count=10, block=0)
    assert [entry.id for entry in entries] == ids


@on_redis
async def test_read_new_over_many_streams_takes_count_oldest_across_them(
    transport: RedisStreams, prefix: str, group: str
) -> None:
    names = [f"{prefix}p{i}" for i in range(3)]
    for name in names:
        await transport.create_group(name, group)
    published = [
        (name, await transport.publish(name, envelope(n))) for n in range(4) for name in names
    ]
    first = await transport.read_new(names, group, "c1", count=5, block=0)
    rest = await transport.read_new(names, group, "c1", count=100, block=0)
    # ids of different streams can be equal (same millisecond): order is by id, ties any way
    key = RedisStreams.id_key
    assert len(first) == 5
    assert [key(e.id) for e in first + rest] == sorted(key(entry_id) for _, entry_id in published)
    assert {(e.stream, e.id) for e in first + rest} == set(published)
    assert all(entry.deliveries == 1 for entry in first + rest)
    assert await transport.read_new(names, group, "c1", count=100, block=0) == []


@on_redis
@pytest.mark.parametrize("streams", [1, 2])
async def test_read_new_of_a_missing_group_is_a_redis_error(
    transport: RedisStreams, prefix: str, group: str, streams: int
) -> None:
    names = [f"{prefix}s{i}" for i in range(streams)]
    with pytest.raises(redis.exceptions.ResponseError, match="NOGROUP"):
        await transport.read_new(names, group, "c1", count=1, block=0)


@on_redis
async def test_an_entry_another_writer_added_is_read_with_empty_fields(
    transport: RedisStreams, raw: Redis, stream: str, group: str
) -> None:
    await transport.create_group(stream, group)
    await raw.xadd(stream, {"something": "else"})
    await raw.xadd(stream, {"name": "n", "version": "two", "headers": "[1]"})
    await raw.xadd(stream, {"name": "n", "version": "2", "headers": "{not json"})
    entries = await transport.read_new([stream], group, "c1", count=10, block=0)
    assert [entry.envelope for entry in entries] == [
        Envelope(id="", name="", version=0, payload=""),
        Envelope(id="", name="n", version=0, payload=""),
        Envelope(id="", name="n", version=2, payload=""),
    ]


# Pending entries: read again, claimed, kept, redelivered, acknowledged


@on_redis
async def test_read_pending_counts_one_more_delivery_each_time(
    transport: RedisStreams, raw: Redis, stream: str, group: str
) -> None:
    await transport.create_group(stream, group)
    ids = await publish(transport, stream, 3)
    await transport.read_new([stream], group, "c1", count=10, block=0)
    again = await transport.read_pending(stream, group, "c1", count=10)
    assert [(entry.id, entry.deliveries) for entry in again] == [(i, 2) for i in ids]
    assert [entry.envelope for entry in again] == [envelope(n) for n in range(3)]
    limited = await transport.read_pending(stream, group, "c1", count=2)
    assert [(entry.id, entry.deliveries) for entry in limited] == [(i, 3) for i in ids[:2]]
    assert await transport.read_pending(stream, group, "c2", count=10) == []
    assert await pending(raw, stream, group) == {
        ids[0]: ("c1", 3),
        ids[1]: ("c1", 3),
        ids[2]: ("c1", 2),
    }


@on_redis
async def test_read_pending_acknowledges_an_entry_trimmed_away(
    transport: RedisStreams, raw: Redis, stream: str, group: str
) -> None:
    await transport.create_group(stream, group)
    ids = await publish(transport, stream, 3)
    await transport.read_new([stream], group, "c1", count=10, block=0)
    await raw.xdel(stream, ids[1])
    again = await transport.read_pending(stream, group, "c1", count=10)
    assert [entry.id for entry in again] == [ids[0], ids[2]]
    assert set(await pending(raw, stream, group)) == {ids[0], ids[2]}


@on_redis
async def test_claim_idle_moves_entries_with_their_delivery_counts(
    transport: RedisStreams, raw: Redis, stream: str, group: str
) -> None:
    await transport.create_group(stream, group)
    ids = await publish(transport, stream, 3)
    await transport.read_new([stream], group, "c1", count=10, block=0)
    claimed, deleted = await transport.claim_idle(stream, group, "c2", min_idle=0, count=2)
    assert [(entry.id, entry.deliveries) for entry in claimed] == [(ids[0], 2), (ids[1], 2)]
    assert [entry.envelope for entry in claimed] == [envelope(0), envelope(1)]
    assert deleted == []
    assert await pending(raw, stream, group) == {
        ids[0]: ("c2", 2),
        ids[1]: ("c2", 2),
        ids[2]: ("c1", 1),
    }
    # any consumer's entries, its own too
    claimed, _ = await transport.claim_idle(stream, group, "c2", min_idle=0, count=10)
    assert [(entry.id, entry.deliveries) for entry in claimed] == [
        (ids[0], 3),
        (ids[1], 3),
        (ids[2], 2),
    ]


@on_redis
async def test_claim_idle_leaves_entries_not_idle_long_enough(
    transport: RedisStreams, raw: Redis, stream: str, group: str
) -> None:
    await transport.create_group(stream, group)
    ids = await publish(transport, stream, 2)
    await transport.read_new([stream], group, "c1", count=10, block=0)
    assert await transport.claim_idle(stream, group, "c2", min_idle=3600, count=10) == ([], [])
    assert await pending(raw, stream, group) == dict.fromkeys(ids, ("c1", 1))


@on_redis
async def test_claim_idle_reports_and_drops_entries_trimmed_away(
    transport: RedisStreams, raw: Redis, stream: str, group: str
) -> None:
    await transport.create_group(stream, group)
    ids = await publish(transport, stream, 3)
    await transport.read_new([stream], group, "c1", count=10, block=0)
    await raw.xdel(stream, ids[1])
    claimed, deleted = await transport.claim_idle(stream, group, "c2", min_idle=0, count=10)
    assert [entry.id for entry in claimed] == [ids[0], ids[2]]
    assert deleted == [ids[1]]
    assert set(await pending(raw, stream, group)) == {ids[0], ids[2]}


@on_redis
async def test_claim_idle_goes_past_a_long_run_of_entries_not_idle(
    transport: RedisStreams, raw: Redis, stream: str, group: str
) -> None:
    # XAUTOCLAIM looks at 10 x COUNT entries per call: the cursor must be followed.
    await transport.create_group(stream, group)
    ids = await publish(transport, stream, 30)
    await transport.read_new([stream], group, "c1", count=30, block=0)
    await move(raw, stream, group, "c1", ids[:29], idle=0, justid=True)
    await move(raw, stream, group, "c1", ids[29:], idle=3_600_000, justid=True)
    claimed, _ = await transport.claim_idle(stream, group, "c2", min_idle=60, count=1)
    assert [entry.id for entry in claimed] == [ids[29]]


@on_redis
async def test_keep_returns_only_the_consumers_own_and_counts_no_delivery(
    transport: RedisStreams, raw: Redis, stream: str, group: str
) -> None:
    await transport.create_group(stream, group)
    ids = await publish(transport, stream, 4)
    await transport.read_new([stream], group, "c1", count=4, block=0)
    await move(raw, stream, group, "c2", [ids[1]])  # reclaimed meanwhile by another
    await transport.ack(stream, group, [ids[2]])
    await raw.xdel(stream, ids[3])  # trimmed away by the cap
    assert await transport.keep(stream, group, "c1", ids) == [ids[0]]
    assert await transport.keep(stream, group, "c1", []) == []
    assert await pending(raw, stream, group) == {ids[0]: ("c1", 1), ids[1]: ("c2", 2)}


@on_redis
async def test_keep_resets_the_idle_time(
    transport: RedisStreams, raw: Redis, stream: str, group: str
) -> None:
    await transport.create_group(stream, group)
    ids = await publish(transport, stream, 2)
    await transport.read_new([stream], group, "c1", count=2, block=0)
    idle = 3_600_000  # as if read an hour ago
    await move(raw, stream, group, "c1", ids, idle=idle, justid=True)
    assert await transport.keep(stream, group, "c1", [ids[0]]) == [ids[0]]
    claimed, _ = await transport.claim_idle(stream, group, "c2", min_idle=600, count=10)
    assert [entry.id for entry in claimed] == [ids[1]]  # the one not kept


@on_redis
async def test_redeliver_counts_deliveries_of_the_consumers_own_entry(
    transport: RedisStreams, raw: Redis, stream: str, group: str
) -> None:
    await transport.create_group(stream, group)
    ids = await publish(transport, stream, 3)
    await transport.read_new([stream], group, "c1", count=3, block=0)
    assert await transport.redeliver(stream, group, "c1", ids[0]) == 2
    assert await transport.redeliver(stream, group, "c1", ids[0]) == 3
    assert await transport.redeliver(stream, group, "c2", ids[0]) == 0  # not c2's
    await transport.ack(stream, group, [ids[1]])
    assert await transport.redeliver(stream, group, "c1", ids[1]) == 0  # acknowledged
    await raw.xdel(stream, ids[2])
    assert await transport.redeliver(stream, group, "c1", ids[2]) == 0  # trimmed away
    assert await pending(raw, stream, group) == {ids[0]: ("c1", 3)}


@on_redis
async def test_ack_ends_pending(
    transport: RedisStreams, raw: Redis, stream: str, group: str
) -> None:
    await transport.create_group(stream, group)
    ids = await publish(transport, stream, 3)
    await transport.read_new([stream], group, "c1", count=3, block=0)
    await transport.ack(stream, group, ids[:2])
    await transport.ack(stream, group, [])
    assert set(await pending(raw, stream, group)) == {ids[2]}
    again = await transport.read_pending(stream, group, "c1", count=10)
    assert [entry.id for entry in again] == [ids[2]]


# Dead letters


@on_redis
async def test_dead_letter_writes_the_entry_and_acknowledges_it(
    transport: RedisStreams, raw: Redis, stream: str, group: str, prefix: str
) -> None:
    dead = prefix + "dead"
    sent = envelope(1, key="k", headers={"traceparent": "00-ab-01"})
    await transport.create_group(stream, group)
    entry_id = await transport.publish(stream, sent)
    await transport.publish(stream, envelope(2))
    [entry, _] = await transport.read_new([stream], group, "c1", count=2, block=0)
    [entry] = await transport.read_pending(stream, group, "c1", count=1)
    await transport.dead_letter(entry, group, dead_stream=dead, reason="ValueError: bad")
    await transport.dead_letter(entry, group, dead_stream=dead, reason="twice")  # already done
    letters = await transport.dead_letters(dead)
    assert letters == [
        DeadLetter(
            id=letters[0].id,
            stream=stream,
            entry_id=entry_id,
            group=group,
            reason="ValueError: bad",
            deliveries=2,
            envelope=sent,
        )
    ]
    assert entry_id not in await pending(raw, stream, group)


@on_redis
async def test_dead_letter_does_neither_when_it_cannot_do_both(
    transport: RedisStreams, raw: Redis, stream: str, group: str, prefix: str
) -> None:
    dead = prefix + "dead"
    await raw.set(dead, "not a stream")
    await transport.create_group(stream, group)
    entry_id = await transport.publish(stream, envelope(1))
    [entry] = await transport.read_new([stream], group, "c1", count=1, block=0)
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        await transport.dead_letter(entry, group, dead_stream=dead, reason="boom")
    assert await pending(raw, stream, group) == {entry_id: ("c1", 1)}


@on_redis
async def test_dead_letters_are_the_oldest_count(
    transport: RedisStreams, stream: str, group: str, prefix: str
) -> None:
    dead = prefix + "dead"
    await transport.create_group(stream, group)
    await publish(transport, stream, 3)
    entries = await transport.read_new([stream], group, "c1", count=3, block=0)
    for n, entry in enumerate(entries):
        await transport.dead_letter(entry, group, dead_stream=dead, reason=f"r{n}")
    letters = await transport.dead_letters(dead, count=2)
    assert [(letter.reason, letter.envelope) for letter in letters] == [
        ("r0", envelope(0)),
        ("r1", envelope(1)),
    ]
    assert await transport.dead_letters(prefix + "no-such-stream") == []


# Consumers


async def consumer_names(raw: Redis, stream: str, group: str) -> set[str]:
    return {row["name"] for row in await raw.xinfo_consumers(stream, group)}


@on_redis
async def test_remove_consumer_refuses_while_it_has_pending_entries(
    transport: RedisStreams, raw: Redis, stream: str, group: str, prefix: str
) -> None:
    await transport.create_group(stream, group)
    ids = await publish(transport, stream, 1)
    await transport.read_new([stream], group, "c1", count=1, block=0)
    assert await transport.remove_consumer(stream, group, "c1") is False
    assert await pending(raw, stream, group) == {ids[0]: ("c1", 1)}
    await transport.ack(stream, group, ids)
    assert await transport.remove_consumer(stream, group, "c1") is True
    assert await consumer_names(raw, stream, group) == set()
    assert await transport.remove_consumer(stream, group, "c1") is False
    assert await transport.remove_consumer(stream, prefix + "no-group", "c1") is False
    assert await transport.remove_consumer(prefix + "no-stream", group, "c1") is False


@on_redis
async def test_remove_idle_consumers_removes_only_idle_ones_with_nothing_pending(
    transport: RedisStreams, raw: Redis, stream: str, group: str, prefix: str
) -> None:
    await transport.create_group(stream, group)
    ids = await publish(transport, stream, 3)
    await transport.read_new([stream], group, "busy", count=1, block=0)
    await transport.read_new([stream], group, "done", count=1, block=0)
    await transport.read_new([stream], group, "me", count=1, block=0)
    await transport.ack(stream, group, ids[1:])  # "done" and "me" have nothing pending
    await anyio.sleep(0.05)  # every consumer idle for at least 50 ms
    assert await transport.remove_idle_consumers(stream, group, idle=3600, keep="me") == []
    assert await transport.remove_idle_consumers(stream, group, idle=0.001, keep="me") == ["done"]
    assert await consumer_names(raw, stream, group) == {"busy", "me"}
    assert await transport.remove_idle_consumers(stream, prefix + "g", idle=0, keep="me") == []


@on_redis
async def test_remove_consumers_of_a_key_that_is_no_stream_fails(
    transport: RedisStreams, raw: Redis, prefix: str, group: str
) -> None:
    await raw.set(prefix + "string", "x")
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        await transport.remove_consumer(prefix + "string", group, "c1")


# Trimming


async def stream_ids(raw: Redis, stream: str) -> list[str]:
    return list(await entries_in(raw, stream))


@on_redis
async def test_trim_keeps_what_a_slow_group_has_pending_or_not_read(
    transport: RedisStreams, raw: Redis, stream: str, prefix: str
) -> None:
    fast, slow = prefix + "fast", prefix + "slow"
    await transport.create_group(stream, fast)
    await transport.create_group(stream, slow)
    ids = await publish(transport, stream, 6)
    await transport.read_new([stream], fast, "c1", count=6, block=0)
    await transport.ack(stream, fast, ids)
    await transport.read_new([stream], slow, "c1", count=4, block=0)
    await transport.ack(stream, slow, [ids[0], ids[1], ids[3]])  # ids[2] still pending
    assert await transport.trim(stream) == Trimmed(stream, removed=2, capped=0, length=4)
    assert await stream_ids(raw, stream) == ids[2:]
    await transport.ack(stream, slow, [ids[2]])
    assert await transport.trim(stream) == Trimmed(stream, removed=2, capped=0, length=2)
    assert await stream_ids(raw, stream) == ids[4:]  # read by fast, not yet by slow


@on_redis
async def test_trim_keeps_everything_for_a_group_that_read_nothing(
    transport: RedisStreams, raw: Redis, stream: str, prefix: str
) -> None:
    await transport.create_group(stream, prefix + "idle")
    ids = await publish(transport, stream, 3)
    assert await transport.trim(stream) == Trimmed(stream, removed=0, capped=0, length=3)
    assert await stream_ids(raw, stream) == ids


@on_redis
async def test_trim_removes_everything_every_group_acknowledged(
    transport: RedisStreams, raw: Redis, stream: str, group: str
) -> None:
    await transport.create_group(stream, group)
    ids = await publish(transport, stream, 3)
    await transport.read_new([stream], group, "c1", count=3, block=0)
    await transport.ack(stream, group, ids)
    assert await transport.trim(stream) == Trimmed(stream, removed=3, capped=0, length=0)
    later = await publish(transport, stream, 1)
    assert await transport.trim(stream) == Trimmed(stream, removed=0, capped=0, length=1)
    assert await stream_ids(raw, stream) == later


@on_redis
async def test_trim_of_a_stream_without_groups_or_a_missing_one_removes_nothing(
    transport: RedisStreams, stream: str, prefix: str
) -> None:
    await publish(transport, stream, 3)
    assert await transport.trim(stream) == Trimmed(stream, removed=0, capped=0, length=3)
    missing = prefix + "missing"
    assert await transport.trim(missing) == Trimmed(missing, removed=0, capped=0, length=0)


@pytest.mark.parametrize("with_group", [False, True])
@on_redis
async def test_the_cap_removes_the_oldest_and_says_so(
    redis_url: str,
    raw: Redis,
    stream: str,
    group: str,
    caplog: pytest.LogCaptureFixture,
    with_group: bool,
) -> None:
    caplog.set_level(logging.WARNING, logger="aioevents.streams")
    async with RedisStreams(redis_url, max_len=3) as transport:
        if with_group:  # a group that read nothing: the cap removes unread entries all the same
            await transport.create_group(stream, group)
        ids = await publish(transport, stream, 5)
        assert await transport.trim(stream) == Trimmed(stream, removed=0, capped=2, length=3)
        assert await transport.trim(stream) == Trimmed(stream, removed=0, capped=0, length=3)
    assert await stream_ids(raw, stream) == ids[2:]
    [warning] = [record for record in caplog.records if record.name == "aioevents.streams"]
    assert warning.levelno == logging.WARNING
    assert stream in warning.getMessage()
    assert "removed the 2 oldest" in warning.getMessage()


# Groups


@on_redis
async def test_groups_tell_consumers_pending_and_lag(
    transport: RedisStreams, raw: Redis, stream: str, prefix: str
) -> None:
    assert await transport.groups(stream) == []
    busy, fresh = prefix + "busy", prefix + "fresh"
    await transport.create_group(stream, busy)
    ids = await publish(transport, stream, 4)
    await transport.create_group(stream, fresh)
    await transport.read_new([stream], busy, "c1", count=2, block=0)
    await transport.read_new([stream], busy, "c2", count=1, block=0)
    await transport.ack(stream, busy, [ids[0]])
    assert sorted(await transport.groups(stream), key=lambda info: info.group) == [
        GroupInfo(stream, busy, consumers=2, pending=2, lag=1),
        GroupInfo(stream, fresh, consumers=0, pending=0, lag=4),
    ]


@on_redis
async def test_groups_lag_is_none_when_redis_cannot_tell(
    transport: RedisStreams, raw: Redis, stream: str, group: str
) -> None:
    ids = await publish(transport, stream, 3)
    await raw.xdel(stream, ids[1])  # a hole where the group has not read yet
    await transport.create_group(stream, group)
    assert await transport.groups(stream) == [GroupInfo(stream, group, 0, 0, None)]


# Leases and heartbeats


@on_redis
async def test_a_lease_is_held_by_one_owner_at_a_time(
    transport: RedisStreams, raw: Redis, prefix: str
) -> None:
    lease = prefix + "lease:p3"
    assert await transport.acquire_lease(lease, "a", 30) is True
    assert await transport.acquire_lease(lease, "b", 30) is False
    await raw.pexpire(lease, 1000)
    assert await transport.acquire_lease(lease, "a", 30) is True  # renewed
    assert await raw.pttl(lease) > 1000
    await transport.release_lease(lease, "b")  # not b's: nothing happens
    assert await transport.acquire_lease(lease, "b", 30) is False
    await transport.release_lease(lease, "a")
    assert await transport.acquire_lease(lease, "b", 30) is True


@on_redis
async def test_a_lease_expires_after_its_ttl(transport: RedisStreams, prefix: str) -> None:
    lease = prefix + "lease"
    assert await transport.acquire_lease(lease, "a", 0.05) is True
    await anyio.sleep(0.3)
    assert await transport.acquire_lease(lease, "b", 30) is True


@on_redis
async def test_heartbeat_lists_the_live_consumers_sorted(
    transport: RedisStreams, raw: Redis, prefix: str
) -> None:
    group, other = prefix + "g", prefix + "other"
    assert await transport.heartbeat(group, "host:2:b", 30) == ["host:2:b"]
    assert await transport.heartbeat(group, "host:1:a", 30) == ["host:1:a", "host:2:b"]
    assert await transport.heartbeat(other, "host:3:c", 30) == ["host:3:c"]
    assert await transport.heartbeat(group, "host:0:short", 0.05) == [
        "host:0:short",
        "host:1:a",
        "host:2:b",
    ]
    await anyio.sleep(0.3)
    assert await transport.heartbeat(group, "host:1:a", 30) == ["host:1:a", "host:2:b"]
    await transport.leave(group, "host:2:b")
    assert await transport.heartbeat(group, "host:1:a", 30) == ["host:1:a"]
    assert 0 < await raw.pttl(HEARTBEATS + group) <= 30_000  # gone when its last one is


# Connections, clients, scripts


@on_redis
async def test_a_refused_connection_is_a_builtin_connection_error() -> None:
    client = client_for(free_port())
    try:
        transport = RedisStreams(client)
        with pytest.raises(ConnectionError) as raised:
            await transport.publish("s", envelope(1))
        assert isinstance(raised.value.__cause__, redis.exceptions.ConnectionError)
        with pytest.raises(ConnectionError):
            await transport.trim("s")  # a script
    finally:
        await client.aclose()
    async with RedisStreams(f"redis://127.0.0.1:{free_port()}/0") as owned:
        with pytest.raises(ConnectionError):
            await owned.read_new(["s"], "g", "c", count=1, block=0)


@on_redis
async def test_a_server_that_never_answers_is_a_builtin_timeout_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)  # accepts (the kernel's backlog), never answers
        client = client_for(sock.getsockname()[1], socket_timeout=0.2)
        try:
            with pytest.raises(TimeoutError) as raised:
                await RedisStreams(client).ack("s", "g", ["1-1"])
            assert isinstance(raised.value.__cause__, redis.exceptions.TimeoutError)
        finally:
            await client.aclose()


@on_redis
async def test_a_wrong_password_stays_a_redis_error(tmp_path: Path) -> None:
    server, port = start_server(tmp_path, "--requirepass", "right")
    client = client_for(port, password="wrong")
    try:
        with pytest.raises(redis.exceptions.AuthenticationError):
            await RedisStreams(client).publish("s", envelope(1))
    finally:
        await client.aclose()
        server.terminate()
        server.wait(timeout=WAIT)


@on_redis
async def test_scripts_are_loaded_again_after_a_script_flush(own_server: int) -> None:
    client = client_for(own_server)
    try:
        transport = RedisStreams(client)
        await transport.create_group("s", "g")
        ids = await publish(transport, "s", 2)
        await transport.read_new(["s"], "g", "c1", count=2, block=0)
        await transport.read_pending("s", "g", "c1", count=2)
        await client.script_flush()  # as after a restart
        assert [e.id for e in await transport.read_pending("s", "g", "c1", count=2)] == ids
    finally:
        await client.aclose()


@on_redis
async def test_a_client_made_from_a_url_is_closed_by_aclose(redis_url: str, raw: Redis) -> None:
    name = f"aioevents-test-{uuid.uuid4().hex}"

    async def connections() -> int:
        return sum(row["name"] == name for row in await raw.client_list())

    transport = RedisStreams(f"{redis_url}?client_name={name}")
    await transport.groups("nothing")
    assert await connections() == 1
    await transport.aclose()
    await transport.aclose()
    for _ in range(1000):  # the server sees the close a moment later
        if not await connections():
            break
        await anyio.sleep(0.01)
    else:
        pytest.fail("the transport's own connection is still open")


@on_redis
async def test_a_given_client_stays_open(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    try:
        connection = await client.client_id()
        async with RedisStreams(client) as transport:
            await transport.groups("nothing")
        assert await client.client_id() == connection  # the same connection, never closed
    finally:
        await client.aclose()


# Arguments


@pytest.mark.parametrize(
    ("client", "error", "match"),
    [
        (42, TypeError, "redis.asyncio.Redis client or a URL, got 42"),
        (redis.Redis(), TypeError, "the synchronous client"),
        ("nope://host", ConfigurationError, "bad Redis URL 'nope://host'"),
    ],
)
def test_the_client_is_checked(client: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        RedisStreams(client)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("max_len", "error"),
    [(0, ConfigurationError), (-1, ConfigurationError), ("10", TypeError), (True, TypeError)],
)
def test_max_len_is_checked(max_len: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="max_len"):
        RedisStreams("redis://127.0.0.1:1/0", max_len=max_len)  # type: ignore[arg-type]


def test_max_len_none_means_no_cap() -> None:
    assert RedisStreams("redis://127.0.0.1:1/0", max_len=None).max_len is None
    assert RedisStreams("redis://127.0.0.1:1/0").max_len == 1_000_000


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda t: t.read_new(["s"], "g", "c", count=0, block=0), ConfigurationError, "count"),
        (lambda t: t.read_new(["s"], "g", "c", count=1.0, block=0), TypeError, "count"),
        (lambda t: t.read_new(["s"], "g", "c", count=1, block=-1), ConfigurationError, "block"),
        (lambda t: t.read_new(["s"], "g", "c", count=1, block="1"), TypeError, "block"),
        (
            lambda t: t.read_new(["s"], "g", "c", count=1, block=float("inf")),
            ConfigurationError,
            "block",
        ),
        (lambda t: t.read_new("s", "g", "c", count=1, block=0), TypeError, "streams"),
        (lambda t: t.read_new([], "g", "c", count=1, block=0), ConfigurationError, "streams"),
        (lambda t: t.read_pending("s", "g", "c", count=0), ConfigurationError, "count"),
        (
            lambda t: t.claim_idle("s", "g", "c", min_idle=-1, count=1),
            ConfigurationError,
            "min_idle",
        ),
        (lambda t: t.keep("s", "g", "c", "1-1"), TypeError, "ids"),
        (lambda t: t.ack("s", "g", "1-1"), TypeError, "ids"),
        (lambda t: t.dead_letters("d", count=0), ConfigurationError, "count"),
        (lambda t: t.remove_idle_consumers("s", "g", idle=True, keep="c"), TypeError, "idle"),
        (lambda t: t.acquire_lease("l", "o", 0), ConfigurationError, "ttl"),
        (lambda t: t.heartbeat("g", "c", -5), ConfigurationError, "ttl"),
    ],
)
async def test_arguments_are_checked_before_anything_is_sent(
    call: Callable[[Transport], Coroutine[Any, Any, object]],
    error: type[Exception],
    match: str,
) -> None:
    async with RedisStreams(f"redis://127.0.0.1:{free_port()}/0") as transport:
        with pytest.raises(error, match=match):  # not ConnectionError: nothing was sent
            await call(transport)


@on_redis
async def test_calls_past_a_url_clients_pool_wait_for_a_connection(
    redis_url: str, stream: str
) -> None:
    # Two connections, one held by a blocking read: 200 publishes at once all get through.
    async with RedisStreams(redis_url, max_connections=2) as transport:
        await transport.create_group(stream, "g")

        async def read() -> list[Entry]:
            return await transport.read_new([stream], "g", "c", count=1, block=5)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(read)
            ids = await asyncio.gather(
                *(transport.publish(stream, envelope(n)) for n in range(200))
            )
        assert len(set(ids)) == 200


@pytest.mark.parametrize("bad", [0, -1, 1.5, "10"])
def test_max_connections_must_be_a_positive_int(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="max_connections"):
        RedisStreams("redis://127.0.0.1:6379/0", max_connections=bad)  # type: ignore[arg-type]
