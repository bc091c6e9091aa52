"""The examples in the public docstrings run and print what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "aioevents._bus",
    "aioevents._codec",
    "aioevents._names",
    "aioevents._policies",
    "aioevents._router",
    "aioevents._streams_memory",
    "aioevents.testing",
]


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name: str) -> None:
    module = importlib.import_module(module_name)
    failed, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert attempted > 0, f"{module_name} has no examples"
    assert failed == 0
