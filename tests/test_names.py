from __future__ import annotations

from dataclasses import dataclass

import pytest

from aioevents import ConfigurationError, event_name, event_version
from tests.events import AppWasCreated


@pytest.mark.parametrize(
    ("class_name", "expected"),
    [
        ("AppWasCreated", "app-was-created"),
        ("DocumentIndexCreated", "document-index-created"),
        ("HTTPRequestFailed", "http-request-failed"),
        ("Tenant2WasCreated", "tenant2-was-created"),
        ("Legacy_Event", "legacy-event"),
        ("Ping", "ping"),
    ],
)
def test_the_default_name_is_the_class_name_in_kebab_case(class_name: str, expected: str) -> None:
    assert event_name(type(class_name, (), {})) == expected


def test_name_and_version_accept_an_instance() -> None:
    assert event_name(AppWasCreated()) == "app-was-created"
    assert event_version(AppWasCreated()) == 1


@dataclass(frozen=True, slots=True)
class Renamed:
    __event_name__ = "app.renamed"
    __event_version__ = 3


@dataclass(frozen=True, slots=True)
class RenamedChild(Renamed):
    pass


def test_name_and_version_can_be_overridden() -> None:
    assert (event_name(Renamed), event_version(Renamed)) == ("app.renamed", 3)


def test_overrides_are_not_inherited_by_subclasses() -> None:
    assert (event_name(RenamedChild), event_version(RenamedChild)) == ("renamed-child", 1)


@pytest.mark.parametrize("bad", ["", 5])
def test_a_bad_name_override_is_refused(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="__event_name__ must be a non-empty str"):
        event_name(type("Bad", (), {"__event_name__": bad}))


@pytest.mark.parametrize("bad", [0, -1, 1.0, "2", True])
def test_a_bad_version_override_is_refused(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="__event_version__ must be an int >= 1"):
        event_version(type("Bad", (), {"__event_version__": bad}))
