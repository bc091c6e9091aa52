"""An operations panel for the outbox and the streams: an ASGI app to mount behind your auth.

::

    from aioevents.panel import Panel

    panel = Panel(outbox=outbox, streams=streams, event_types=(DocumentWasCreated,))
    app.mount("/events", panel)          # Starlette, FastAPI: put your auth in front of it

Pages (links are relative to where it is mounted): the overview (events and failures per second
over the last minute, deliveries by status, refreshed live), the durable handlers (deliveries,
failure rate, p50 and p99 duration), the backlog (pending deliveries per handler and per key,
stream lag per group), the dead letters (outbox deliveries, newest first, searched by event,
handler and time, with retry and discard, one or many; and the streams' dead letters) and one
event (payload, headers, every delivery and every failed attempt with its traceback).

It reads only the durable stores: it needs no bus and may run in a process of its own. Its forms
carry a CSRF token (a random value in a cookie and in each form, checked to match; a browser's
``Sec-Fetch-Site`` must say same-origin); ``read_only=True`` shows no actions and refuses them
(403). Templates, CSS and JavaScript ship in the package and are served by the panel itself.
"""

from __future__ import annotations

try:
    import jinja2  # noqa: F401
    import starlette  # noqa: F401
except ImportError as missing:  # say which extra brings them
    raise ModuleNotFoundError(
        f"aioevents.panel needs Starlette, Jinja2 and python-multipart ({missing}): install the "
        f"extra with pip install 'aioevents[panel]'",
        name=missing.name,
    ) from missing

from ._app import Panel

__all__ = ["Panel"]
