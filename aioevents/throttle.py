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
- `RedisThrottle`: every process sharing a Redis server. A claim is one ``SET key token NX PX ms``
  (atomic, one round trip); release deletes the key only if it still holds this claim's token.
  When Redis fails or does not answer within a short timeout, the claim is granted anyway with
  ``fallback=True``: a throttle that is down must not stop the work it only rate-limits.

The fail-open machinery is public for other Redis helpers: `redis_fallback` wraps an async
function so Redis and network errors (and its own timeout) return a default instead, counted
and logged by a `FallbackCounter` at most once per interval. Any other exception propagates.

This module imports ``redis`` only when a Redis error must be recognised, so `MemoryThrottle`
works without the ``redis`` extra; ``aioevents`` itself never imports this module.
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final, ParamSpec, Protocol, TypeVar, final, runtime_checkable

import anyio
import anyio.lowlevel

from ._exceptions import ConfigurationError

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
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

P = ParamSpec("P")
R = TypeVar("R")
D = TypeVar("D")

# Deletes the key only while it still holds the caller's token: after the window expired and
# another worker claimed the key, a late release must not delete that worker's claim.
_RELEASE_SCRIPT: Final = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


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
    """A `Throttle` shared by every process using one Redis server; fails open.

    ``redis`` is a ``redis.asyncio.Redis`` client, which the caller owns and closes. Keys are
    stored as ``prefix + key``. Each Redis call has ``timeout`` seconds; a call that fails with
    a Redis or network error or times out grants the claim with ``fallback=True``, and is
    counted and logged by ``counter`` (by default a fresh `FallbackCounter` named
    ``"RedisThrottle"``, warning at most once a minute). ``fallbacks`` is that count.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        counter: FallbackCounter | None = None,
    ) -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, not {type(prefix).__name__}")
        _check_seconds("timeout", timeout)
        self.prefix = prefix
        self.counter = counter if counter is not None else FallbackCounter("RedisThrottle")
        self._redis = redis
        self._release_script = redis.register_script(_RELEASE_SCRIPT)
        self._set_nx = redis_fallback(default=None, timeout=timeout, counter=self.counter)(
            self._set_nx_unguarded
        )
        self._delete_own = redis_fallback(default=False, timeout=timeout, counter=self.counter)(
            self._delete_own_unguarded
        )

    @property
    def fallbacks(self) -> int:
        """How many Redis calls failed and were answered without Redis."""
        return self.counter.count

    async def claim(self, key: str, window: float) -> Claim:
        milliseconds = max(1, round(_check_claim(key, window) * 1000))
        redis_key, token = self.prefix + key, secrets.token_hex(16)
        granted = await self._set_nx(redis_key, token, milliseconds)
        if granted is None:
            return Claim(key, granted=True, fallback=True)
        if not granted:
            return Claim(key, granted=False)
        releaser = functools.partial(self._release, redis_key, token)
        return Claim(key, granted=True, releaser=releaser)

    async def _release(self, redis_key: str, token: str) -> bool:
        # Release is clean-up, often run while the caller is being cancelled; the timeout
        # bounds how long the shield can hold the caller.
        with anyio.CancelScope(shield=True):
            released = await self._delete_own(redis_key, token)
        return released

    async def _set_nx_unguarded(self, redis_key: str, token: str, milliseconds: int) -> bool:
        return bool(await self._redis.set(redis_key, token, nx=True, px=milliseconds))

    async def _delete_own_unguarded(self, redis_key: str, token: str) -> bool:
        return bool(await self._release_script(keys=[redis_key], args=[token]))


class FallbackCounter:
    """Counts the failures a fail-open path absorbed; logs a warning at most once per interval.

    The first failure is logged at once, then at most one every ``warn_interval`` seconds
    (``0`` logs each one), on the ``aioevents.throttle`` logger, with the count so far.
    ``clock`` returns seconds and is injectable for tests; it defaults to `time.monotonic`.
    """

    def __init__(
        self,
        name: str = "redis",
        *,
        warn_interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_seconds("warn_interval", warn_interval, allow_zero=True)
        self.name = name
        self.warn_interval = warn_interval
        self.count = 0
        self._clock = clock
        self._warned_at: float | None = None

    def record(self, exc: BaseException) -> None:
        """Count one absorbed failure, and log it unless a warning was logged recently."""
        self.count += 1
        now = self._clock()
        if self._warned_at is not None and now - self._warned_at < self.warn_interval:
            return
        self._warned_at = now
        logger.warning(
            "%s failed open after %s (%d fallbacks so far; next warning in %gs at the earliest)",
            self.name,
            _describe(exc),
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

    def decorate(func: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R | D]]:
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


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
