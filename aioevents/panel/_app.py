"""`Panel`: the ASGI app, its routes, and how a page is rendered."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from .._checks import check_flag, check_instance
from .._names import event_name
from ..outbox import Outbox
from ..streams import Streams
from . import _actions, _views
from ._csrf import Guard
from ._render import Renderer

__all__ = ["Panel"]


class Panel:
    """The operations panel: an ASGI app (a Starlette app inside) to mount behind your auth.

    ``outbox`` is the `aioevents.outbox.Outbox` it shows; ``streams`` and ``event_types`` add
    the lag of the types' stream groups and their dead letters. ``read_only=True`` hides the
    retry and discard buttons and refuses their requests (403). ``title`` heads every page.

    >>> app.mount("/events", Panel(outbox=outbox))  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        outbox: Outbox,
        streams: Streams | None = None,
        event_types: Sequence[type] = (),
        read_only: bool = False,
        title: str = "aioevents",
    ) -> None:
        check_instance(outbox, Outbox, "Panel(outbox=...) takes an aioevents.outbox.Outbox")
        check_instance(streams, Streams, "Panel(streams=...) takes a Streams or None", none=True)
        check_flag("read_only", read_only)
        if not isinstance(title, str):
            raise TypeError(f"Panel(title=...) takes a str, got {title!r}")
        types = _checked_types(event_types)
        self.outbox = outbox
        self.streams = streams
        self.event_types = types
        self.read_only = read_only
        self.title = title
        renderer = Renderer(title=title, read_only=read_only, guard=Guard())
        state = _views.State(outbox, streams, {event_name(t): t for t in types}, renderer)
        self._app = Starlette(
            routes=_routes(state),
            exception_handlers={HTTPException: _plain_error},
        )

    def __repr__(self) -> str:
        return f"<Panel {self.title!r} of {self.outbox!r}, read_only={self.read_only}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


Page = Callable[[_views.State, Request], Awaitable[Response]]


def _routes(state: _views.State) -> list[BaseRoute]:
    def page(handler: Page) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return await handler(state, request)

        return endpoint

    return [
        Route("/", page(_views.overview)),
        Route("/stats.json", page(_views.stats)),
        Route("/handlers", page(_views.handlers)),
        Route("/deliveries", page(_views.deliveries)),
        Route("/dead", page(_views.dead)),
        Route("/event/{event_id}", page(_views.event)),
        Route("/dead/retry", page(_actions.retry_deliveries), methods=["POST"]),
        Route("/dead/discard", page(_actions.discard_deliveries), methods=["POST"]),
        Route("/streams/retry", page(_actions.retry_letters), methods=["POST"]),
        Route("/streams/discard", page(_actions.discard_letters), methods=["POST"]),
        Mount("/static", StaticFiles(packages=[("aioevents.panel", "static")]), name="static"),
    ]


async def _plain_error(request: Request, exc: Exception) -> Response:
    """A refused request says why, in plain text (a 400's message names the bad parameter)."""
    assert isinstance(exc, HTTPException)
    return PlainTextResponse(str(exc.detail), status_code=exc.status_code)


def _checked_types(event_types: object) -> tuple[type, ...]:
    if isinstance(event_types, (str, type)) or not isinstance(event_types, Sequence):
        raise TypeError(f"Panel(event_types=...) takes a sequence of classes, got {event_types!r}")
    for item in event_types:
        if not isinstance(item, type):
            raise TypeError(f"Panel(event_types=...) takes classes, got {item!r}")
    return tuple(event_types)
