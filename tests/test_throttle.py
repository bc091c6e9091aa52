"""Tests for aioevents.throttle: atomic claims, release, expiry, and failing open."""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import assert_type

import anyio
import pytest
import pytest_asyncio
import redis.exceptions
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from aioevents import ConfigurationError
from aioevents.throttle import (
    DEFAULT_PREFIX,
    Claim,
    FallbackCounter,
    MemoryThrottle,
    RedisThrottle,
    Throttle,
    _absorbed_errors,
    redis_fallback,
)

CONCURRENT_CLAIMS = 200
SLACK = 5.0  # the Redis timeout where a test needs real answers even on a loaded CI machine


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def free_port() -> int:
    """A TCP port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def client_for(port: int) -> Redis:
    """A client that fails at once on a refused connection instead of retrying with backoff."""
    return Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0), socket_timeout=5)


def throttle_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "aioevents.throttle"]


async def claim_concurrently(
    throttles: Sequence[Throttle], key: str, count: int = CONCURRENT_CLAIMS
) -> list[Claim]:
    claims: list[Claim] = []

    async def claim_one(throttle: Throttle) -> None:
        claims.append(await throttle.claim(key, 60))

    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(claim_one, throttles[i % len(throttles)])
    return claims


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own, so tests sharing one Redis never see each other's keys."""
    return f"aioevents-test:{uuid.uuid4().hex}:"


@pytest_asyncio.fixture
async def own_keys(redis_url: str, prefix: str) -> AsyncIterator[str]:
    """This test's prefix on the shared Redis; afterwards its keys, and only those, are deleted."""
    yield prefix
    client = Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest_asyncio.fixture
async def redis_client(redis_url: str, own_keys: str) -> AsyncIterator[Redis]:
    """A client of the shared Redis, with the default pool (at most 100 connections)."""
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest_asyncio.fixture
async def unreachable_client() -> AsyncIterator[Redis]:
    client = client_for(free_port())
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def hung_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A throwaway redis-server of this test's own, which the test may stop or kill."""
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not on PATH"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must exercise the real service", pytrace=False)
        pytest.skip(message)
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    args += ["--appendonly", "no", "--daemonize", "no", "--dir", str(tmp_path)]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_accepting(port)
        yield server, port
    finally:
        server.send_signal(signal.SIGCONT)  # in case the test left it stopped
        server.terminate()
        server.wait(timeout=10)


def wait_until_accepting(port: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
        else:
            return


# Claim


@pytest.mark.asyncio
async def test_claim_of_a_denied_or_fallback_claim_releases_nothing() -> None:
    denied = Claim("k", granted=False)
    fallback = Claim("k", granted=True, fallback=True)
    assert not await denied.release()
    assert not await fallback.release()


def test_claim_repr_shows_key_and_outcome() -> None:
    claim = Claim("t:p", granted=True, fallback=True)
    assert repr(claim) == "Claim('t:p', granted=True, fallback=True)"


@pytest.mark.asyncio
async def test_both_throttles_satisfy_the_protocol(unreachable_client: Redis) -> None:
    assert isinstance(MemoryThrottle(), Throttle)
    assert isinstance(RedisThrottle(unreachable_client), Throttle)


# MemoryThrottle


@pytest.mark.asyncio
async def test_memory_grants_one_claim_per_key_per_window(clock: FakeClock) -> None:
    throttle = MemoryThrottle(clock=clock)
    first = await throttle.claim("tenant:openai", 300)
    second = await throttle.claim("tenant:openai", 300)
    other = await throttle.claim("tenant:anthropic", 300)
    assert (first.granted, first.fallback) == (True, False)
    assert not second.granted
    assert other.granted


@pytest.mark.anyio  # backend-neutral: runs on asyncio and trio
async def test_memory_concurrent_claims_grant_exactly_one() -> None:
    claims = await claim_concurrently([MemoryThrottle()], "hot")
    assert len(claims) == CONCURRENT_CLAIMS
    assert sum(claim.granted for claim in claims) == 1


@pytest.mark.asyncio
async def test_memory_claim_expires_after_the_window(clock: FakeClock) -> None:
    throttle = MemoryThrottle(clock=clock)
    assert (await throttle.claim("k", 300)).granted
    clock.advance(299.9)
    assert not (await throttle.claim("k", 300)).granted
    clock.advance(0.1)
    assert (await throttle.claim("k", 300)).granted


@pytest.mark.asyncio
async def test_memory_release_gives_the_window_back(clock: FakeClock) -> None:
    throttle = MemoryThrottle(clock=clock)
    claim = await throttle.claim("k", 300)
    assert await claim.release()
    assert (await throttle.claim("k", 300)).granted


@pytest.mark.asyncio
async def test_memory_release_is_idempotent(clock: FakeClock) -> None:
    throttle = MemoryThrottle(clock=clock)
    claim = await throttle.claim("k", 300)
    assert await claim.release()
    again = await throttle.claim("k", 300)
    assert not await claim.release()
    assert not (await throttle.claim("k", 300)).granted  # the second release left `again` alone
    assert await again.release()


@pytest.mark.anyio  # backend-neutral: runs on asyncio and trio
async def test_memory_late_release_keeps_the_next_owners_claim(clock: FakeClock) -> None:
    throttle = MemoryThrottle(clock=clock)
    stale = await throttle.claim("k", 10)
    clock.advance(10)
    current = await throttle.claim("k", 10)
    assert current.granted
    assert not await stale.release()
    assert not (await throttle.claim("k", 10)).granted
    assert await current.release()


@pytest.mark.asyncio
async def test_memory_release_after_expiry_reports_nothing_released(clock: FakeClock) -> None:
    throttle = MemoryThrottle(clock=clock)
    claim = await throttle.claim("k", 10)
    clock.advance(11)
    assert not await claim.release()
    assert (await throttle.claim("k", 10)).granted


@pytest.mark.asyncio
async def test_memory_drops_expired_claims(clock: FakeClock) -> None:
    throttle = MemoryThrottle(clock=clock)
    for i in range(MemoryThrottle._PRUNE_MIN):
        await throttle.claim(f"old-{i}", 1)
    clock.advance(2)
    live = await throttle.claim("new", 1)
    assert live.granted
    assert list(throttle._claims) == ["new"]
    assert await live.release()


# Input checks, the same for both backends


@pytest_asyncio.fixture(params=["memory", "redis"])
async def any_throttle(request: pytest.FixtureRequest) -> AsyncIterator[Throttle]:
    if request.param == "memory":
        yield MemoryThrottle()
        return
    client = client_for(free_port())  # never reached: the checks come first
    try:
        yield RedisThrottle(client)
    finally:
        await client.aclose()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("key", "window", "error", "match"),
    [
        (b"k", 1, TypeError, "key must be a str, not bytes"),
        ("", 1, ConfigurationError, "key must not be empty"),
        ("k", "300", TypeError, "window must be a number of seconds, not str"),
        ("k", True, TypeError, "window must be a number of seconds, not bool"),
        ("k", 0, ConfigurationError, "window must be finite and more than zero"),
        ("k", -1.5, ConfigurationError, "window must be finite and more than zero"),
        ("k", math.nan, ConfigurationError, "window must be finite"),
        ("k", math.inf, ConfigurationError, "window must be finite"),
    ],
)
async def test_bad_claim_input_is_refused(
    any_throttle: Throttle, key: object, window: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        await any_throttle.claim(key, window)  # type: ignore[arg-type]
    assert issubclass(ConfigurationError, ValueError)


def not_async(key: str) -> bool:
    return False


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        pytest.param(
            {"redis": 5}, TypeError, "takes a redis.asyncio.Redis client, got 5", id="redis"
        ),
        pytest.param(
            {"redis": redis.Redis()}, TypeError, "the synchronous client", id="redis-sync"
        ),
        pytest.param({"prefix": None}, TypeError, "prefix must be a str", id="prefix"),
        pytest.param({"timeout": "1"}, TypeError, "timeout must be a number", id="timeout-type"),
        pytest.param({"timeout": 0}, ConfigurationError, "timeout must be finite", id="timeout"),
        pytest.param(
            {"counter": "c"}, TypeError, "counter must be a FallbackCounter or None", id="counter"
        ),
        pytest.param(
            {"max_connections": 1.5},
            TypeError,
            "max_connections must be an int or None, not float",
            id="max_connections-type",
        ),
        pytest.param(
            {"max_connections": 0},
            ConfigurationError,
            "max_connections must be 1 or more, got 0",
            id="max_connections",
        ),
    ],
)
async def test_redis_throttle_refuses_bad_arguments(
    unreachable_client: Redis, arguments: dict[str, object], error: type[Exception], match: str
) -> None:
    arguments = {"redis": unreachable_client, **arguments}
    with pytest.raises(error, match=match):
        RedisThrottle(**arguments)  # type: ignore[arg-type]


def test_memory_throttle_refuses_a_clock_that_is_not_callable() -> None:
    with pytest.raises(TypeError, match=r"clock must be callable, got 0\.0"):
        MemoryThrottle(clock=0.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        pytest.param({"name": 5}, TypeError, "FallbackCounter name must be a str", id="name"),
        pytest.param(
            {"warn_interval": -1},
            ConfigurationError,
            "warn_interval must be finite and zero or more",
            id="warn_interval",
        ),
        pytest.param({"clock": 1}, TypeError, "clock must be callable, got 1", id="clock"),
    ],
)
def test_fallback_counter_refuses_bad_arguments(
    arguments: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        FallbackCounter(**arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        pytest.param({"timeout": "1"}, "timeout must be a number of seconds", id="timeout"),
        pytest.param(
            {"counter": "cache"}, "counter must be a FallbackCounter or None", id="counter"
        ),
        pytest.param({"on_error": "log"}, "on_error must be callable, got 'log'", id="on_error"),
    ],
)
def test_redis_fallback_refuses_bad_arguments(arguments: dict[str, object], match: str) -> None:
    with pytest.raises(TypeError, match=match):
        redis_fallback(default=None, **arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize("func", [not_async, "forget"], ids=["sync-function", "not-callable"])
def test_redis_fallback_refuses_to_decorate_what_is_not_an_async_function(func: object) -> None:
    with pytest.raises(TypeError, match=r"redis_fallback\(\) decorates an async function, got"):
        redis_fallback(default=False)(func)  # type: ignore[arg-type]


# RedisThrottle against the real server


@pytest.mark.redis
@pytest.mark.asyncio
async def test_redis_concurrent_claims_grant_exactly_one(redis_url: str, own_keys: str) -> None:
    prefix = own_keys
    clients = [Redis.from_url(redis_url) for _ in range(4)]  # four "workers", own connections
    try:
        throttles: list[Throttle] = [
            RedisThrottle(c, prefix=prefix, timeout=SLACK) for c in clients
        ]
        claims = await claim_concurrently(throttles, "hot")
    finally:
        for client in clients:
            await client.aclose()
    assert sum(claim.granted for claim in claims) == 1
    assert not any(claim.fallback for claim in claims)


@pytest.mark.redis
@pytest.mark.asyncio
async def test_redis_claim_sets_the_prefixed_key_for_the_window(
    redis_client: Redis, prefix: str
) -> None:
    throttle = RedisThrottle(redis_client, prefix=prefix, timeout=SLACK)
    claim = await throttle.claim("tenant:openai", 1.5)
    assert (claim.granted, claim.fallback) == (True, False)
    assert 0 < await redis_client.pttl(prefix + "tenant:openai") <= 1500
    assert not (await throttle.claim("tenant:openai", 1.5)).granted
    assert throttle.fallbacks == 0


@pytest.mark.redis
@pytest.mark.asyncio
async def test_redis_default_prefix(redis_client: Redis) -> None:
    key = f"aioevents-test-{uuid.uuid4().hex}"
    try:
        claim = await RedisThrottle(redis_client, timeout=SLACK).claim(key, 5)
        assert await redis_client.exists(DEFAULT_PREFIX + key)
        assert await claim.release()
    finally:
        await redis_client.delete(DEFAULT_PREFIX + key)  # the one key outside this test's prefix


@pytest.mark.redis
@pytest.mark.asyncio
async def test_redis_claim_expires_after_the_window(redis_client: Redis, prefix: str) -> None:
    throttle = RedisThrottle(redis_client, prefix=prefix, timeout=SLACK)
    assert (await throttle.claim("k", 0.3)).granted
    assert not (await throttle.claim("k", 0.3)).granted
    await anyio.sleep(0.4)
    assert (await throttle.claim("k", 0.3)).granted


@pytest.mark.redis
@pytest.mark.asyncio
async def test_redis_release_gives_the_window_back(redis_client: Redis, prefix: str) -> None:
    throttle = RedisThrottle(redis_client, prefix=prefix, timeout=SLACK)
    claim = await throttle.claim("k", 300)
    assert await claim.release()
    assert (await throttle.claim("k", 300)).granted


@pytest.mark.redis
@pytest.mark.asyncio
async def test_redis_release_is_idempotent(redis_client: Redis, prefix: str) -> None:
    throttle = RedisThrottle(redis_client, prefix=prefix, timeout=SLACK)
    claim = await throttle.claim("k", 300)
    assert await claim.release()
    again = await throttle.claim("k", 300)
    assert not await claim.release()
    assert not (await throttle.claim("k", 300)).granted
    assert await again.release()


@pytest.mark.redis
@pytest.mark.asyncio
async def test_redis_late_release_keeps_the_next_owners_claim(
    redis_client: Redis, prefix: str
) -> None:
    worker_a = RedisThrottle(redis_client, prefix=prefix, timeout=SLACK)
    worker_b = RedisThrottle(redis_client, prefix=prefix, timeout=SLACK)
    stale = await worker_a.claim("k", 0.05)
    await anyio.sleep(0.1)
    current = await worker_b.claim("k", 300)
    assert current.granted
    assert not await stale.release()
    assert await redis_client.exists(prefix + "k")
    assert not (await worker_a.claim("k", 300)).granted
    assert await current.release()


@pytest.mark.asyncio
async def test_redis_release_reloads_a_flushed_script(
    redis_server: tuple[subprocess.Popen[bytes], int],
) -> None:
    client = client_for(redis_server[1])  # SCRIPT FLUSH is server-wide: never on the shared one
    try:
        throttle = RedisThrottle(client, timeout=SLACK)
        claim = await throttle.claim("k", 300)
        await client.script_flush()  # as after a server restart or failover
        assert await claim.release()
        assert not await client.exists(DEFAULT_PREFIX + "k")
    finally:
        await client.aclose()
    assert throttle.fallbacks == 0


@pytest.mark.redis
@pytest.mark.asyncio
async def test_redis_non_redis_errors_propagate(
    redis_client: Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken_set(*args: object, **kwargs: object) -> bool:
        raise ValueError("a bug, not an outage")

    throttle = RedisThrottle(redis_client, prefix=prefix, timeout=SLACK)
    monkeypatch.setattr(redis_client, "set", broken_set)
    with pytest.raises(ValueError, match="a bug, not an outage"):
        await throttle.claim("k", 300)
    assert throttle.fallbacks == 0


# Load is not an outage: more concurrent claims than connections


@pytest.mark.redis
@pytest.mark.asyncio
@pytest.mark.parametrize("concurrent", [200, 500])
async def test_more_concurrent_claims_than_the_pool_holds_grant_exactly_one(
    redis_client: Redis, own_keys: str, concurrent: int
) -> None:
    # One client with redis-py's default pool of 100 connections, as most applications have.
    throttle = RedisThrottle(redis_client, prefix=own_keys, timeout=SLACK)
    claims = await claim_concurrently([throttle], "hot", concurrent)
    assert len(claims) == concurrent
    assert sum(claim.granted for claim in claims) == 1
    assert (throttle.fallbacks, throttle.saturations) == (0, 0)


@pytest.mark.redis
@pytest.mark.asyncio
async def test_a_claim_waits_for_a_busy_connection_rather_than_fail_open_or_be_denied(
    redis_client: Redis, own_keys: str
) -> None:
    throttle = RedisThrottle(redis_client, prefix=own_keys, timeout=0.05, max_connections=1)
    busy = object()
    await throttle._slots.acquire_on_behalf_of(busy)  # its one connection, busy for a while
    claims: list[Claim] = []

    async def claim() -> None:
        claims.append(await throttle.claim("k", 300))

    async with anyio.create_task_group() as tg:
        tg.start_soon(claim)
        await anyio.sleep(0.3)  # six timeouts: the claim is still waiting, not answered
        assert claims == []
        throttle._slots.release_on_behalf_of(busy)

    [answered] = claims
    assert (answered.granted, answered.fallback) == (True, False)
    assert (throttle.fallbacks, throttle.saturations) == (0, 0)


@pytest.mark.asyncio
async def test_claims_queued_behind_a_hung_redis_fall_back_in_waves(
    redis_server: tuple[subprocess.Popen[bytes], int], caplog: pytest.LogCaptureFixture
) -> None:
    server, port = redis_server
    caplog.set_level(logging.WARNING, logger="aioevents.throttle")
    client = client_for(port)
    try:
        throttle = RedisThrottle(client, timeout=0.1, max_connections=2)
        assert (await throttle.claim("warm-up", 300)).fallback is False
        server.send_signal(signal.SIGSTOP)  # hung: accepts, never answers
        claims = await claim_concurrently([throttle], "hot", 6)
        server.send_signal(signal.SIGCONT)
    finally:
        await client.aclose()
    assert all(claim.granted and claim.fallback for claim in claims)
    assert (throttle.fallbacks, throttle.saturations) == (6, 0)
    assert (
        "failed open after TimeoutError: Redis failed" in throttle_warnings(caplog)[0].getMessage()
    )


@pytest.mark.redis
@pytest.mark.asyncio
async def test_a_client_pool_exhausted_by_other_users_denies_without_blaming_redis(
    redis_url: str, own_keys: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aioevents.throttle")
    client = Redis.from_url(redis_url, max_connections=1)
    try:
        throttle = RedisThrottle(client, prefix=own_keys, timeout=0.05)
        assert throttle.max_connections == 1  # never more than the client's pool
        pool = client.connection_pool
        held = await pool.get_connection()  # type: ignore[no-untyped-call]  # another user
        try:
            claim = await throttle.claim("k", 300)
        finally:
            await pool.release(held)
        assert (await throttle.claim("k", 300)).granted
    finally:
        await client.aclose()
    assert (claim.granted, claim.fallback) == (False, False)
    assert (throttle.saturations, throttle.fallbacks) == (1, 0)
    [warning] = throttle_warnings(caplog)
    assert warning.getMessage().startswith(
        "RedisThrottle denied a claim: its client's connection pool was exhausted by other "
        "users for 0.05s. Redis is not at fault"
    )


@pytest.mark.asyncio
async def test_a_killed_redis_server_fails_open_and_the_warning_blames_redis(
    redis_server: tuple[subprocess.Popen[bytes], int], caplog: pytest.LogCaptureFixture
) -> None:
    server, port = redis_server
    caplog.set_level(logging.WARNING, logger="aioevents.throttle")
    client = client_for(port)
    try:
        throttle = RedisThrottle(client, timeout=SLACK)
        held = await throttle.claim("hot", 300)
        assert (held.granted, held.fallback) == (True, False)
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=10)

        claims = await claim_concurrently([throttle], "hot", CONCURRENT_CLAIMS)
    finally:
        await client.aclose()
    assert all(claim.granted and claim.fallback for claim in claims)
    assert (throttle.fallbacks, throttle.saturations) == (CONCURRENT_CLAIMS, 0)
    [warning] = throttle_warnings(caplog)
    message = warning.getMessage()
    assert message.startswith("RedisThrottle failed open after ConnectionError")
    assert "Redis failed, is unreachable or did not answer in time" in message


# Failing open


@pytest.mark.asyncio
async def test_unreachable_redis_grants_fallback_claims_and_warns_once_per_interval(
    unreachable_client: Redis, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aioevents.throttle")
    counter = FallbackCounter("throttle", warn_interval=60, clock=clock)
    throttle = RedisThrottle(unreachable_client, counter=counter)

    claims = [await throttle.claim("k", 300) for _ in range(25)]
    assert all(claim.granted and claim.fallback for claim in claims)
    assert throttle.fallbacks == 25
    [warning] = throttle_warnings(caplog)
    assert warning.levelno == logging.WARNING
    assert "throttle failed open after ConnectionError" in warning.getMessage()

    clock.advance(59.9)
    await throttle.claim("k", 300)
    assert len(throttle_warnings(caplog)) == 1
    clock.advance(0.1)
    await throttle.claim("k", 300)
    assert len(throttle_warnings(caplog)) == 2
    assert "27 fallbacks so far" in throttle_warnings(caplog)[-1].getMessage()


@pytest.mark.asyncio
async def test_release_of_a_fallback_claim_does_not_call_redis(
    unreachable_client: Redis,
) -> None:
    throttle = RedisThrottle(unreachable_client)
    claim = await throttle.claim("k", 300)
    assert claim.fallback
    assert not await claim.release()
    assert throttle.fallbacks == 1  # the claim's failure only; release made no call


@pytest.mark.asyncio
async def test_hung_redis_times_out_into_a_fallback_claim(
    hung_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aioevents.throttle")
    client = client_for(hung_port)
    try:
        throttle = RedisThrottle(client, timeout=0.1)
        started = time.monotonic()
        claim = await throttle.claim("k", 300)
        elapsed = time.monotonic() - started
    finally:
        await client.aclose()
    assert (claim.granted, claim.fallback) == (True, True)
    assert elapsed < 1.0
    assert throttle.fallbacks == 1
    assert "failed open after TimeoutError" in throttle_warnings(caplog)[0].getMessage()


@pytest.mark.asyncio
async def test_cancelling_a_claim_is_not_a_fallback(hung_port: int) -> None:
    client = client_for(hung_port)
    try:
        throttle = RedisThrottle(client, timeout=10)
        with anyio.move_on_after(0.1) as scope:
            await throttle.claim("k", 300)
    finally:
        await client.aclose()
    assert scope.cancelled_caught
    assert throttle.fallbacks == 0


@pytest.mark.redis
@pytest.mark.asyncio
async def test_own_redis_server_stopped_resumed_and_killed_mid_run(
    redis_server: tuple[subprocess.Popen[bytes], int], prefix: str
) -> None:
    server, port = redis_server
    client = client_for(port)
    try:
        counter = FallbackCounter("own server")
        hasty = RedisThrottle(client, prefix=prefix, timeout=0.25, counter=counter)
        patient = RedisThrottle(client, prefix=prefix, timeout=SLACK, counter=counter)
        held = await patient.claim("held", 300)
        assert (held.granted, held.fallback) == (True, False)

        server.send_signal(signal.SIGSTOP)  # hung: accepts, never answers
        started = time.monotonic()
        paused = [await hasty.claim("held", 300) for _ in range(3)]
        assert time.monotonic() - started < 3.0
        assert all(claim.granted and claim.fallback for claim in paused)
        assert counter.count == 3

        server.send_signal(signal.SIGCONT)  # the timed-out calls must not garble later replies
        assert not (await patient.claim("held", 300)).granted
        assert (await patient.claim("fresh", 300)).fallback is False

        claims: list[Claim] = []
        server_gone = anyio.Event()

        async def claim_until_well_after_the_kill() -> None:
            after_kill = 0
            while after_kill < 20:
                claims.append(await patient.claim(f"run-{len(claims)}", 300))
                after_kill += server_gone.is_set()
                await anyio.sleep(0.001)

        async with anyio.create_task_group() as tg:
            tg.start_soon(claim_until_well_after_the_kill)
            await anyio.sleep(0.05)
            server.terminate()
            await anyio.to_thread.run_sync(server.wait)
            server_gone.set()

        assert all(claim.granted for claim in claims)
        assert not claims[0].fallback
        assert all(claim.fallback for claim in claims[-20:])
        assert not await held.release()  # absorbed: the server is gone
        assert counter.count >= 3 + 20 + 1
    finally:
        await client.aclose()


# redis_fallback on its own


@pytest.mark.asyncio
async def test_redis_fallback_returns_the_result_when_redis_answers() -> None:
    @redis_fallback(default=-1)
    async def answer(x: int) -> int:
        return x * 2

    result = await answer(21)
    assert_type(result, int)
    assert result == 42


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.ConnectionError("refused"),
        redis.exceptions.TimeoutError("slow"),
        redis.exceptions.ResponseError("LOADING"),
        ConnectionResetError("reset"),
        TimeoutError(),
        OSError("no route"),
    ],
)
async def test_redis_fallback_absorbs_redis_and_network_errors(error: Exception) -> None:
    counter = FallbackCounter("cache")
    seen: list[Exception] = []

    @redis_fallback(default=None, counter=counter, on_error=seen.append)
    async def forget(key: str) -> bool:
        raise error

    assert await forget("k") is None
    assert counter.count == 1
    assert seen == [error]


@pytest.mark.asyncio
@pytest.mark.parametrize("error", [ValueError("bug"), KeyError("bug"), RuntimeError("bug")])
async def test_redis_fallback_lets_other_errors_through(error: Exception) -> None:
    counter = FallbackCounter("cache")
    seen: list[Exception] = []

    @redis_fallback(default=None, counter=counter, on_error=seen.append)
    async def buggy() -> None:
        raise error

    with pytest.raises(type(error), match="bug"):
        await buggy()
    assert counter.count == 0
    assert seen == []


@pytest.mark.anyio  # backend-neutral: runs on asyncio and trio
async def test_redis_fallback_times_out_a_slow_call() -> None:
    counter = FallbackCounter("slow")

    @redis_fallback(default="fallback", timeout=0.05, counter=counter)
    async def slow() -> str:
        await anyio.sleep(10)
        return "answer"

    with anyio.fail_after(2):
        assert await slow() == "fallback"
    assert counter.count == 1


@pytest.mark.asyncio
async def test_redis_fallback_without_a_timeout_waits() -> None:
    @redis_fallback(default="fallback", timeout=None)
    async def slow() -> str:
        await anyio.sleep(0.3)  # longer than the default timeout
        return "answer"

    assert await slow() == "answer"


@pytest.mark.asyncio
async def test_redis_fallback_names_its_own_counter_after_the_function(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="aioevents.throttle")

    @redis_fallback(default=False)
    async def delete_cached_page(key: str) -> bool:
        raise redis.exceptions.ConnectionError()

    assert delete_cached_page.__name__ == "delete_cached_page"
    assert not await delete_cached_page("k")
    assert not await delete_cached_page("k")
    [warning] = throttle_warnings(caplog)
    assert warning.getMessage().startswith(
        "test_redis_fallback_names_its_own_counter_after_the_function.<locals>"
        ".delete_cached_page failed open after ConnectionError: Redis failed, is unreachable "
        "or did not answer in time (1 fallbacks so far"
    )


def test_a_fallback_for_an_exhausted_client_pool_does_not_blame_redis(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="aioevents.throttle")
    FallbackCounter("cache").record(redis.exceptions.MaxConnectionsError("Too many connections"))
    [warning] = throttle_warnings(caplog)
    assert warning.getMessage().startswith(
        "cache failed open after MaxConnectionsError: Too many connections: the client's "
        "connection pool had no free connection: this process's own load, not a Redis failure"
    )


def test_fallback_counter_with_zero_interval_warns_every_time(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aioevents.throttle")
    counter = FallbackCounter("noisy", warn_interval=0, clock=clock)
    for _ in range(3):
        counter.record(OSError("down"))
    counter.record(TimeoutError())
    assert counter.count == 4
    assert counter.causes == {"OSError": 3, "TimeoutError": 1}
    assert len(throttle_warnings(caplog)) == 4


@pytest.fixture
def without_redis(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(sys.modules, "redis.exceptions", None)
    _absorbed_errors.cache_clear()
    yield
    _absorbed_errors.cache_clear()


@pytest.mark.usefixtures("without_redis")
def test_without_redis_installed_only_network_errors_are_absorbed() -> None:
    assert _absorbed_errors() == (OSError,)


def test_without_redis_installed_the_redis_throttle_names_the_extra_to_install() -> None:
    code = (
        "import sys\n"
        "sys.modules['redis'] = None  # as if the extra were not installed\n"
        "import anyio\n"
        "from aioevents.throttle import MemoryThrottle, RedisThrottle\n"
        "assert anyio.run(MemoryThrottle().claim, 'k', 1).granted\n"
        "try:\n"
        "    RedisThrottle(object())\n"
        "except ModuleNotFoundError as exc:\n"
        "    print(exc.name, '|', exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.startswith("redis")  # the missing module's name, as ImportError gives it
    assert "| RedisThrottle needs redis-py" in done.stdout
    assert "pip install 'aioevents[redis]'" in done.stdout


def test_importing_aioevents_does_not_import_the_throttle_or_redis() -> None:
    code = (
        "import sys, aioevents\n"
        "assert 'aioevents.throttle' not in sys.modules\n"
        "import aioevents.throttle\n"
        "assert 'redis' not in sys.modules, 'redis is imported on the first failure only'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
