from __future__ import annotations

import dataclasses
import datetime as dt
import doctest
import enum
import itertools
import pickle
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

import msgspec
import pytest

from aioevents import AioEventsError, ConfigurationError, _codec, event_name
from aioevents._codec import Codec, EventDecodeError, uuid7


class Color(enum.Enum):
    RED = "red"


class Size(enum.IntEnum):
    LARGE = 3


class Mood(enum.StrEnum):
    CALM = "calm"


@dataclass(frozen=True, slots=True, kw_only=True)
class Address:
    city: str
    postcode: str | None = None


# Every field type an event may carry, with a value of it: one dataclass and one Struct are
# built from this table, so both kinds of event are tested on exactly the same fields.
EVERY_FIELD: dict[str, tuple[Any, object]] = {
    "count": (int, -7),
    "ratio": (float, 0.1),
    "title": (str, 'Grüße \u2603 "quoted"\n'),
    "flag": (bool, True),
    "nothing": (None, None),
    "maybe": (int | None, None),
    "maybe_set": (int | None, 5),
    "blob": (bytes, b"\x00\xff binary"),
    "aware": (dt.datetime, dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC)),
    "offset": (
        dt.datetime,
        dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
    ),
    "naive": (dt.datetime, dt.datetime(2024, 5, 6, 7, 8, 9, 10)),
    "day": (dt.date, dt.date(2024, 2, 29)),
    "clock": (dt.time, dt.time(23, 59, 58, 5)),
    "delay": (dt.timedelta, dt.timedelta(days=2, seconds=3, microseconds=4)),
    "ident": (uuid.UUID, uuid.UUID("0190f0e4-8c3a-7b7e-9a3c-5d1f2e3a4b5c")),
    "amount": (Decimal, Decimal("12.50")),
    "color": (Color, Color.RED),
    "size": (Size, Size.LARGE),
    "mood": (Mood, Mood.CALM),
    "items": (list[int], [3, 1, 2]),
    "pair": (tuple[int, str], (1, "one")),
    "many": (tuple[str, ...], ("a", "b")),
    "tags": (set[str], {"x", "y"}),
    "frozen": (frozenset[int], frozenset({4, 5})),
    "scores": (dict[str, int], {"a": 1, "b": 2}),
    "address": (Address, Address(city="Lyon")),
    "addresses": (list[Address], [Address(city="Oslo", postcode="0150")]),
    "kind": (Literal["created", "deleted"], "deleted"),
}
EVERY_VALUE = {field: value for field, (_, value) in EVERY_FIELD.items()}
_FIELDS = [(field, annotation) for field, (annotation, _) in EVERY_FIELD.items()]
# Version 2, so that a version 1 payload goes through an upcaster and msgspec.convert.
_VERSIONED = {"__event_version__": 2}

DataclassWithEveryField = dataclasses.make_dataclass(
    "DataclassWithEveryField", _FIELDS, namespace=_VERSIONED, frozen=True, kw_only=True
)
StructWithEveryField = msgspec.defstruct(
    "StructWithEveryField", _FIELDS, namespace=_VERSIONED, frozen=True, kw_only=True
)
EVENT_KINDS = pytest.mark.parametrize(
    "event_type", [DataclassWithEveryField, StructWithEveryField], ids=["dataclass", "struct"]
)


def unchanged(payload: dict[str, Any]) -> dict[str, Any]:
    return payload


def codec_for(*event_types: type) -> Codec:
    codec = Codec()
    codec.register(*event_types)
    return codec


@EVENT_KINDS
def test_every_supported_field_type_round_trips(event_type: type) -> None:
    event = event_type(**EVERY_VALUE)
    codec = codec_for(event_type)
    payload = codec.encode(event)
    assert isinstance(payload, str)
    decoded = codec.decode(event_name(event_type), 2, payload)
    assert type(decoded) is event_type
    assert decoded == event
    assert decoded.naive.tzinfo is None  # type: ignore[attr-defined]


@EVENT_KINDS
def test_every_supported_field_type_survives_the_upcast_path(event_type: type) -> None:
    event = event_type(**EVERY_VALUE)
    codec = codec_for(event_type)
    codec.upcaster(event_type, from_version=1)(unchanged)
    assert codec.decode(event_name(event_type), 1, codec.encode(event)) == event


def test_the_payload_is_readable_json_text() -> None:
    codec = Codec()
    payload = codec.encode(Address(city="Zürich"))
    assert payload == '{"city":"Zürich","postcode":null}'
    assert codec.decode_headers(codec.encode_headers({"trace": "t1"})) == {"trace": "t1"}


def test_decode_accepts_bytes() -> None:
    codec = codec_for(Address)
    assert codec.decode("address", 1, b'{"city":"Oslo"}') == Address(city="Oslo")


@dataclass(frozen=True, slots=True, kw_only=True)
class DocumentWasCreated:
    __event_version__ = 2
    document_id: int
    title: str
    language: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DocumentWasMoved:
    __event_version__ = 3
    document_id: int
    folder: str
    by: str


def test_an_upcaster_lifts_an_old_payload_to_the_current_class() -> None:
    codec = codec_for(DocumentWasCreated)

    @codec.upcaster(DocumentWasCreated, from_version=1)
    def rename_id(payload: dict[str, Any]) -> dict[str, Any]:
        return {"document_id": payload.pop("id"), "language": "en", **payload}

    decoded = codec.decode("document-was-created", 1, '{"id": 4, "title": "Notes"}')
    assert decoded == DocumentWasCreated(document_id=4, title="Notes", language="en")


def test_the_decorator_returns_the_function_itself() -> None:
    codec = Codec()
    assert codec.upcaster("anything", from_version=1)(unchanged) is unchanged


def test_upcasters_chain_one_version_at_a_time() -> None:
    codec = codec_for(DocumentWasMoved)

    @codec.upcaster("document-was-moved", from_version=1)
    def v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
        return {"document_id": payload["id"], "folder": payload["to"]}

    @codec.upcaster("document-was-moved", from_version=2)
    def v2_to_v3(payload: dict[str, Any]) -> dict[str, Any]:
        return {**payload, "by": "unknown"}

    expected = DocumentWasMoved(document_id=1, folder="inbox", by="unknown")
    assert codec.decode("document-was-moved", 1, '{"id": 1, "to": "inbox"}') == expected
    assert codec.decode("document-was-moved", 2, '{"document_id": 1, "folder": "inbox"}') == (
        expected
    )


def test_a_second_upcaster_for_one_step_is_refused() -> None:
    codec = Codec()
    codec.upcaster(DocumentWasMoved, from_version=1)(unchanged)
    with pytest.raises(ConfigurationError, match=r"version 1 of 'document-was-moved' is already"):
        codec.upcaster("document-was-moved", from_version=1)(lambda payload: payload)


@pytest.mark.parametrize(
    ("from_version", "error", "match"),
    [
        ("1", TypeError, "from_version must be an int, got '1'"),
        (True, TypeError, "from_version must be an int, got True"),
        (0, ValueError, "from_version must be >= 1, got 0"),
        (2, ConfigurationError, "DocumentWasCreated is at version 2: an upcaster from version 2"),
    ],
)
def test_a_bad_from_version_is_refused(
    from_version: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Codec().upcaster(DocumentWasCreated, from_version=from_version)


def test_a_missing_step_in_the_chain_is_a_decode_error() -> None:
    codec = codec_for(DocumentWasMoved)
    codec.upcaster(DocumentWasMoved, from_version=2)(unchanged)
    with pytest.raises(EventDecodeError) as caught:
        codec.decode("document-was-moved", 1, '{"id": 1}')
    assert caught.value.reason == "no upcaster from version 1 of 'document-was-moved'"
    assert (caught.value.name, caught.value.version) == ("document-was-moved", 1)
    assert str(caught.value) == (
        "cannot decode event 'document-was-moved' version 1: "
        "no upcaster from version 1 of 'document-was-moved'"
    )


def test_a_failing_upcaster_is_a_decode_error_with_its_cause() -> None:
    codec = codec_for(DocumentWasCreated)

    @codec.upcaster(DocumentWasCreated, from_version=1)
    def needs_id(payload: dict[str, Any]) -> dict[str, Any]:
        return {"document_id": payload["id"]}

    with pytest.raises(EventDecodeError, match=r"version 1 of .* failed: KeyError\('id'\)") as e:
        codec.decode("document-was-created", 1, "{}")
    assert isinstance(e.value.__cause__, KeyError)


def test_an_unknown_name_is_a_decode_error_listing_the_known_names() -> None:
    codec = codec_for(DocumentWasMoved, DocumentWasCreated)
    with pytest.raises(EventDecodeError) as caught:
        codec.decode("x", 1, "{}")
    assert caught.value.reason == (
        "unknown event name 'x' (known: document-was-created, document-was-moved)"
    )
    assert isinstance(caught.value, AioEventsError)


def test_a_long_list_of_known_names_is_cut_short() -> None:
    codec = codec_for(*(type(f"Event{n:02}", (), {}) for n in range(25)))
    with pytest.raises(EventDecodeError, match=r"known: event00, .*, event19 and 5 more\)$"):
        codec.decode("x", 1, "{}")


def test_a_version_newer_than_the_class_is_a_decode_error() -> None:
    codec = codec_for(DocumentWasCreated)
    with pytest.raises(EventDecodeError) as caught:
        codec.decode("document-was-created", 3, "{}")
    assert caught.value.reason == "version 3 is newer than DocumentWasCreated's version 2"


@pytest.mark.parametrize("version", [1, 2], ids=["upcast", "current"])
def test_a_payload_that_does_not_validate_is_a_decode_error(version: int) -> None:
    codec = codec_for(DocumentWasCreated)
    codec.upcaster(DocumentWasCreated, from_version=1)(unchanged)
    payload = '{"document_id": "4", "title": "t", "language": "en"}'
    with pytest.raises(EventDecodeError) as caught:
        codec.decode("document-was-created", version, payload)
    assert caught.value.reason == (
        "payload does not match DocumentWasCreated: Expected `int`, got `str` - at `$.document_id`"
    )
    assert isinstance(caught.value.__cause__, msgspec.ValidationError)


@pytest.mark.parametrize("version", [1, 2], ids=["upcast", "current"])
def test_a_payload_that_is_not_json_is_a_decode_error(version: int) -> None:
    codec = codec_for(DocumentWasCreated)
    codec.upcaster(DocumentWasCreated, from_version=1)(unchanged)
    with pytest.raises(EventDecodeError, match="payload is not JSON: "):
        codec.decode("document-was-created", version, '{"document_id": ')


def test_a_decode_error_pickles_with_its_context() -> None:
    error = EventDecodeError("broken", name="n", version=2)
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.reason, copy.name, copy.version) == (str(error), "broken", "n", 2)


@dataclass(frozen=True, slots=True, kw_only=True)
class ThingHappened:
    thing_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ThingWasRenamed(ThingHappened):
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ThingWasRenamedAgain(ThingWasRenamed):
    pass


def test_registering_a_class_registers_its_subclasses() -> None:
    codec = codec_for(ThingHappened)
    again = codec.decode("thing-was-renamed-again", 1, '{"thing_id": 1, "name": "n"}')
    assert again == ThingWasRenamedAgain(thing_id=1, name="n")
    assert codec.decode("thing-happened", 1, '{"thing_id": 1}') == ThingHappened(thing_id=1)


def test_a_subclass_defined_after_register_is_found() -> None:
    codec = codec_for(ThingHappened)

    @dataclass(frozen=True, slots=True, kw_only=True)
    class ThingWasDefinedLate(ThingWasRenamed):
        pass

    decoded = codec.decode("thing-was-defined-late", 1, '{"thing_id": 2, "name": "late"}')
    assert decoded == ThingWasDefinedLate(thing_id=2, name="late")


def test_a_class_defined_again_under_the_same_path_replaces_the_earlier_one() -> None:
    # As @dataclass(slots=True) does: the replaced class lingers among the base's subclasses.
    namespace = {"__qualname__": "ThingWasRedefined", "__module__": __name__}
    earlier = type("ThingWasRedefined", (ThingHappened,), dict(namespace))
    later = type("ThingWasRedefined", (ThingHappened,), dict(namespace))
    codec = codec_for(ThingHappened)
    decoded = codec.decode("thing-was-redefined", 1, '{"thing_id": 3}')
    assert type(decoded) is later
    assert earlier in ThingHappened.__subclasses__()


class Named:
    __event_name__ = "same-name"


class NamedToo:
    __event_name__ = "same-name"


def test_two_classes_with_one_name_are_refused_and_nothing_is_registered() -> None:
    codec = codec_for(Named)
    with pytest.raises(ConfigurationError) as caught:
        codec.register(ThingHappened, NamedToo)
    assert str(caught.value) == (
        "tests.test_codec.Named and tests.test_codec.NamedToo are both named 'same-name': "
        "give one of them another __event_name__"
    )
    with pytest.raises(EventDecodeError, match=r"\(known: same-name\)"):
        codec.decode("thing-happened", 1, '{"thing_id": 1}')


def test_registering_a_class_twice_is_harmless() -> None:
    codec = codec_for(ThingHappened, ThingWasRenamed)
    codec.register(ThingHappened)
    assert codec.decode("thing-happened", 1, '{"thing_id": 1}') == ThingHappened(thing_id=1)


def test_register_refuses_what_is_not_a_class() -> None:
    with pytest.raises(TypeError, match="register\\(\\) takes event classes, got 'x'"):
        Codec().register("x")  # type: ignore[arg-type]


def test_a_bad_event_version_is_refused_at_register() -> None:
    with pytest.raises(ConfigurationError, match="__event_version__ must be an int >= 1"):
        Codec().register(type("Bad", (), {"__event_version__": 0}))


@dataclass(frozen=True, slots=True)
class CarriesAnything:
    value: object


def test_an_unencodable_field_is_a_type_error_naming_the_class() -> None:
    with pytest.raises(TypeError, match=r"^cannot encode CarriesAnything: .*type object"):
        Codec().encode(CarriesAnything(object()))


def test_headers_that_are_not_str_to_str_are_refused() -> None:
    with pytest.raises(TypeError, match="headers must map str to str: Expected `str`"):
        Codec().encode_headers({"attempt": 1})  # type: ignore[dict-item]


def test_the_docstring_examples_run() -> None:
    failed, attempted = doctest.testmod(_codec, optionflags=doctest.ELLIPSIS)
    assert attempted > 0
    assert failed == 0


def test_uuid7_has_version_7_and_the_rfc_variant() -> None:
    value = uuid7()
    assert value.version == 7
    assert value.variant == uuid.RFC_4122


def test_uuid7_is_strictly_increasing() -> None:
    values = [uuid7() for _ in range(10_000)]
    assert all(a < b for a, b in itertools.pairwise(values))


def test_uuid7_carries_the_current_unix_time_in_ms() -> None:
    timestamp_ms = uuid7().int >> 80
    assert abs(timestamp_ms - time.time() * 1000) < 1000


def test_uuid7_stays_ordered_when_the_counter_runs_out(monkeypatch: pytest.MonkeyPatch) -> None:
    frozen_ms = time.time_ns() // 1_000_000
    monkeypatch.setattr(_codec, "_uuid7_ms", 0)  # restored after the test, with the real clock
    monkeypatch.setattr(_codec, "time_ns", lambda: frozen_ms * 1_000_000)
    values = [uuid7() for _ in range(5_000)]  # more than a 12-bit counter holds
    assert all(a < b for a, b in itertools.pairwise(values))
    assert values[0].int >> 80 == frozen_ms
    assert values[-1].int >> 80 > frozen_ms
    assert all(value.version == 7 for value in values)


def test_uuid7_stays_ordered_when_the_clock_goes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    before = uuid7()
    monkeypatch.setattr(_codec, "time_ns", lambda: 0)
    after = [uuid7() for _ in range(100)]
    assert before < after[0]
    assert all(a < b for a, b in itertools.pairwise(after))
