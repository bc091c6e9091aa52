"""Rendering pages: the Jinja2 templates shipped in the package, and what every page gets."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse

from ._csrf import FIELD, Guard, base_path

__all__ = ["Renderer"]

# Every page: its own files only (no inline script to inject into, were escaping ever missed),
# and never framed by another site (a framed button is a click the operator did not mean).
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'self'",
    "X-Frame-Options": "SAMEORIGIN",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


class Renderer:
    def __init__(self, *, title: str, read_only: bool, guard: Guard) -> None:
        self.title = title
        self.read_only = read_only
        self.guard = guard
        self._templates = jinja2.Environment(
            loader=jinja2.PackageLoader("aioevents.panel", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,  # a misspelt name fails the page, not a blank
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._templates.filters.update(
            when=_when, seconds=_seconds, ago=_ago, pretty_json=_pretty_json, percent=_percent
        )

    def page(
        self, request: Request, template: str, *, status: int = 200, **values: Any
    ) -> HTMLResponse:
        token = self.guard.token(request)
        html = self._templates.get_template(template).render(
            base=base_path(request),
            title=self.title,
            read_only=self.read_only,
            csrf_field=FIELD,
            csrf_token=token,
            **values,
        )
        response = HTMLResponse(html, status_code=status, headers=_HEADERS)
        self.guard.keep(request, response, token)
        return response


def _when(moment: datetime | None) -> str:
    return "" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ago(moment: datetime | None) -> str:
    if moment is None:
        return ""
    seconds = (datetime.now(UTC) - moment).total_seconds()
    if seconds < 0:
        return f"in {_seconds(-seconds)}"
    return f"{_seconds(seconds)} ago"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 0.001:
        return f"{value * 1_000_000:.0f} µs"
    if value < 1:
        return f"{value * 1000:.1f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    return f"{value / 3600:.1f} h"


def _percent(value: float) -> str:
    return f"{value * 100:.1f} %"


def _pretty_json(text: str) -> str:
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False, sort_keys=True)
    except ValueError:
        return text
