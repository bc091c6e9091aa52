"""The public surface is exactly what aioevents.__all__ names, and only grows."""

from __future__ import annotations

import subprocess
import sys

import aioevents

PUBLIC = {
    "AioEventsError",
    "BatchPolicy",
    "BusStateError",
    "ConfigurationError",
    "DrainReport",
    "Durable",
    "EmitResult",
    "EventBus",
    "HandlerCancelledError",
    "HandlerError",
    "Hook",
    "QueueFullError",
    "Retry",
    "Router",
    "Subscription",
    "SubscriptionError",
    "event_name",
    "event_version",
}


def test_all_is_exactly_the_public_surface() -> None:
    assert set(aioevents.__all__) == PUBLIC
    assert aioevents.__all__ == sorted(aioevents.__all__)
    public_attributes = {name for name in vars(aioevents) if not name.startswith("_")}
    modules = {
        name for name in public_attributes if type(getattr(aioevents, name)).__name__ == "module"
    }
    assert public_attributes - modules - {"annotations"} == PUBLIC


def test_public_names_say_they_belong_to_the_package() -> None:
    for name in aioevents.__all__:
        member = getattr(aioevents, name)
        assert member.__module__.startswith("aioevents"), name


def test_the_package_root_imports_with_anyio_alone() -> None:
    code = (
        "import sys, aioevents; "
        "bad = [m for m in ('sqlalchemy', 'redis', 'stamina') if m in sys.modules]; "
        "print(bad); assert not bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
