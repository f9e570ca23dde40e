"""The feedback app's security: who may call it, from where, and with how large a body (docs/feedback.md).

With a token, every route but /healthz needs it (``Authorization: Bearer``, or
the cookie set by opening ``/?token=...`` once), else 401. Without one (loopback only) the Host header must
name the loopback address, which stops DNS rebinding. A cross-site POST (an ``Origin`` other than the app's
own) is refused. Request bodies are capped; every response, refusals and errors included, carries a strict
Content-Security-Policy, so even a model answer that contained markup could not run a script (and Jinja2
escapes it anyway).

The layers, outermost first: ``_Headers`` (the security headers) -> ``errors.CatchAll`` (an uncaught
exception -> 500) -> ``_BodyLimit`` (413) -> ``_guard`` (400 Host, 403 Origin, 401 token) -> the routes.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from starlette.datastructures import MutableHeaders

from chatrlhf.feedback.errors import CatchAll, error_response

TOKEN_COOKIE = "chatrlhf_token"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; "
       "base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # "no-referrer" would make forms send Origin: null
    "X-Frame-Options": "DENY",
}


def secure(app: FastAPI, token: str | None, allowed_hosts: tuple[str, ...] | None, max_request_bytes: int) -> None:
    """Installs the layers of the module docstring (each ``add_middleware`` goes outside the ones before)."""
    app.state.token, app.state.allowed_hosts = token, allowed_hosts
    app.middleware("http")(_guard)
    app.add_middleware(_BodyLimit, max_bytes=max_request_bytes)
    app.add_middleware(CatchAll)
    app.add_middleware(_Headers)


class _Headers:
    """ASGI middleware: the security headers on every response that leaves the app, whoever made it (a
    route, an exception handler, the guard's refusals, the 413, the 500, static files, redirects)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, with_headers)


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
        if length is not None and not length.isdigit():  # uvicorn refuses these itself; other servers may not
            return await error_response(Request(scope), 400, f"Content-Length {length.decode('latin-1')[:40]!r} is "
                                        "not a byte count")(scope, receive, send)
        if length is not None and int(length) > self.max_bytes:
            return await _too_large(scope, self.max_bytes)(scope, receive, send)
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
            await _too_large(scope, self.max_bytes)(scope, receive, send)


def _only_too_large(err: BaseException) -> bool:
    inner = getattr(err, "exceptions", None)  # an ExceptionGroup's members
    return isinstance(err, TooLarge) or (bool(inner) and all(_only_too_large(e) for e in inner))


def _too_large(scope, max_bytes: int) -> Response:
    return error_response(Request(scope), 413, f"request body over {max_bytes} bytes (--max_request_bytes)")


async def _guard(request: Request, call_next):
    """Host check (no token), cross-site POST check, token check."""
    state = request.app.state
    if request.url.path == "/healthz":
        return await call_next(request)
    host = _host_name(request.headers.get("host", ""))
    if state.token is None and state.allowed_hosts is not None and host not in state.allowed_hosts:
        return error_response(request, 400, f"Host {host!r} is not served: open http://127.0.0.1 instead")
    if request.method not in ("GET", "HEAD") and (origin := request.headers.get("origin")):
        if _netloc(origin) != request.headers.get("host"):
            return error_response(request, 403, "cross-site request refused: send it from the app's own pages")
    if state.token is not None:
        if denied := _check_token(request, state.token):
            return denied
    return await call_next(request)


def _check_token(request: Request, token: str) -> Response | None:
    """401 without the token; a GET carrying ``?token=`` trades it for a cookie (redirect); None: let it pass."""
    given = request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE) or ""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if not hmac.compare_digest(given.encode(), token.encode()):
        return error_response(request, 401, "missing or wrong access token: open the URL chatrlhf serve printed "
                              "(it ends with ?token=...) or send 'Authorization: Bearer <token>'",
                              headers={"WWW-Authenticate": "Bearer"})
    if "token" in request.query_params and request.method == "GET":
        # The token leaves the address bar (and history) for a cookie this site alone sends.
        response = RedirectResponse(str(request.url.remove_query_params("token")), status_code=303)
        response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response
    return None


def _netloc(url: str) -> str | None:
    """The host:port of an Origin; None for one urlsplit cannot read (``http://[::1``): not the app's own."""
    try:
        return urlsplit(url).netloc
    except ValueError:
        return None


def _host_name(host: str) -> str:
    """``127.0.0.1:8000`` -> ``127.0.0.1``; ``[::1]:8000`` -> ``[::1]``."""
    return host.split("]")[0] + "]" if host.startswith("[") else host.rsplit(":", 1)[0]
