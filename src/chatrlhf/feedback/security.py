"""The feedback app's security: who may call it, from where, and with how large a body (docs/feedback.md).

With a token, every route but /healthz needs it (``Authorization: Bearer``, or
the cookie set by opening ``/?token=...`` once), else 401. Without one (loopback only) the Host header must
name the loopback address, which stops DNS rebinding. A cross-site POST (an ``Origin`` other than the app's
own) is refused. Request bodies are capped; responses carry a strict Content-Security-Policy, so even a
model answer that contained markup could not run a script (and Jinja2 escapes it anyway).
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response

TOKEN_COOKIE = "chatrlhf_token"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; "
       "base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


def secure(app: FastAPI, token: str | None, allowed_hosts: tuple[str, ...] | None, max_request_bytes: int) -> None:
    """Installs the guard (Host, Origin, token, response headers) and, outside it, the body cap."""
    app.state.token, app.state.allowed_hosts = token, allowed_hosts
    app.middleware("http")(_guard)
    app.add_middleware(_BodyLimit, max_bytes=max_request_bytes)


class TooLarge(Exception):
    """A streamed request body passed the cap (``_BodyLimit`` answers it with 413)."""


class _BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes``, by its Content-Length or while it streams in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _too_large(self.max_bytes)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except Exception as err:  # noqa: BLE001 - re-raised unless it is TooLarge
            # BaseHTTPMiddleware (the guard) reads the body in a task group, so TooLarge arrives wrapped in
            # an ExceptionGroup; unhandled, that would be a 500 instead of the 413.
            if not _only_too_large(err):
                raise
            await _too_large(self.max_bytes)(scope, receive, send)


def _only_too_large(err: BaseException) -> bool:
    inner = getattr(err, "exceptions", None)  # an ExceptionGroup's members
    return isinstance(err, TooLarge) or (bool(inner) and all(_only_too_large(e) for e in inner))


def _too_large(max_bytes: int) -> Response:
    return JSONResponse({"error": f"request body over {max_bytes} bytes (--max_request_bytes)"}, status_code=413)


async def _guard(request: Request, call_next):
    """Host check (no token), cross-site POST check, token check, then security headers on the response."""
    state = request.app.state
    if request.url.path == "/healthz":
        return await call_next(request)
    host = _host_name(request.headers.get("host", ""))
    if state.token is None and state.allowed_hosts is not None and host not in state.allowed_hosts:
        return PlainTextResponse(f"Host {host!r} is not served: open http://127.0.0.1 instead", status_code=400)
    if request.method not in ("GET", "HEAD") and (origin := request.headers.get("origin")):
        if urlsplit(origin).netloc != request.headers.get("host"):
            return PlainTextResponse("cross-site request refused", status_code=403)
    if state.token is not None:
        if denied := _check_token(request, state.token):
            return denied
    response = await call_next(request)
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"  # "no-referrer" would make forms send Origin: null
    response.headers["X-Frame-Options"] = "DENY"
    return response


def _check_token(request: Request, token: str) -> Response | None:
    """401 without the token; a GET carrying ``?token=`` trades it for a cookie (redirect); None: let it pass."""
    given = request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE) or ""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if not hmac.compare_digest(given.encode(), token.encode()):
        return PlainTextResponse("missing or wrong access token: open the URL chatrlhf serve printed (it ends "
                                 "with ?token=...) or send 'Authorization: Bearer <token>'",
                                 status_code=401, headers={"WWW-Authenticate": "Bearer"})
    if "token" in request.query_params and request.method == "GET":
        # The token leaves the address bar (and history) for a cookie this site alone sends.
        response = RedirectResponse(str(request.url.remove_query_params("token")), status_code=303)
        response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response
    return None


def _host_name(host: str) -> str:
    """``127.0.0.1:8000`` -> ``127.0.0.1``; ``[::1]:8000`` -> ``[::1]``."""
    return host.split("]")[0] + "]" if host.startswith("[") else host.rsplit(":", 1)[0]
