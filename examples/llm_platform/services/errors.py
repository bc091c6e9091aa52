"""What a service refuses; the web app maps each to a 4xx."""

from __future__ import annotations


class ServiceError(Exception):
    """Raised when a service call is refused; nothing of it was applied."""


class NotFound(ServiceError, LookupError):
    """Raised when a row the call names does not exist."""

    def __init__(self, what: str, id: str) -> None:
        super().__init__(f"{what} {id} not found")


class Invalid(ServiceError, ValueError):
    """Raised when the call's input cannot be applied."""


class Conflict(ServiceError):
    """Raised when the call would duplicate something unique."""
