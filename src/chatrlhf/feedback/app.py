"""The feedback web app (``chatrlhf serve``): chat, compare, rate, the prompt queue and the export.

Pages are rendered on the server (Jinja2, autoescaped) with one small script for busy states and the chat.
Every write route takes a form (the pages; answered with a redirect) or JSON (scripts; answered with JSON):

    GET  /                 progress counters, annotator name
    POST /annotator        set the annotator name (a cookie)
    GET  /chat             chat page             POST /api/chat         {model, messages} -> answer
                                                 POST /api/chat/stream  the same, streamed (chat_stream.py)
                                                 POST /api/chat/stop    {stream_id}: stop a streamed answer
    GET  /compare          next pair to compare  POST /compare          request_id, prompt_id, answer_a, answer_b,
                                                                        choice a|b|tie, comment
    GET  /rate             next answer to rate   POST /rate             request_id, answer_id, overall and the four
                                                                        dimensions 1-5, comment
                                                 POST /undo             kind compare|rate, request_id: the
                                                                        annotator's last judgement stops counting
    GET  /queue            the prompt queue      POST /queue            a prompt file (upload), pasted text (one prompt
                                                                        a line) or JSON {prompts}
    GET  /export           filter counts         GET  /export/{pairs,ratings,comparisons}.jsonl
    GET  /api/progress     the counters as JSON

Security (``security.py``, docs/feedback.md): a token or a loopback Host, no cross-site POST, capped
bodies, a strict Content-Security-Policy. Errors (``errors.py``): ``{"error": "..."}`` for JSON clients,
the error page for browsers, a 4xx for every bad request and never a traceback.
"""

from __future__ import annotations

import re
import secrets
import tempfile
from pathlib import Path
from typing import Annotated
from urllib.parse import quote, unquote

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from chatrlhf.feedback import errors
from chatrlhf.feedback.chat_stream import ChatStreams, save_answer, stream_answer
from chatrlhf.feedback.errors import is_json, templates, wants_json
from chatrlhf.feedback.inputs import ID_MAX, read_int, read_pasted, read_payload, read_seed, read_upload
from chatrlhf.feedback.schema import DIMENSIONS, FeedbackError, NotFound, check_messages, check_name, shown
from chatrlhf.feedback.security import LOOPBACK_HOSTS, secure
from chatrlhf.feedback.store import FeedbackStore

HERE = Path(__file__).resolve().parent
NAME_COOKIE = "chatrlhf_annotator"
MAX_CHAT_MESSAGES = 64
MAX_MESSAGE_CHARS = 8000
QUEUE_PAGE = 100  # prompts per page of the Queue page
# A row id from the query: SQLite's ids are int64 from 1; a larger number would overflow its binding (a 500).
RowId = Annotated[int | None, Query(ge=1, le=ID_MAX)]


DEFAULT_GUIDELINES = """Pick the answer you would rather receive as the person who asked.
- Helpful first: it does what was asked, completely, and answers the actual question.
- Correct: no false facts, no wrong steps; an honest "I am not sure" beats a confident error.
- Safe: it refuses what is harmful, without refusing what is harmless.
- Clear: well organised and no longer than it needs to be. Length alone is not quality.
Choose Tie only when neither is better (both good or both bad in the same way). Skip a prompt you cannot judge."""


def create_app(store: FeedbackStore, answerer, worker=None, *, token: str | None = None,
               allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS, max_request_bytes: int = 2 << 20,
               guidelines: str = DEFAULT_GUIDELINES) -> FastAPI:
    """The app over ``store``. ``answerer`` (``Answerer``) answers chats; ``worker`` (``PairWorker``) fills the
    queue's pairs (None: pairs are generated in the request that needs them). ``allowed_hosts``: Host header
    names accepted without a token (None: any). ``guidelines``: what "better" means, shown on the Compare page."""
    app = FastAPI(title="chatrlhf feedback", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.state.store, app.state.answerer, app.state.worker = store, answerer, worker
    app.state.guidelines, app.state.streams = guidelines, ChatStreams()
    secure(app, token, allowed_hosts, max_request_bytes)
    errors.install(app)
    app.include_router(router)
    return app


# ---------------------------------------------------------------------------------- pages and routes
router = APIRouter()


def _page(request: Request, template: str, status_code: int = 200, **extra) -> HTMLResponse:
    state = request.app.state
    name = _annotator(request)
    ctx = {"annotator": name, "progress": state.store.progress(name), "models": state.answerer.names,
           "worker_error": getattr(state.worker, "error", None), "dimensions": DIMENSIONS, **extra}
    return templates.TemplateResponse(request, template, ctx, status_code=status_code)


def _pair_or_none(request: Request, prompt_id: int):
    """The prompt's pair, or None while the background worker generates it (asked for first). A prompt that
    is not in the queue (a chat turn's) is queued: comparing it needs a pair. Without a worker (tests) the
    pair is generated in this request."""
    state = request.app.state
    pair = state.store.pair(prompt_id)
    if pair is not None:
        return pair
    prompt = state.store.prompt(prompt_id)
    if not prompt["queued"]:
        state.store.add_prompts([prompt["messages"]], source=prompt["source"])  # already present: queued
    if state.worker is None:
        from chatrlhf.feedback.answerer import PairWorker

        PairWorker(state.store, state.answerer).answer_prompt(prompt_id)
        return state.store.pair(prompt_id)
    state.worker.request(prompt_id)
    return None


def _need_name(request: Request) -> Response | None:
    """Home, to give a name first, then back to this very page (its query included: the item it names)."""
    if _annotator(request) is None:
        page = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/?next={quote(page)}", status_code=303)
    return None


def _saved(request: Request, saved, page: str, query: str = "") -> Response:
    if wants_json(request):
        return JSONResponse({"id": saved.id, "created": saved.created}, status_code=201 if saved.created else 200)
    return RedirectResponse(f"{page}?saved=1{query}", status_code=303)


@router.get("/healthz")
def healthz():
    return {"ok": True}


@router.get("/", response_class=HTMLResponse)
def home(request: Request, next: str = ""):
    return _page(request, "home.html", next=_local_path(next))


@router.post("/annotator")
async def set_annotator(request: Request):
    data = await read_payload(request)
    name = check_name(data.get("annotator"))
    response = RedirectResponse(_local_path(data.get("next") or "/"), status_code=303)
    response.set_cookie(NAME_COOKIE, quote(name), samesite="strict", max_age=365 * 24 * 3600)
    return response


@router.get("/api/progress")
def progress(request: Request):
    return request.app.state.store.progress(_annotator(request))


@router.get("/chat", response_class=HTMLResponse)
def chat_page(request: Request):
    return _page(request, "chat.html")


async def _chat_input(request: Request) -> tuple[int, list[dict], int]:
    """(model index, messages, seed) of a chat request: {model, messages, seed (optional)}."""
    names = request.app.state.answerer.names
    data = await read_payload(request, json_only=True)
    model = data.get("model", 0)
    if isinstance(model, bool) or not isinstance(model, int) or not 0 <= model < len(names):
        raise FeedbackError(f"model must be an index 0..{len(names) - 1}, got {shown(model)}")
    messages = check_messages(data.get("messages"))
    if len(messages) > MAX_CHAT_MESSAGES or any(len(m["content"]) > MAX_MESSAGE_CHARS for m in messages):
        raise FeedbackError(f"a chat keeps at most {MAX_CHAT_MESSAGES} messages of {MAX_MESSAGE_CHARS} characters")
    return model, messages, read_seed(data.get("seed", secrets.randbelow(2**31)))


@router.post("/api/chat")
async def chat(request: Request):
    model, messages, seed = await _chat_input(request)
    ans = await run_in_threadpool(request.app.state.answerer.answer, model, messages, seed)
    return save_answer(request.app.state.store, messages, ans)


@router.post("/api/chat/stream")
async def chat_stream(request: Request):
    """The answer as server-sent events while it is generated (``chat_stream.py``)."""
    model, messages, seed = await _chat_input(request)
    state = request.app.state
    events = stream_answer(request, state.store, state.answerer, state.streams, model, messages, seed)
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


@router.post("/api/chat/stop")
async def chat_stop(request: Request):
    request.app.state.streams.stop((await read_payload(request, json_only=True)).get("stream_id"))
    return {"stopped": True}


@router.get("/compare", response_class=HTMLResponse)
def compare_page(request: Request, prompt_id: RowId = None, after: RowId = None, saved: int = 0, undone: int = 0):
    if redirect := _need_name(request):
        return redirect
    store = request.app.state.store
    if prompt_id is None:  # the next prompt; after a skip, the next one after the skipped prompt
        prompt_id = store.next_to_compare(_annotator(request), after or 0)
    if prompt_id is None:
        waiting = store.prompts_missing_answers(limit=1)
        prompt_id = waiting[0] if waiting else None
    if prompt_id is None:
        return _page(request, "done.html", task="compare", saved=saved, **_undo_form(request, "compare", undone))
    prompt = store.prompt(prompt_id)
    pair = _pair_or_none(request, prompt_id)
    if pair is None:
        return _page(request, "waiting.html", prompt=prompt, task="compare")
    return _page(request, "compare.html", prompt=prompt, a=pair[0], b=pair[1], request_id=secrets.token_hex(16),
                 saved=saved, guidelines=request.app.state.guidelines, **_undo_form(request, "compare", undone))


@router.post("/compare")
async def compare(request: Request):
    data = await read_payload(request)
    prompt_id = read_int(data, "prompt_id")
    saved = request.app.state.store.add_comparison(
        data.get("request_id"), prompt_id, read_int(data, "answer_a"), read_int(data, "answer_b"),
        data.get("choice"), _who(request, data), data.get("comment", ""))
    return _saved(request, saved, "/compare", f"&after={prompt_id}")  # on through the queue: skipped ones last


@router.get("/rate", response_class=HTMLResponse)
def rate_page(request: Request, answer_id: RowId = None, saved: int = 0, undone: int = 0):
    if redirect := _need_name(request):
        return redirect
    store = request.app.state.store
    if answer_id is None:
        answer_id = store.next_to_rate(_annotator(request))
    if answer_id is None and (waiting := store.prompts_missing_answers(limit=1)):
        if _pair_or_none(request, waiting[0]) is None:
            return _page(request, "waiting.html", prompt=store.prompt(waiting[0]), task="rate")
        answer_id = store.next_to_rate(_annotator(request))
    if answer_id is None:
        return _page(request, "done.html", task="rate", saved=saved, **_undo_form(request, "rate", undone))
    answer = store.answer(answer_id)
    return _page(request, "rate.html", answer=answer, prompt=store.prompt(answer["prompt_id"]),
                 request_id=secrets.token_hex(16), saved=saved, **_undo_form(request, "rate", undone))


@router.post("/rate")
async def rate(request: Request):
    data = await read_payload(request)
    scores = {k: data.get(k) for k in ("overall", *DIMENSIONS)}
    saved = request.app.state.store.add_rating(data.get("request_id"), read_int(data, "answer_id"), scores,
                                               _who(request, data), data.get("comment", ""))
    return _saved(request, saved, "/rate")


UNDO_KINDS = {"compare": "comparison", "rate": "rating"}
"""POST /undo's ``kind`` (the page) -> the judgement it retracts."""


@router.post("/undo")
async def undo(request: Request):
    """Retracts this annotator's latest comparison (``kind=compare``) or rating (``kind=rate``) still in force;
    a form goes back to the retracted item with "Undone.", JSON gets what was retracted."""
    from dataclasses import asdict

    data = await read_payload(request)
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in UNDO_KINDS:
        raise FeedbackError(f"kind must be 'compare' or 'rate' (the page whose last judgement to undo), got {shown(kind)}")
    undone = request.app.state.store.undo_last(data.get("request_id"), _who(request, data), UNDO_KINDS[kind])
    if wants_json(request):
        return JSONResponse(asdict(undone), status_code=201 if undone.created else 200)
    item = f"prompt_id={undone.prompt_id}" if kind == "compare" else f"answer_id={undone.answer_id}"
    return RedirectResponse(f"/{kind}?{item}&undone=1", status_code=303)


def _undo_form(request: Request, kind: str, undone: int) -> dict:
    """What the pages need for their "Undo last" form: whether there is something to undo, a fresh
    request_id for the form, and whether an undo just led here."""
    name = _annotator(request)
    can_undo = name is not None and request.app.state.store.last_judgement(name, UNDO_KINDS[kind]) is not None
    return {"undo_kind": kind, "can_undo": can_undo, "undo_request_id": secrets.token_hex(16), "undone": undone}


@router.get("/queue", response_class=HTMLResponse)
def queue_page(request: Request, imported: str = "", page: Annotated[int, Query(ge=1, le=ID_MAX)] = 1,
               q: Annotated[str, Query(max_length=200)] = ""):
    store = request.app.state.store
    total = store.queue_size(q)
    pages = max(1, -(-total // QUEUE_PAGE))
    page = min(page, pages)
    rows = store.queue(limit=QUEUE_PAGE, offset=(page - 1) * QUEUE_PAGE, search=q)
    return _page(request, "queue.html", queue=rows, imported=imported, page=page, pages=pages, total=total, q=q,
                 first=(page - 1) * QUEUE_PAGE + 1)


@router.post("/queue")
async def import_prompts(request: Request):
    state = request.app.state
    if is_json(request):
        data = await read_payload(request)
        prompts = data.get("prompts")
        if not isinstance(prompts, list) or not prompts:
            raise FeedbackError("prompts must be a non-empty list of prompts (text, or message lists)")
        source = "api"
    elif (pasted := await read_pasted(request, "text")) is not None:
        prompts, source = pasted, "pasted"  # one prompt per line
    else:
        upload = await read_upload(request, "file")
        source = Path(upload.filename).name
        prompts = _read_prompt_file(source, await upload.read())
    added, present = state.store.add_prompts(prompts, source=source)
    if state.worker is not None:
        state.worker.wake()
    if wants_json(request):
        return JSONResponse({"added": added, "already_present": present}, status_code=201)
    return RedirectResponse(f"/queue?imported={added},{present}", status_code=303)


@router.get("/export", response_class=HTMLResponse)
def export_page(request: Request, min_margin: float = 1.0, min_agreement: float = 1.0):
    from chatrlhf.feedback.export import comparison_agreement, export_rows

    _check_filters(min_margin, min_agreement)
    rows, stats = export_rows(request.app.state.store, min_margin, min_agreement)
    agreement, n_agreement = comparison_agreement(rows["comparisons"], rows["pairs"], min_agreement)
    return _page(request, "export.html", stats=stats, n_pairs=len(rows["pairs"]), min_margin=min_margin,
                 min_agreement=min_agreement, agreement=agreement, n_agreement=n_agreement)


@router.get("/export/{name}.jsonl")
def export_file(request: Request, name: str, min_margin: float = 1.0, min_agreement: float = 1.0):
    from chatrlhf.data.feedback import jsonl_text
    from chatrlhf.feedback.export import export_rows

    _check_filters(min_margin, min_agreement)
    if name not in ("pairs", "ratings", "comparisons", "kto"):
        raise NotFound(f"no export named {name!r}: use pairs, ratings, comparisons or kto")
    rows = export_rows(request.app.state.store, min_margin, min_agreement)[0][name]
    return Response(jsonl_text(rows), media_type="application/x-ndjson",
                    headers={"Content-Disposition": f'attachment; filename="{name}.jsonl"'})


# ---------------------------------------------------------------------------------- request helpers
def _annotator(request: Request) -> str | None:
    raw = request.cookies.get(NAME_COOKIE)
    return unquote(raw) if raw else None


def _who(request: Request, data: dict) -> str:
    name = data.get("annotator")
    if name is None or name == "":  # absent or a blank form field: the cookie's; any other value is checked
        name = _annotator(request)
    if name is None or name == "":
        raise FeedbackError("annotator: give your name (the home page sets it, or send 'annotator')")
    return name


def _local_path(path: str) -> str:
    """Only same-site paths after a redirect (no open redirect to another site)."""
    ok = isinstance(path, str) and path.startswith("/") and not path.startswith("//") and "\\" not in path
    return path if ok else "/"  # not text (a JSON 'next': 5): home, not a crash


def _check_filters(min_margin: float, min_agreement: float) -> None:
    from chatrlhf.config import ConfigError, check_filter_flags

    try:
        check_filter_flags(min_margin, min_agreement, prefix="")
    except ConfigError as err:
        raise FeedbackError(str(err)) from None


def _read_prompt_file(name: str, content: bytes) -> list[list[dict]]:
    """Prompts of an uploaded file, read as ``chatrlhf`` reads prompt data (docs/data.md)."""
    from chatrlhf.data.formats import DataError
    from chatrlhf.data.sources import load_records

    suffix = Path(name).suffix.lower()
    if suffix not in (".jsonl", ".json", ".ndjson", ".csv", ".parquet", ".pq"):
        raise FeedbackError(f"file {name}: use a .jsonl, .json, .csv or .parquet file with a 'prompt' column")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(content)
        try:
            records, _ = load_records(str(path), fmt="prompt")
        except DataError as err:  # the reader's words, without its command-line advice (--data.format, ...)
            what = re.split(r"; formats expected|\. Fix:|; fix:", str(err).replace(str(path), name))[0].rstrip(".")
            raise FeedbackError(f"{what}. Fix: every row needs a 'prompt' field (text, or a list of messages with "
                                "'role' and 'content'), or paste the prompts one per line instead") from None
        except Exception as err:  # noqa: BLE001 - any reader failure (a damaged Parquet file, ...) is the file's fault
            raise FeedbackError(f"file {name} could not be read as prompts ({type(err).__name__}: {err})") from None
    if not records:
        raise FeedbackError(f"file {name} holds no prompts")
    return [r["prompt"] for r in records]
