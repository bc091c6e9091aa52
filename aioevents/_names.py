"""Stable names and versions of event types.

Logs, metrics and anything that stores or ships events identify an event type by its name
and version, never by its Python import path, so that a class can move between modules.
"""

from __future__ import annotations

import functools
import re

from ._exceptions import ConfigurationError

__all__ = ["error_type_name", "event_name", "event_version", "handler_name"]

# An uppercase letter starts a new word unless it continues a run of capitals that is itself
# followed by a capital and a lowercase letter: HTTPRequestFailed -> http-request-failed.
_WORD_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def _kebab_case(class_name: str) -> str:
    return _WORD_BOUNDARY.sub("-", class_name).replace("_", "-").lower()


def _event_class(event_or_type: object) -> type:
    return event_or_type if isinstance(event_or_type, type) else type(event_or_type)


def event_name(event_or_type: object) -> str:
    """Return the stable name of an event type (or of an event's type).

    By default the class name in kebab case; a class overrides it with ``__event_name__``.
    The override is not inherited: a subclass is another event type with its own name.

    >>> class AppWasCreated: ...
    >>> event_name(AppWasCreated)
    'app-was-created'
    >>> class Renamed:
    ...     __event_name__ = "app.renamed"
    >>> event_name(Renamed())
    'app.renamed'
    """
    cls = _event_class(event_or_type)
    name = cls.__dict__.get("__event_name__", None)
    if name is None:
        return _kebab_case(cls.__name__)
    if not isinstance(name, str) or not name:
        raise ConfigurationError(
            f"{cls.__qualname__}.__event_name__ must be a non-empty str, got {name!r}"
        )
    return name


def event_version(event_or_type: object) -> int:
    """Return the version of an event type (or of an event's type): 1 unless overridden.

    A class sets ``__event_version__`` to a positive int when its serialised form changes.
    Like the name, the version is not inherited.

    >>> class AppWasCreated:
    ...     __event_version__ = 2
    >>> event_version(AppWasCreated)
    2
    """
    cls = _event_class(event_or_type)
    version = cls.__dict__.get("__event_version__", 1)
    if type(version) is not int or version < 1:
        raise ConfigurationError(
            f"{cls.__qualname__}.__event_version__ must be an int >= 1, got {version!r}"
        )
    return version


def handler_name(handler: object) -> str:
    """The qualified name a handler is known by in logs, reports and listings.

    A `functools.partial` is named after the function it wraps: every partial would
    otherwise be called ``functools.partial``.
    """
    while isinstance(handler, functools.partial):
        handler = handler.func
    qualname = getattr(handler, "__qualname__", None) or type(handler).__qualname__
    module = getattr(handler, "__module__", None) or type(handler).__module__
    return f"{module}.{qualname}"


def error_type_name(kind: type) -> str:
    """An exception class as traces and metrics name it: ``ValueError`` for a builtin,
    ``module.Qualified.Name`` otherwise."""
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"
