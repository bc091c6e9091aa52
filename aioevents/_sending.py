"""Send hooks: what a tracing hook is told when an event leaves for a store or a stream.

A hook (see `aioevents.Hook`) may also define ``send_started(event, *, system, destination,
message_id, headers) -> token`` and ``send_finished(token, *, error)``. They are called around
each send: `TransactionalEvents.record` staging an event in the outbox, the ``externalize``
handler appending it to its stream, and `Streams.publish` when the `Streams` was given hooks.
``send_started`` may add entries to ``headers`` (a trace context): they travel with the event.
Like the handler hooks, a send hook's exception is logged and never fails the send.

The ``messaging.system`` values aioevents sends with are defined here, next to the calls.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

__all__ = ["OUTBOX_SYSTEM", "Sends", "send_hooks", "start_sends"]

logger = logging.getLogger("aioevents")

OUTBOX_SYSTEM = "aioevents.outbox"  # an event staged in the outbox's tables by record()


def send_hooks(*hook_lists: Iterable[object]) -> list[Any]:
    """The active hooks of ``hook_lists`` that have the send methods, each once."""
    found: list[Any] = []
    for hooks in hook_lists:
        for hook in hooks:
            if (
                callable(getattr(hook, "send_started", None))
                and _active(hook)
                and not any(hook is seen for seen in found)
            ):
                found.append(hook)
    return found


def _active(hook: object) -> bool:
    """The hook's ``active`` (True without one). One that raises is logged and taken as
    active, as the bus does: a hook's failure never fails the send."""
    try:
        return bool(getattr(hook, "active", True))
    except Exception:
        logger.exception("hook %r: reading its active failed", hook)
        return True


class Sends:
    """The sends of one event told to the hooks; `finish` tells them its end, once. An event
    staged in the outbox is sent when its transaction commits, so that is when it ends."""

    __slots__ = ("_hooks", "_tokens")

    def __init__(self, hooks: list[Any], tokens: list[object]) -> None:
        self._hooks, self._tokens = hooks, tokens

    def __enter__(self) -> Sends:
        return self

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> None:
        # The block's exception (a cancellation too) is what the hooks are told, then raised.
        self.finish(error)

    def finish(self, error: BaseException | None) -> None:
        hooks, self._hooks = self._hooks, []  # a second call tells nobody again
        for hook, token in zip(hooks, self._tokens, strict=True):
            _call(hook.send_finished, token, error=error)


def start_sends(
    hooks: list[Any],
    event: object,
    *,
    system: str,
    destination: str,
    message_id: str,
    headers: dict[str, str],
) -> Sends:
    """Tell ``hooks`` (from `send_hooks`) that ``event`` is being sent; what they add to
    ``headers`` goes with it. The caller must `Sends.finish` it, or use it as a context manager
    around the send (finished with the block's exception, if any)."""
    tokens = [
        _call(
            hook.send_started,
            event,
            system=system,
            destination=destination,
            message_id=message_id,
            headers=headers,
        )
        for hook in hooks
    ]
    return Sends(hooks, tokens)


def _call(method: Any, *args: Any, **kwargs: Any) -> object:
    try:
        return method(*args, **kwargs)
    except Exception:
        logger.exception("hook %s failed; the send is not affected", method.__qualname__)
        return None
