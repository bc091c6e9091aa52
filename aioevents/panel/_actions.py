"""The panel's actions: retry and discard, of outbox deliveries and of stream dead letters.

Each is a POST of a form (the checked rows' ``id`` fields, or one row's ``one``), guarded
against CSRF and refused on a read-only panel, and answered with a redirect back to the page
it came from, which then says how many rows the action changed (only rows still dead change:
a retry clicked twice, or by two operators, runs once).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl, urlencode

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ._csrf import FIELD, base_path
from ._views import State, delivery_id

__all__ = ["discard_deliveries", "discard_letters", "retry_deliveries", "retry_letters"]

_MAX_IDS = 1000  # rows one action takes: a page holds far fewer
_BACK = ("event", "handler", "since", "until", "before")  # what the redirect keeps


async def retry_deliveries(state: State, request: Request) -> Response:
    return await _on_deliveries(state, request, state.outbox.resubmit, "retried")


async def discard_deliveries(state: State, request: Request) -> Response:
    async def discard_dead(ids: list[int]) -> int:  # a row retried meanwhile is kept
        return await state.outbox.discard(ids, only_dead=True)

    return await _on_deliveries(state, request, discard_dead, "discarded")


async def retry_letters(state: State, request: Request) -> Response:
    return await _on_letters(state, request, retry=True)


async def discard_letters(state: State, request: Request) -> Response:
    return await _on_letters(state, request, retry=False)


async def _on_deliveries(
    state: State,
    request: Request,
    act: Callable[[list[int]], Awaitable[int]],
    done: str,
) -> Response:
    form = await _checked_form(state, request)
    ids = [delivery_id("id", text) for text in _chosen(form)]
    return _back(request, form, done, await act(ids), len(ids))


async def _on_letters(state: State, request: Request, *, retry: bool) -> Response:
    form = await _checked_form(state, request)
    name = form.get("event")
    event_type = state.event_types.get(name) if isinstance(name, str) else None
    if state.streams is None or event_type is None:
        raise HTTPException(400, f"event: not an event type of this panel's streams: {name!r}")
    ids = _chosen(form)
    try:
        if retry:
            count = await state.streams.retry_dead_letters(event_type, ids)
        else:
            count = await state.streams.discard_dead_letters(event_type, ids)
    except ValueError as exc:  # not an id of the form dead letters have
        raise HTTPException(400, f"id: {exc}") from None
    except OSError as exc:  # the transport's server is down or slow: try again later
        raise HTTPException(503, f"the streams could not be reached: {exc}") from None
    return _back(request, form, "redriven" if retry else "removed", count, len(ids))


async def _checked_form(state: State, request: Request) -> FormData:
    if state.renderer.read_only:
        raise HTTPException(403, "refused: this panel is read-only")
    form = await request.form(max_files=0, max_fields=_MAX_IDS + 10)
    state.renderer.guard.check(request, form.get(FIELD))
    return form


def _chosen(form: FormData) -> list[str]:
    """The row of the button clicked (``one``), else the rows checked (``id``)."""
    one = form.get("one")
    chosen = [one] if one is not None else form.getlist("id")
    texts = [value for value in chosen if isinstance(value, str)]
    if not texts:
        raise HTTPException(400, "id: no row chosen (check some rows, or use a row's button)")
    if len(texts) > _MAX_IDS:
        raise HTTPException(400, f"id: at most {_MAX_IDS} rows at once, got {len(texts)}")
    return texts


def _back(request: Request, form: FormData, done: str, count: int, asked: int) -> Response:
    """Back to the dead-letter page with its filters (only those: never another place)."""
    back = form.get("back")
    kept = [(k, v) for k, v in parse_qsl(back if isinstance(back, str) else "") if k in _BACK]
    query = urlencode([*kept, ("done", done), ("count", count), ("asked", asked)])
    return RedirectResponse(f"{base_path(request)}/dead?{query}", status_code=303)
