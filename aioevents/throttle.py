"""At most one claim per key per window, shared by every process on one backend; fails open.

A throttle answers "may I do this now?" for work that must not run more often than once per
window, such as writing a provider's ``last_used`` timestamp at most every five minutes::

    claim = await throttle.claim(f"{tenant}:{provider}", 300)
    if claim.granted:
        try:
            async with session.begin():
                provider.last_used = now
        except BaseException:
            await claim.release()  # the write did not happen: give the window back
            raise

`claim` always returns a `Claim`; a denied one has ``granted=False``, and releasing it (or
releasing twice) does nothing, so the caller never needs to check before releasing.

Backends:

- `MemoryThrottle`: one process, one event loop; for embedded use and tests.
- `RedisThrottle`: every process sharing a Redis server. A claim is redis-py's own asyncio
  ``Lock``, acquired without blocking: one ``SET key token NX PX ms`` (atomic, one round trip);
  release deletes the key only if it still holds this claim's token. When Redis fails or does
  not answer within a short timeout, the claim is granted anyway with ``fallback=True``: a
  throttle that is down must not stop the work it only rate-limits. Load is not an outage:
  however many claims run at once, each waits for one of the throttle's connections, and a
  key is never granted twice because of it.

The fail-open machinery is public for other Redis helpers: `redis_fallback` wraps an async
function so Redis and network errors (and its own timeout) return a default instead, counted
and logged by a `FallbackCounter` at most once per interval. Any other exception propagates.

This module imports ``redis`` only when a `RedisThrottle` is built or a Redis error must be
recognised, so `MemoryThrottle` works without the ``redis`` extra; ``aioevents`` itself never
imports this module.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, Final, ParamSpec, Protocol, TypeVar, final, runtime_checkable

import anyio
import anyio.lowlevel

from ._checks import check_callable, check_instance
from ._exceptions import ConfigurationError

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_PREFIX",
    "DEFAULT_TIMEOUT",
    "Claim",
    "FallbackCounter",
    "MemoryThrottle",
    "RedisThrottle",
    "Throttle",
    "redis_fallback",
]

logger = logging.getLogger("aioevents.throttle")

DEFAULT_PREFIX: Final = "aioevents:throttle:"
DEFAULT_TIMEOUT: Final = 0.25
"""Seconds a Redis call may take before it counts as failed; short, as a handler waits on it."""
DEFAULT_MAX_CONNECTIONS: Final = 50
"""The most Redis calls a `RedisThrottle` has in flight, unless its client's pool is smaller.

Below redis-py's default pool of 100, so a client shared with a cache keeps connections for it.
"""
_POOL_RETRY_INTERVAL: Final = 0.005  # a pool exhausted by others raises at once: poll it

P = ParamSpec("P")
R = TypeVar("R")
D = TypeVar("D")


@final
class Claim:
    """The answer to `Throttle.claim`: whether the caller may go ahead, and how to undo it.

    ``granted`` is true when the caller holds the key for the window. ``fallback`` is true when
    it was granted only because the backend failed (there is then nothing to release).
    Backends build claims; a granted, releasable one carries an async ``releaser``.
    """

    __slots__ = ("_releaser", "fallback", "granted", "key")

    def __init__(
        self,
        key: str,
        *,
        granted: bool,
        fallback: bool = False,
        releaser: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.key = key
        self.granted = granted
        self.fallback = fallback
        self._releaser = releaser

    async def release(self) -> bool:
        """Give the window back, so the next claim of the key is granted at once.

        Returns true only if this call ended a claim that was still held. Releasing a denied
        or fail-open claim, one whose window already expired, or one already released does
        nothing and returns false; a backend failure is absorbed like a failed claim.
        """
        releaser, self._releaser = self._releaser, None  # before awaiting: concurrent calls too
        if releaser is None:
            return False
        return await releaser()

    def __repr__(self) -> str:
        return f"Claim({self.key!r}, granted={self.granted}, fallback={self.fallback})"


@runtime_checkable
class Throttle(Protocol):
    """Grants at most one claim per key per window among everyone sharing the backend."""

    async def claim(self, key: str, window: float) -> Claim:
        """Claim ``key`` for ``window`` seconds (a positive number; Redis keeps milliseconds).

        Raises `TypeError` for a key that is not a `str` or a window that is not a number,
        and `ConfigurationError` for an empty key or a window that is not positive and finite.
        """
        ...


class MemoryThrottle:
    """A `Throttle` within one process and event loop: same semantics, no server.

    ``clock`` returns seconds and is injectable for tests; it defaults to `time.monotonic`.
    Expired claims are dropped lazily, so the memory held stays proportional to live claims.
    """

    _PRUNE_MIN: Final = 1024

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        check_callable("clock", clock)
        self._clock = clock
        self._claims: dict[str, tuple[object, float]] = {}  # key -> (owner token, expires at)
        self._prune_at = self._PRUNE_MIN

    async def claim(self, key: str, window: float) -> Claim:
        seconds = _check_claim(key, window)
        await anyio.lowlevel.checkpoint()
        # No await from here on: the check and the write are one step for the event loop.
        now = self._clock()
        held = self._claims.get(key)
        if held is not None and held[1] > now:
            return Claim(key, granted=False)
        if len(self._claims) >= self._prune_at:
            self._prune(now)
        token = object()
        self._claims[key] = (token, now + seconds)
        return Claim(key, granted=True, releaser=functools.partial(self._release, key, token))

    async def _release(self, key: str, token: object) -> bool:
        held = self._claims.get(key)
        if held is None or held[0] is not token:
            return False  # expired and claimed again since: that claim is someone else's
        del self._claims[key]
        return held[1] > self._clock()

    def _prune(self, now: float) -> None:
        self._claims = {key: held for key, held in self._claims.items() if held[1] > now}
        self._prune_at = max(self._PRUNE_MIN, 2 * len(self._claims))


class RedisThrottle:
    """A `Throttle` shared by every process using one Redis server; fails open on an outage.

    ``redis`` is a ``redis.asyncio.Redis`` client, which the caller owns and closes. Keys are
    stored as ``prefix + key``. A claim is redis-py's own `redis.asyncio.lock.Lock`, acquired
    without blocking: ``SET key token NX PX window``; release runs its compare-and-delete script.

    Redis fails, is unreachable, or does not answer within ``timeout`` seconds: the claim is
    granted with ``fallback=True``, counted and logged by ``counter`` (by default a fresh
    `FallbackCounter` named ``"RedisThrottle"``, warning at most once a minute).
    ``fallbacks`` is that count.

    Load is not an outage: at most ``max_connections`` calls are in flight (default: the
    client's pool size, at most `DEFAULT_MAX_CONNECTIONS`); more concurrent claims wait for
    one of them, and neither fail open nor are denied for it. Every call in flight ends within
    ``timeout``, so a claim waits at most ``timeout`` per ``max_connections`` claims ahead of
    it; behind a hung Redis the queue falls back in waves. Only when the client's pool is
    exhausted by its *other* users (redis-py's ``MaxConnectionsError``) for ``timeout``
    seconds is a claim denied, as if another worker held the window: it is counted in
    ``saturations`` and logged as this process's own load, not as a Redis failure.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        counter: FallbackCounter | None = None,
        max_connections: int | None = None,
    ) -> None:
        lock_class, not_owned = _redis_lock()
        _check_client(redis)
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, not {type(prefix).__name__}")
        self._timeout = _check_seconds("timeout", timeout)
        check_instance(counter, FallbackCounter, _COUNTER_REQUIRED, none=True)
        self.prefix = prefix
        self.counter = counter if counter is not None else FallbackCounter("RedisThrottle")
        self.max_connections = _connections_for(redis, max_connections)
        self.saturations = 0
        self._saturation_warned_at: float | None = None
        self._redis = redis
        self._lock_class = lock_class
        self._not_owned = not_owned
        self._slots = anyio.CapacityLimiter(self.max_connections)
        guard = redis_fallback(default=None, timeout=timeout, counter=self.counter)
        self._acquire = guard(self._acquire_unguarded)
        self._release_lock = guard(self._release_unguarded)

    @property
    def fallbacks(self) -> int:
        """How many Redis calls failed and were answered without Redis."""
        return self.counter.count

    async def claim(self, key: str, window: float) -> Claim:
        milliseconds = max(1, round(_check_claim(key, window) * 1000))
        # Lock truncates int(seconds * 1000); half a millisecond more gives back exactly these.
        lock = self._lock_class(
            self._redis,
            self.prefix + key,
            timeout=(milliseconds + 0.5) / 1000,
            blocking=False,
            thread_local=False,  # one lock per claim, released by whichever task holds it
        )
        granted = await self._ask(self._acquire, lock, secrets.token_hex(16))
        if granted is None:
            return Claim(key, granted=True, fallback=True)
        if not granted:
            return Claim(key, granted=False)
        return Claim(key, granted=True, releaser=functools.partial(self._release, lock))

    async def _release(self, lock: Any) -> bool:
        # Release is clean-up, often run while the caller is being cancelled; the calls ahead
        # of it and its own are bounded by the timeout, and so is the shield.
        with anyio.CancelScope(shield=True):
            released = await self._ask(self._release_lock, lock)
        return bool(released)

    async def _ask(
        self, call: Callable[..., Awaitable[bool | None]], lock: Any, *args: str
    ) -> bool | None:
        """Make one Redis call on one of the throttle's connections: its answer, None to fail open.

        Waiting for a connection has no deadline of its own: a claim that gave up waiting
        could only fail open (granting a key twice under load) or be denied (skipping work
        nobody did), and the calls ahead of it each end within the timeout anyway.
        """
        borrower = object()  # not the task: one task may hold several claims' releases
        await self._slots.acquire_on_behalf_of(borrower)
        try:
            return await self._call_on_the_pool(call, lock, *args)
        finally:
            self._slots.release_on_behalf_of(borrower)

    async def _call_on_the_pool(
        self, call: Callable[..., Awaitable[bool | None]], lock: Any, *args: str
    ) -> bool | None:
        # The client's pool may be shared with other code that holds every connection: it
        # raises at once, without I/O, so retry until one comes back or the timeout passes.
        give_up_at = anyio.current_time() + self._timeout
        while True:
            try:
                return await call(lock, *args)
            except _PoolExhausted:
                if anyio.current_time() >= give_up_at:
                    self._saturated()
                    return False
                await anyio.sleep(_POOL_RETRY_INTERVAL)

    def _saturated(self) -> None:
        self.saturations += 1
        now, interval = self.counter._clock(), self.counter.warn_interval
        warned_at = self._saturation_warned_at
        if warned_at is not None and now - warned_at < interval:
            return
        self._saturation_warned_at = now
        logger.warning(
            "%s denied a claim: its client's connection pool was exhausted by other users for "
            "%gs. Redis is not at fault: this process's own load; give the throttle a client "
            "of its own, or a larger pool (%d saturations so far; next warning in %gs at the "
            "earliest)",
            self.counter.name,
            self._timeout,
            self.saturations,
            interval,
            extra={"fallback_name": self.counter.name, "saturations": self.saturations},
        )

    async def _acquire_unguarded(self, lock: Any, token: str) -> bool:
        with _pool_exhaustion():
            return bool(await lock.acquire(token=token))

    async def _release_unguarded(self, lock: Any) -> bool:
        try:
            with _pool_exhaustion():
                await lock.release()
        except self._not_owned:  # a RedisError, but an answer: the window expired, maybe
            return False  # claimed again since, and that claim is someone else's
        return True


class _PoolExhausted(Exception):
    """The client's own pool had no connection: not a Redis or network error, so not absorbed."""


@contextlib.contextmanager
def _pool_exhaustion() -> Iterator[None]:
    from redis.exceptions import MaxConnectionsError

    try:
        yield
    except MaxConnectionsError as exc:
        raise _PoolExhausted(str(exc)) from exc


def _redis_lock() -> tuple[type[Any], type[Exception]]:
    try:
        from redis.asyncio.lock import Lock
        from redis.exceptions import LockNotOwnedError
    except ImportError as missing:
        raise ModuleNotFoundError(
            f"RedisThrottle needs redis-py ({missing}): install the extra with "
            f"pip install 'aioevents[redis]'",
            name=missing.name,
        ) from missing
    return Lock, LockNotOwnedError


def _check_client(redis: object) -> None:
    from redis.asyncio import Redis

    if isinstance(redis, Redis):
        return
    hint = ""
    if type(redis).__module__.startswith("redis.") and hasattr(redis, "connection_pool"):
        hint = " (the synchronous client? use redis.asyncio.Redis)"
    raise TypeError(f"RedisThrottle() takes a redis.asyncio.Redis client, got {redis!r}{hint}")


def _connections_for(redis: Redis, max_connections: object) -> int:
    if max_connections is None:
        pool_size = getattr(redis.connection_pool, "max_connections", None)
        if isinstance(pool_size, int) and pool_size > 0:
            return min(pool_size, DEFAULT_MAX_CONNECTIONS)
        return DEFAULT_MAX_CONNECTIONS
    if isinstance(max_connections, bool) or not isinstance(max_connections, int):
        raise TypeError(
            f"max_connections must be an int or None, not {type(max_connections).__name__}"
        )
    if max_connections < 1:
        raise ConfigurationError(f"max_connections must be 1 or more, got {max_connections!r}")
    return max_connections


class FallbackCounter:
    """Counts the failures a fail-open path absorbed; logs a warning at most once per interval.

    The first failure is logged at once, then at most one every ``warn_interval`` seconds
    (``0`` logs each one), on the ``aioevents.throttle`` logger, with the count so far.
    ``causes`` counts them by exception type name (``{"TimeoutError": 3}``): the warnings
    name only the first cause of each interval.
    ``clock`` returns seconds and is injectable for tests; it defaults to `time.monotonic`.
    """

    def __init__(
        self,
        name: str = "redis",
        *,
        warn_interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(name, str):
            raise TypeError(f"FallbackCounter name must be a str, not {type(name).__name__}")
        _check_seconds("warn_interval", warn_interval, allow_zero=True)
        check_callable("clock", clock)
        self.name = name
        self.warn_interval = warn_interval
        self.count = 0
        self.causes: collections.Counter[str] = collections.Counter()
        self._clock = clock
        self._warned_at: float | None = None

    def record(self, exc: BaseException) -> None:
        """Count one absorbed failure, and log it unless a warning was logged recently."""
        self.count += 1
        self.causes[type(exc).__name__] += 1
        now = self._clock()
        if self._warned_at is not None and now - self._warned_at < self.warn_interval:
            return
        self._warned_at = now
        logger.warning(
            "%s failed open after %s: %s (%d fallbacks so far; next warning in %gs at the "
            "earliest)",
            self.name,
            _describe(exc),
            _blame(exc),
            self.count,
            self.warn_interval,
            extra={"fallback_name": self.name, "fallbacks": self.count},
        )


def redis_fallback(
    *,
    default: D,
    timeout: float | None = DEFAULT_TIMEOUT,
    counter: FallbackCounter | None = None,
    on_error: Callable[[Exception], object] | None = None,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Coroutine[Any, Any, R | D]]]:
    """Decorate an async function so a Redis outage returns ``default`` instead of raising.

    Absorbed: ``redis.exceptions.RedisError``, `OSError` (`ConnectionError` and the socket
    errors) and `TimeoutError`, including the one raised when the call takes longer than
    ``timeout`` seconds (``None``: no limit). Each is recorded by ``counter`` (by default one
    made for the function, named after it), then passed to ``on_error`` if given. Every other
    exception, cancellation included, propagates unchanged::

        cache_failures = FallbackCounter("cache")

        @redis_fallback(default=False, counter=cache_failures)
        async def forget(key: str) -> bool:
            return bool(await client.delete(key))
    """
    if timeout is not None:
        _check_seconds("timeout", timeout)
    check_instance(counter, FallbackCounter, _COUNTER_REQUIRED, none=True)
    if on_error is not None:
        check_callable("on_error", on_error)

    def decorate(func: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R | D]]:
        _check_async_function(func)
        failures = counter
        if failures is None:
            failures = FallbackCounter(getattr(func, "__qualname__", repr(func)))
        record = failures.record

        @functools.wraps(func)
        async def guarded(*args: P.args, **kwargs: P.kwargs) -> R | D:
            try:
                with anyio.fail_after(timeout):
                    return await func(*args, **kwargs)
            except Exception as exc:
                if not isinstance(exc, _absorbed_errors()):
                    raise
                record(exc)
                if on_error is not None:
                    on_error(exc)
                return default

        return guarded

    return decorate


@functools.cache
def _absorbed_errors() -> tuple[type[Exception], ...]:
    # Imported on the first failure only: redis is an optional extra and slow to import.
    try:
        from redis.exceptions import RedisError
    except ImportError:  # without redis installed, no RedisError can be raised
        return (OSError,)  # TimeoutError and ConnectionError are OSErrors
    return (RedisError, OSError)


def _blame(exc: BaseException) -> str:
    try:
        from redis.exceptions import MaxConnectionsError
    except ImportError:
        return _REDIS_BLAMED
    if isinstance(exc, MaxConnectionsError):
        return _POOL_BLAMED
    return _REDIS_BLAMED


_REDIS_BLAMED: Final = "Redis failed, is unreachable or did not answer in time"
_POOL_BLAMED: Final = (
    "the client's connection pool had no free connection: this process's own load, "
    "not a Redis failure"
)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_COUNTER_REQUIRED = "counter must be a FallbackCounter or None"


def _check_async_function(func: object) -> None:
    # A plain function would fail only when called, with "can't be used in 'await'".
    sync_def = inspect.isfunction(func) and not inspect.iscoroutinefunction(func)
    if sync_def or not callable(func):
        raise TypeError(f"redis_fallback() decorates an async function, got {func!r}")


def _check_claim(key: str, window: float) -> float:
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, not {type(key).__name__}")
    if not key:
        raise ConfigurationError("key must not be empty")
    return _check_seconds("window", window)


def _check_seconds(name: str, value: float, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = "zero or more" if allow_zero else "more than zero"
        raise ConfigurationError(f"{name} must be finite and {bound} seconds, got {value!r}")
    return float(value)
