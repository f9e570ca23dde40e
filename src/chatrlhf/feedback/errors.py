"""How the feedback app answers a request it refuses or fails to serve: one shape, whatever raised.

    JSON clients (a JSON body, an ``/api/`` path or ``Accept: application/json``)   {"error": "one line"}
    browsers                                                                        the error page (error.html)

with a 4xx status for the client's mistakes (400 a wrong value, 401 no token, 403 cross-site, 404 no such
id or page, 405 wrong method, 413 too large) and 500 for the server's own, whose details go to the server
log and never into the response. The sources, each mapped here: ``FeedbackError`` (our checks),
FastAPI's ``RequestValidationError`` (a query parameter that does not parse: 400, not FastAPI's 422
``{"detail": [...]}``), Starlette's ``HTTPException`` (unknown route, wrong method, unreadable form) and
any other exception (``CatchAll``). The security headers go on all of them (``security.py``).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException

from chatrlhf.feedback.markdown import render as render_markdown
from chatrlhf.feedback.schema import FeedbackError, NotFound, shown

templates = Jinja2Templates(directory=Path(__file__).resolve().parent / "templates")
templates.env.filters["markdown"] = render_markdown  # model answers: a safe Markdown subset (feedback/markdown.py)
log = logging.getLogger("chatrlhf.feedback")
INTERNAL = "internal error; the server log has the details"
PAGES = "/, /chat, /compare, /rate, /queue, /export"


def is_json(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"


def wants_json(request: Request) -> bool:
    return is_json(request) or request.url.path.startswith("/api/") or \
        "application/json" in request.headers.get("accept", "")


def error_response(request: Request, status: int, message: str, headers: dict | None = None,
                   title: str | None = None) -> Response:
    """The refusal in the shape the client reads; ``title`` heads the page (default: ``_title``). The page
    shows no counters or names from the database: it also answers clients that are not let in (no token,
    a rebinding Host)."""
    if wants_json(request):
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    return templates.TemplateResponse(request, "error.html", {"title": title or _title(request.method, status),
                                                              "message": message}, status_code=status, headers=headers)


def _title(method: str, status: int) -> str:
    if status >= 500:
        return "Server error"
    if status == 401:
        return "Access token needed"
    if method not in ("GET", "HEAD"):
        return "Not saved"  # a form the app refused (a bad value, an unknown id, too large): nothing was written
    return {404: "Not found", 403: "Refused", 413: "Too large"}.get(status, "Bad request")


def install(app: FastAPI) -> None:
    """Registers the handlers; the catch-all for other exceptions is middleware (``CatchAll``), added by
    ``security.secure`` so that its 500 gets the security headers too."""
    app.add_exception_handler(FeedbackError, _refused)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http_error)


async def _refused(request: Request, err: FeedbackError) -> Response:
    return error_response(request, 404 if isinstance(err, NotFound) else 400, str(err))


async def _invalid(request: Request, err: RequestValidationError) -> Response:
    return error_response(request, 400, validation_message(err.errors()))


async def _http_error(request: Request, err: HTTPException) -> Response:
    """Routing's refusals (no such page, wrong method) and Starlette's own; the titles name the route's
    problem, not "Not saved", whatever the method."""
    detail, title = str(err.detail), None
    if err.status_code == 404:
        detail, title = f"{request.url.path} does not exist (the pages: {PAGES})", "Not found"
    elif err.status_code == 405:
        allowed = (err.headers or {}).get("Allow", "")
        detail = f"{request.method} is not allowed on {request.url.path}" + (f" (use {allowed})" if allowed else "")
        title = "Method not allowed"
    elif detail == HTTPStatus(err.status_code).phrase:
        detail = f"{request.method} {request.url.path}: {detail.lower()}"
    return error_response(request, err.status_code, detail, headers=err.headers, title=title)


# What each pydantic error type (query and path parameters) expects, in the words of docs/feedback.md.
_EXPECTED = {
    "int_parsing": "must be an integer", "int_type": "must be an integer", "int_from_float": "must be an integer",
    "float_parsing": "must be a number", "float_type": "must be a number", "finite_number": "must be a finite number",
    "bool_parsing": "must be true or false", "string_type": "must be text", "missing": "is required",
}


def validation_message(errors: list[dict]) -> str:
    """One line naming each bad parameter and what it must be: ``prompt_id: must be an integer, got 'abc'``."""
    parts = []
    for e in errors[:3]:  # one line: three problems are enough to act on
        name = ".".join(str(p) for p in e.get("loc", ())[1:]) or "request"
        ctx, kind = e.get("ctx") or {}, e.get("type", "")
        if kind in ("greater_than_equal", "less_than_equal"):
            expected = f"must be {'>=' if kind == 'greater_than_equal' else '<='} {ctx.get('ge', ctx.get('le'))}"
        else:
            expected = _EXPECTED.get(kind, str(e.get("msg", "is not valid")))
        parts.append(f"{name}: {expected}" + ("" if kind == "missing" else f", got {shown(e.get('input'))}"))
    return "; ".join(parts) + (f" (and {len(errors) - 3} more)" if len(errors) > 3 else "")


class CatchAll:
    """ASGI middleware: an exception nothing else handled becomes the 500 of the contract (the traceback
    goes to the log, not to the client). It sits outside the guard and the body cap, inside the security
    headers; Starlette's own last-resort handler would sit outside every middleware, so its 500 would carry
    no security headers (and would answer JSON clients with plain text)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watch(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as err:  # noqa: BLE001 - logged whole; the client gets the one line of the contract
            log.error("%s %s failed", scope.get("method"), scope.get("path"), exc_info=err)
            if started:  # half a response is out: only closing the connection is left
                raise
            await error_response(Request(scope), 500, INTERNAL)(scope, receive, send)
