"""The panel's CSRF guard: a double-submitted token, and the browser's own word on the origin.

A page sets a random token in a cookie (HttpOnly, SameSite=Strict, on the panel's path) once per
browser and puts it in a hidden field of each form; a POST must carry the field equal to the
cookie. Another site can make a browser send the cookie, but cannot read it to fill the field.
A browser that says where a request comes from (``Sec-Fetch-Site``) must say same-origin.
Nothing is kept on the server: every process of a deployment accepts every other's forms.
"""

from __future__ import annotations

import hmac
import re
import secrets

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

__all__ = ["COOKIE", "FIELD", "Guard"]

COOKIE = "aioevents_panel_csrf"
FIELD = "csrf"
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)


class Guard:
    """Hands out tokens with pages and checks them on POSTs."""

    def token(self, request: Request) -> str:
        """The browser's token: the cookie's, or a new one (set by `keep`)."""
        sent = request.cookies.get(COOKIE, "")
        return sent if _TOKEN.fullmatch(sent) else secrets.token_urlsafe(32)

    def keep(self, request: Request, response: Response, token: str) -> None:
        if request.cookies.get(COOKIE) == token:
            return
        response.set_cookie(
            COOKIE,
            token,
            path=base_path(request) + "/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    def check(self, request: Request, field: object) -> None:
        """Refuse (403) a POST whose field does not match its cookie, or that a browser says
        comes from another site."""
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            raise HTTPException(403, f"refused: a request from another site ({site})")
        cookie = request.cookies.get(COOKIE, "")
        if not (isinstance(field, str) and _TOKEN.fullmatch(cookie)):
            raise HTTPException(403, "refused: no CSRF token (reload the page and try again)")
        if not hmac.compare_digest(field.encode(), cookie.encode()):
            raise HTTPException(403, "refused: the CSRF token does not match (reload the page)")


def base_path(request: Request) -> str:
    """Where the panel is mounted: its links start here."""
    return str(request.scope.get("root_path", "")).rstrip("/")
