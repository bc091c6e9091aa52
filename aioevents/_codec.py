"""How the outbox turns events into stored text and back, and the ids it gives them.

An event is stored as three things: its name, its version (`event_name`, `event_version`)
and its fields as JSON text. Never its import path: a class can move between modules, and a
payload written a year ago must still find it. JSON text rather than a binary format, because
people read these rows: in psql, and in the operations panel next to a dead delivery.

msgspec does the encoding and decoding because it is fast and validates as it decodes: a
payload comes back as an instance of the registered class with every field checked, or as an
`EventDecodeError` saying which field is wrong. It knows dataclasses, `msgspec.Struct`, attrs
classes and the stdlib types events carry (datetimes, UUIDs, decimals, enums, bytes as base64,
the collections, nested classes, ``Optional``, ``Literal``).

When an event type changes shape, its class raises ``__event_version__`` and registers an
*upcaster* for the old version: a function from the old payload (a dict) to the next
version's. Payloads of the current version take the fast path, one typed decoder per class;
older ones are decoded to builtins, lifted one version at a time, then converted to the class
with the same strictness the typed decoder has.

`uuid7` makes the ids of recorded events: time-ordered, so rows are written in index order and
sorting by id is sorting by recording time.
"""

from __future__ import annotations

import functools
import os
import threading
import uuid
from collections.abc import Callable, Iterable
from time import time_ns
from typing import Any, TypeVar

import msgspec

from ._exceptions import AioEventsError, ConfigurationError
from ._names import event_name, event_version, handler_name

__all__ = ["Codec", "EventDecodeError", "Upcaster", "uuid7"]

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
"""Lifts an event's payload from one version to the next."""

U = TypeVar("U", bound=Upcaster)

# The layout of a UUID version 7 (RFC 9562 §5.7), from the most significant bit: a 48-bit unix
# timestamp in ms, the version (4 bits), rand_a (12 bits, here a counter), the variant (2 bits),
# rand_b (62 random bits).
_VERSION_7 = 0x7 << 76
_VARIANT_RFC = 0b10 << 62
_RAND_B = (1 << 62) - 1
_COUNTER_MAX = 0xFFF

_uuid7_lock = threading.Lock()
_uuid7_ms = 0  # the timestamp and counter of the last UUID made in this process
_uuid7_counter = 0


def uuid7() -> uuid.UUID:
    """Return a new UUID version 7; each is greater than the previous one in this process.

    RFC 9562 §6.2 method 1: rand_a is a 12-bit counter, seeded at random in each millisecond
    with its top bit clear so that at least 2048 ids fit in one; when it runs out, the
    timestamp moves on by a millisecond ahead of the clock. A clock that goes back does not
    break the order: the last timestamp is kept until the clock passes it.
    """
    rand = int.from_bytes(os.urandom(10))
    ms, counter = _next_stamp(time_ns() // 1_000_000, seed=rand >> 69)
    return uuid.UUID(int=ms << 80 | _VERSION_7 | counter << 64 | _VARIANT_RFC | rand & _RAND_B)


def _next_stamp(now_ms: int, *, seed: int) -> tuple[int, int]:
    global _uuid7_ms, _uuid7_counter
    # A lock because relays and sync handlers may record from worker threads; uncontended it
    # costs far less than the urandom call.
    with _uuid7_lock:
        if now_ms > _uuid7_ms:
            _uuid7_ms, _uuid7_counter = now_ms, seed
        elif _uuid7_counter < _COUNTER_MAX:
            _uuid7_counter += 1
        else:
            _uuid7_ms, _uuid7_counter = _uuid7_ms + 1, seed
        return _uuid7_ms, _uuid7_counter


class EventDecodeError(AioEventsError):
    """Raised when a stored payload cannot become an event.

    Its name is unknown, its version is newer than the class's, an upcaster it needs is
    missing or failed, or the payload does not validate against the class. ``reason`` says
    which, ``name`` and ``version`` are those stored with the payload.
    """

    def __init__(self, reason: str, *, name: str, version: int) -> None:
        super().__init__(f"cannot decode event {name!r} version {version}: {reason}")
        self.reason = reason
        self.name = name
        self.version = version

    def __reduce__(self) -> tuple[Any, ...]:
        # The keyword-only context is not in ``args``: rebuild from it so the error pickles.
        rebuild = functools.partial(EventDecodeError, name=self.name, version=self.version)
        return (rebuild, (self.reason,))


class Codec:
    """Encodes events to JSON text and decodes them back by name and version.

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class AppWasCreated:
    ...     app_id: str
    >>> codec = Codec()
    >>> codec.register(AppWasCreated)
    >>> codec.encode(AppWasCreated(app_id="a1"))
    '{"app_id":"a1"}'
    >>> codec.decode("app-was-created", 1, '{"app_id":"a1"}')
    AppWasCreated(app_id='a1')

    One codec serves an outbox's relays. Its tables change only by one-key updates or by being
    replaced whole, so it can be shared between threads under the GIL.
    """

    def __init__(self) -> None:
        self._roots: dict[type, None] = {}  # the classes given to register(), in order
        self._types: dict[str, type] = {}  # event name -> class, roots and their subclasses
        self._decoders: dict[type, msgspec.json.Decoder[Any]] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}
        self._encoder = msgspec.json.Encoder(decimal_format="string")
        self._headers_decoder = msgspec.json.Decoder(dict[str, str])

    def register(self, *event_types: type) -> None:
        """Make each class and every subclass of it decodable by its event name.

        A subclass defined later is found too, the first time a payload carries its name.
        Two classes with one name are refused, and nothing is registered then.
        """
        for cls in event_types:
            if not isinstance(cls, type):
                raise TypeError(f"register() takes event classes, got {cls!r}")
        roots = {**self._roots, **dict.fromkeys(event_types)}
        self._types = _event_types(roots)
        self._roots = roots

    def upcaster(self, event: type | str, *, from_version: int) -> Callable[[U], U]:
        """Register the decorated function as the step from `from_version` to the next.

        `event` is the class or its event name. The function takes the payload as a dict and
        returns the next version's payload; it may change the dict it is given.

        >>> codec = Codec()
        >>> @codec.upcaster("app-was-created", from_version=1)
        ... def rename_id(payload: dict[str, Any]) -> dict[str, Any]:
        ...     payload["app_id"] = payload.pop("id")
        ...     return payload
        """
        if type(from_version) is not int:
            raise TypeError(f"from_version must be an int, got {from_version!r}")
        if from_version < 1:
            raise ConfigurationError(f"from_version must be >= 1, got {from_version}")
        if isinstance(event, type) and from_version >= event_version(event):
            raise ConfigurationError(
                f"{event.__qualname__} is at version {event_version(event)}: an upcaster "
                f"from version {from_version} would never run (raise __event_version__?)"
            )
        name = event if isinstance(event, str) else event_name(event)

        def add(step: U) -> U:
            existing = self._upcasters.setdefault((name, from_version), step)
            if existing is not step:
                raise ConfigurationError(
                    f"an upcaster from version {from_version} of {name!r} is already "
                    f"registered: {handler_name(existing)}"
                )
            return step

        return add

    def encode(self, event: object) -> str:
        """The event's fields as JSON text."""
        try:
            return self._encoder.encode(event).decode()
        except (TypeError, msgspec.EncodeError, UnicodeEncodeError) as exc:
            # UnicodeEncodeError: a lone surrogate, which no UTF-8 text column can store.
            raise TypeError(f"cannot encode {type(event).__qualname__}: {exc}") from exc

    def encode_headers(self, headers: dict[str, str]) -> str:
        """The headers as JSON text; anything but str keys and values is refused here,
        where it is written, rather than when a relay reads it back."""
        try:
            checked = msgspec.convert(headers, dict[str, str])
        except msgspec.ValidationError as exc:
            raise TypeError(f"headers must map str to str: {exc}") from exc
        try:
            return self._encoder.encode(checked).decode()
        except UnicodeEncodeError as exc:
            raise TypeError(f"headers must be encodable as UTF-8: {exc}") from exc

    def decode_headers(self, text: str | bytes) -> dict[str, str]:
        """The headers `encode_headers` wrote (`msgspec.DecodeError` on anything else)."""
        return self._headers_decoder.decode(text)

    def decode(self, name: str, version: int, payload: str | bytes) -> object:
        """The event stored as `payload` under `name` and `version`, as its current class.

        Raises `EventDecodeError` when it cannot be made.
        """
        cls = self._event_type(name, version)
        current = event_version(cls)
        if version > current:
            reason = f"version {version} is newer than {cls.__qualname__}'s version {current}"
            raise EventDecodeError(reason, name=name, version=version)
        try:
            if version == current:
                return self._decoder(cls).decode(payload)
            return msgspec.convert(self._upcast(name, version, current, payload), cls)
        except msgspec.ValidationError as exc:
            reason = f"payload does not match {cls.__qualname__}: {exc}"
            raise EventDecodeError(reason, name=name, version=version) from exc
        except msgspec.DecodeError as exc:
            reason = f"payload is not JSON: {exc}"
            raise EventDecodeError(reason, name=name, version=version) from exc

    def _event_type(self, name: str, version: int) -> type:
        cls = self._types.get(name)
        if cls is None:
            # Perhaps a subclass of a registered class defined (imported) since register().
            self._types = _event_types(self._roots)
            cls = self._types.get(name)
        if cls is None:
            reason = f"unknown event name {name!r} (known: {_listing(self._types)})"
            raise EventDecodeError(reason, name=name, version=version)
        return cls

    def _decoder(self, cls: type) -> msgspec.json.Decoder[Any]:
        decoder = self._decoders.get(cls)
        if decoder is None:
            decoder = self._decoders[cls] = msgspec.json.Decoder(cls)
        return decoder

    def _upcast(self, name: str, version: int, current: int, payload: str | bytes) -> Any:
        data = msgspec.json.decode(payload)
        for step_version in range(version, current):
            step = self._upcasters.get((name, step_version))
            if step is None:
                reason = f"no upcaster from version {step_version} of {name!r}"
                raise EventDecodeError(reason, name=name, version=version)
            try:
                data = step(data)
            except Exception as exc:
                # The delivery is stuck until the upcaster is fixed: say so, keep the cause.
                reason = f"the upcaster from version {step_version} of {name!r} failed: {exc!r}"
                raise EventDecodeError(reason, name=name, version=version) from exc
        return data


def _event_types(roots: Iterable[type]) -> dict[str, type]:
    """The name -> class table of `roots` and all their subclasses."""
    types: dict[str, type] = {}
    seen: set[type] = set()
    pending = list(reversed(list(roots)))  # depth first, in definition order
    while pending:
        cls = pending.pop()
        if cls in seen:
            continue
        seen.add(cls)
        name = event_name(cls)
        event_version(cls)  # a bad __event_version__ is refused now, not at a decode
        known = types.setdefault(name, cls)
        if known is not cls:
            types[name] = _redefinition(known, cls, name)
        pending.extend(reversed(type.__subclasses__(cls)))
    return types


def _redefinition(earlier: type, later: type, name: str) -> type:
    # @dataclass(slots=True) replaces the class it decorates, and the replaced class stays
    # among its bases' subclasses until the garbage collector frees it (so does a class of a
    # reloaded module). The same module and qualified name is that: the later class is the one
    # in use. Subclasses are listed in the order they were defined.
    if _path(earlier) != _path(later):
        raise ConfigurationError(
            f"{_path(earlier)} and {_path(later)} are both named {name!r}: "
            "give one of them another __event_name__"
        )
    return later


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _listing(names: Iterable[str], limit: int = 20) -> str:
    # Capped: the reason is stored with each dead delivery and shown in the panel.
    ordered = sorted(names)
    shown = ", ".join(ordered[:limit]) or "none"
    return shown if len(ordered) <= limit else f"{shown} and {len(ordered) - limit} more"
