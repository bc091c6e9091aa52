"""The panel's pages: each reads the durable stores and renders one template."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlencode

from starlette.datastructures import QueryParams
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..outbox import AttemptRecord, DeliveryStatus, Outbox
from ..streams import DeadLetter, GroupInfo, Streams
from ._render import Renderer

__all__ = ["State", "dead", "deliveries", "delivery_id", "event", "handlers", "overview", "stats"]

logger = logging.getLogger("aioevents")

PAGE_SIZE = 50  # dead deliveries per page
LETTERS = 100  # stream dead letters shown per event type
_FILTERS = ("event", "handler", "since", "until")
_MAX_ID = 2**63 - 1  # a BIGINT
_DONE = {  # what a finished action says, by its code in the redirect
    "retried": "{count} of {asked} resubmitted",
    "discarded": "{count} of {asked} discarded",
    "redriven": "{count} of {asked} stream dead letters published again",
    "removed": "{count} of {asked} stream dead letters discarded",
}


@dataclass(frozen=True, slots=True)
class State:
    outbox: Outbox
    streams: Streams | None
    event_types: dict[str, type]  # by event name
    renderer: Renderer


async def overview(state: State, request: Request) -> Response:
    activity = await state.outbox.activity()
    return state.renderer.page(
        request, "overview.html", page="overview", activity=activity, statuses=list(DeliveryStatus)
    )


async def stats(state: State, request: Request) -> Response:
    """The overview's figures, for its live refresh."""
    activity = await state.outbox.activity()
    return JSONResponse(
        {
            "events_per_second": round(activity.events_per_second, 3),
            "failures_per_second": round(activity.failures_per_second, 3),
            "statuses": {s.value: activity.statuses.get(s, 0) for s in DeliveryStatus},
        },
        headers={"Cache-Control": "no-store"},
    )


async def handlers(state: State, request: Request) -> Response:
    found = await state.outbox.handler_stats()
    return state.renderer.page(request, "handlers.html", page="handlers", handlers=found)


async def deliveries(state: State, request: Request) -> Response:
    by_handler = await state.outbox.backlog()
    by_key = await state.outbox.backlog(by_key=True, limit=PAGE_SIZE)
    groups: list[GroupInfo] = []
    unreachable = None
    if state.streams is not None and state.event_types:
        try:
            groups = await state.streams.groups(*state.event_types.values())
        except OSError as exc:  # the outbox's figures are still worth showing
            unreachable = _unreachable(exc)
    return state.renderer.page(
        request,
        "deliveries.html",
        page="deliveries",
        by_handler=by_handler,
        by_key=by_key,
        groups=groups,
        streams=state.streams is not None,
        streams_error=unreachable,
    )


async def dead(state: State, request: Request) -> Response:
    query = request.query_params
    filters = {name: query.get(name, "").strip() for name in _FILTERS}
    if any("\x00" in value for value in filters.values()):  # PostgreSQL text refuses NUL
        raise HTTPException(400, "search: a NUL character is in no event or handler name")
    before = _cursor(query.get("before"))
    found = await state.outbox.deliveries(
        status=DeliveryStatus.DEAD,
        event_name=filters["event"] or None,
        handler=filters["handler"] or None,
        since=_time("since", filters["since"]),
        until=_time("until", filters["until"]),
        before=before,
        newest_first=True,
        limit=PAGE_SIZE + 1,  # one more: is there a next page?
    )
    rows, more = found[:PAGE_SIZE], len(found) > PAGE_SIZE
    letters, unreachable = await _letters(state)
    kept = {name: value for name, value in filters.items() if value}
    next_page = urlencode({**kept, "before": rows[-1].id}) if more else None
    return state.renderer.page(
        request,
        "dead.html",
        page="dead",
        rows=rows,
        filters=filters,
        back=urlencode({**kept, **({"before": before} if before else {})}),
        first_page=urlencode(kept) if before is not None else None,
        next_page=next_page,
        done=_done(query),
        letters=letters,
        streams_error=unreachable,
    )


async def event(state: State, request: Request) -> Response:
    text = request.path_params["event_id"]
    try:
        event_id = uuid.UUID(text)
    except ValueError:
        raise HTTPException(400, f"event id: not a UUID: {text!r}") from None
    found = await state.outbox.event(event_id)
    if found is None:
        raise HTTPException(404, f"no stored event {event_id}")
    attempts: dict[int, list[AttemptRecord]] = {}
    for attempt in found.attempts:
        attempts.setdefault(attempt.delivery_id, []).append(attempt)
    live = any(d.status is DeliveryStatus.PENDING for d in found.deliveries)
    return state.renderer.page(
        request, "event.html", page="event", event=found, attempts=attempts, live=live
    )


async def _letters(state: State) -> tuple[list[tuple[str, list[DeadLetter]]], str | None]:
    """The streams' dead letters by event name; while the streams cannot be reached, none and
    why (the outbox's dead deliveries are still shown and can be retried)."""
    if state.streams is None:
        return [], None
    try:
        return [
            (name, await state.streams.dead_letters(event_type, count=LETTERS))
            for name, event_type in state.event_types.items()
        ], None
    except OSError as exc:  # what a transport raises when its server is down or slow
        return [], _unreachable(exc)


def _unreachable(exc: OSError) -> str:
    logger.warning("panel: the streams could not be read", exc_info=True)
    return f"{type(exc).__name__}: {exc}"


def _cursor(text: str | None) -> int | None:
    if text is None or text == "":
        return None
    return delivery_id("before", text)


def delivery_id(name: str, text: str) -> int:
    """A delivery id as the stores keep it: ASCII digits ("²".isdigit() is True, and int()
    refuses it) within a signed 64-bit integer (the databases refuse more: a 500)."""
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= _MAX_ID):
        raise HTTPException(400, f"{name}: a delivery id (a positive integer), got {text!r}")
    return int(text)


def _time(name: str, text: str) -> datetime | None:
    """An ISO 8601 time; without a zone, UTC (as the panel shows times)."""
    if not text:
        return None
    try:  # in UTC here: a time at the calendar's ends may not be (OverflowError)
        moment = datetime.fromisoformat(text)
        return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise HTTPException(
            400, f"{name}: an ISO 8601 time such as 2026-01-31T12:00, got {text!r}"
        ) from None


def _done(query: QueryParams) -> str | None:
    """The message of the action that redirected here, if any."""
    message = _DONE.get(query.get("done", ""))
    counts = (query.get("count", ""), query.get("asked", ""))
    if message is None or not all(c.isdigit() for c in counts):
        return None
    return message.format(count=counts[0], asked=counts[1])
