"""python -m aioevents worker: how it finds a bus's consumers and applies its options.

Running workers as processes (SIGTERM, kill -9) is in tests/test_streams_faults.py.
"""

from __future__ import annotations

import argparse

import pytest

from aioevents.__main__ import _consumers, load_bus

from . import worker_cli_app

SPEC = "tests.worker_cli_app:bus"


def options(**given: object) -> argparse.Namespace:
    values: dict[str, object] = {"concurrency": None, "drain_timeout": None, "handler": None}
    return argparse.Namespace(**(values | given))


def test_the_consumer_is_found_and_left_as_the_module_made_it() -> None:
    bus = load_bus(SPEC, needs="streams")
    [consumer] = _consumers(bus, SPEC, options())
    assert consumer is worker_cli_app.consumer
    assert consumer.concurrency == 16 and consumer.handlers is None


def test_options_override_the_modules_choices() -> None:
    bus = load_bus(SPEC, needs="streams")
    try:
        [consumer] = _consumers(
            bus, SPEC, options(concurrency=3, drain_timeout=0.5, handler=["run-task"])
        )
        assert (consumer.concurrency, consumer.drain_timeout) == (3, 0.5)
        assert consumer.handlers == frozenset({"run-task"})
        assert [feed.group for feed in consumer._find_feeds()] == ["run-task"]
    finally:
        worker_cli_app.consumer.concurrency, worker_cli_app.consumer.drain_timeout = 16, 30.0
        worker_cli_app.consumer.handlers = None


def test_a_handler_the_bus_does_not_have_is_refused_before_the_run() -> None:
    bus = load_bus(SPEC, needs="streams")
    try:
        with pytest.raises(Exception, match="no handler named nope"):
            _consumers(bus, SPEC, options(handler=["nope"]))
    finally:
        worker_cli_app.consumer.handlers = None


def test_a_bus_fed_from_no_streams_is_refused() -> None:
    spec = "tests.worker_cli_app:plain_bus"
    with pytest.raises(SystemExit, match="fed from no streams"):
        _consumers(load_bus(spec, needs="streams"), spec, options())


@pytest.mark.parametrize("bad", [{"concurrency": 0}, {"drain_timeout": -1.0}])
def test_bad_option_values_are_refused(bad: dict[str, object]) -> None:
    bus = load_bus(SPEC, needs="streams")
    with pytest.raises(ValueError, match=next(iter(bad)).replace("_", "-")):
        _consumers(bus, SPEC, options(**bad))
