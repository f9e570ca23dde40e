"""``chatrlhf serve-reward``: any ``--reward`` spec served over HTTP, for trainers using ``--reward http://...``.

    POST /score    {"prompts", "responses", "finished", "meta"} -> {"scores": [...]}  (``chatrlhf.rewards.remote``)
    GET  /health   {"status": "ok", "reward": SPEC}

The server receives texts, not token ids: each batch becomes a ``RewardBatch`` with empty ``sequences``, and a
reward model is built without a policy tokenizer, so it re-encodes the texts with its own tokenizer and chat
template (``RewardModelSource``'s text path). Batches are scored one at a time (a lock), off the event loop.

Security is the feedback app's (``chatrlhf.feedback.security.secure``): loopback by default; any other host
needs a token, checked on every request, ``/health`` included (``Authorization: Bearer``); without a token the
Host header must be a loopback name; bodies over ``--max_request_bytes`` get 413. Every answer is JSON:
``{"scores": [...]}``, or ``{"error": "one line"}`` with 400 (a request that breaks the contract), 401, 404,
405, 413, 422 (the reward source refused the batch, e.g. a function's bad return) or 500 (scoring failed).
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' annotations (``request: Request``, imported
# inside create_app to keep this module light for the CLI's parser) as objects, not as names to look up.
import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Literal

from chatrlhf.config import ConfigError
from chatrlhf.feedback.serve import is_loopback
from chatrlhf.rewards.remote import TOKEN_ENV

log = logging.getLogger("chatrlhf.rewards.server")
ROUTES = "POST /score, GET /health"
FIELDS = ("prompts", "responses", "finished", "meta")


@dataclass
class ServeRewardConfig:
    """Serve a reward spec (a reward-model dir, an ensemble, rater, a function ...) over HTTP at /score, for
    trainers that use ``--reward http://HOST:PORT/score`` (docs/rewards.md)."""

    reward: str = ""
    """The reward to serve: any ``--reward`` spec of ``chatrlhf ppo`` (docs/rewards.md), e.g. ``rater``,
    ``outputs/rm/model``, ``my_rewards.py:score`` or ``0.7*outputs/rm/model + 0.3*rater``."""
    host: str = "127.0.0.1"
    """Address to listen on. Loopback by default; any other address needs ``--token`` (or CHATRLHF_REWARD_TOKEN)."""
    port: int = 8001
    """TCP port (0: any free port; the address is printed)."""
    token: str | None = None
    """Access token every request must carry as ``Authorization: Bearer``. Default: the CHATRLHF_REWARD_TOKEN
    environment variable, the one ``RemoteSource`` sends. Required on a non-loopback ``host``."""
    max_request_bytes: int = 16 << 20
    """Largest request body accepted (bytes); larger ones get 413."""
    max_batch: int = 4096
    """Most answers scored in one request; more get 400."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight dtype of reward models in the spec."""
    device: str = "auto"
    """Where reward models run: ``auto`` (cuda if there is a GPU, else cpu), ``cpu``, ``cuda`` or ``cuda:N``."""
    trust_remote_code: bool = False
    """Run model code shipped with a reward-model checkpoint. Off by default: it executes arbitrary Python."""
    normalize_sources: bool = False
    """Standardise each term of an ensemble spec by its running moments (as ``chatrlhf ppo``'s flag). Off by
    default so a score depends only on the request: the server's moments are not saved with a trainer's
    checkpoints, so a resumed run would not see the same ones. Normalise in the trainer instead
    (``--reward "0.5*http://... + 0.5*rater"``)."""

    def validate(self) -> None:
        # An empty --reward is refused by build_reward_source ("no reward given: set --reward ...") before
        # anything loads; validate() leaves it so that the defaults stay a valid config.
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        if self.max_request_bytes < 1024:
            raise ConfigError(f"--max_request_bytes must be >= 1024, got {self.max_request_bytes}")
        if self.max_batch < 1:
            raise ConfigError(f"--max_batch must be >= 1, got {self.max_batch}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.token is not None and len(self.token) < 16:
            raise ConfigError("--token must be at least 16 characters (make one with: python -c "
                              "'import secrets; print(secrets.token_urlsafe())')")
        if resolve_token(self) is None and not is_loopback(self.host):
            raise ConfigError(f"--host {self.host} is not a loopback address, so the server needs an access token: "
                              f"set --token (or {TOKEN_ENV}); trainers send it from {TOKEN_ENV}")


def resolve_token(cfg: ServeRewardConfig) -> str | None:
    """--token, else $CHATRLHF_REWARD_TOKEN, else None (loopback only: ``validate`` refuses it elsewhere)."""
    token = cfg.token or os.environ.get(TOKEN_ENV) or None
    if token is not None and len(token) < 16:  # --token was checked by validate(); the variable was not
        raise ConfigError(f"{TOKEN_ENV} must be at least 16 characters, got {len(token)} (make one with: python -c "
                          "'import secrets; print(secrets.token_urlsafe())')")
    return token


# ------------------------------------------------------------------------------------------ the request
class BadRequest(ValueError):
    """The request breaks the contract; the message (answered with 400) names the field and the row."""


def _list(body: dict, name: str, n: int | None, default=None) -> list:
    if name not in body and default is None:
        raise BadRequest(f"\"{name}\" is missing; the fields are {', '.join(FIELDS)} (finished and meta optional)")
    value = body.get(name, default)
    if not isinstance(value, list):
        raise BadRequest(f"\"{name}\" must be a list{'' if default is None else ' (or left out)'}, got "
                         f"{type(value).__name__}")
    if n is not None and len(value) != n:
        raise BadRequest(f"\"{name}\" has {len(value)} entries but \"responses\" has {n}; give one per answer")
    return value


def _check_rows(values: list, name: str, ok, expected: str) -> None:
    for i, value in enumerate(values):
        if not ok(value):
            raise BadRequest(f"{name}[{i}] must be {expected}, got {type(value).__name__}")


def _is_message(m) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)


def read_request(data: bytes, max_batch: int):
    """The ``RewardBatch`` of a /score body (texts only: empty ``sequences``), or a BadRequest naming the field."""
    import torch

    from chatrlhf.limits import InputError, parse_json
    from chatrlhf.rewards.contract import RewardBatch

    try:
        body = parse_json(data, "request body")
    except InputError as err:
        raise BadRequest(str(err)) from None
    except ValueError as err:  # json.JSONDecodeError
        raise BadRequest(f"request body is not JSON ({err})") from None
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object with the fields {', '.join(FIELDS)}")
    if unknown := sorted(set(body) - set(FIELDS)):
        raise BadRequest(f"unknown field \"{unknown[0]}\"; the fields are {', '.join(FIELDS)}")
    responses = _list(body, "responses", None)
    n = len(responses)
    if n > max_batch:
        raise BadRequest(f"{n} answers in one request, over the server's --max_batch {max_batch}; send smaller batches")
    _check_rows(responses, "responses", lambda r: isinstance(r, str), "text")
    prompts = _list(body, "prompts", n)
    _check_rows(prompts, "prompts", lambda p: isinstance(p, list) and p and all(map(_is_message, p)),
                "a non-empty list of {\"role\": text, \"content\": text} messages")
    finished = _list(body, "finished", n, [True] * n)
    _check_rows(finished, "finished", lambda f: isinstance(f, bool), "true or false")
    meta = _list(body, "meta", n, [{}] * n)
    _check_rows(meta, "meta", lambda m: isinstance(m, dict), "an object")
    empty = torch.zeros(n, 0, dtype=torch.long)  # (B, 0): no token ids; sources read the texts
    return RewardBatch(empty, empty.clone(), prompts, responses, finished, meta)


def score_batch(source, batch, lock: threading.Lock) -> list[float]:
    """The source's scores as floats; a ValueError names a non-finite one."""
    import torch

    if not batch.responses:
        return []  # nothing to score; some sources cannot take an empty batch
    with lock:  # one batch at a time: a model, or an ensemble's running moments, is not shared across threads
        scores = torch.as_tensor(source(batch)).detach().float().cpu()
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"reward {source.name} gave the non-finite score {scores[bad[0]].item()} for row {bad[0]}")
    return scores.tolist()


# ----------------------------------------------------------------------------------------------- the app
class _JsonOnly:
    """ASGI middleware: every request reads as a JSON client's (``Accept: application/json``), so the shared
    security layers answer their refusals (401, 400 Host, 413) as ``{"error": ...}``, not as a feedback page."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = [(k, v) for k, v in scope["headers"] if k != b"accept"]
            scope = {**scope, "headers": [*headers, (b"accept", b"application/json")]}
        await self.app(scope, receive, send)


def create_app(source, *, token: str | None, allowed_hosts: tuple[str, ...] | None, max_request_bytes: int,
               max_batch: int):
    """The /score and /health routes over ``source``, behind ``chatrlhf.feedback.security.secure``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    from chatrlhf.feedback.security import secure

    app = FastAPI(title="chatrlhf reward", docs_url=None, redoc_url=None, openapi_url=None)
    secure(app, token, allowed_hosts, max_request_bytes)
    app.add_middleware(_JsonOnly)
    lock = threading.Lock()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        detail = "no such route" if err.status_code == 404 else str(err.detail)
        return JSONResponse({"error": f"{request.method} {request.url.path}: {detail} (the routes: {ROUTES})"},
                            status_code=err.status_code, headers=err.headers)

    @app.get("/health")
    async def health():
        return {"status": "ok", "reward": source.name}

    @app.post("/score")
    async def score(request: Request):
        try:
            batch = read_request(await request.body(), max_batch)
        except BadRequest as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        try:
            scores = await run_in_threadpool(score_batch, source, batch, lock)
        except ValueError as err:  # the source refused the batch (a function's bad return, a bad meta value)
            return JSONResponse({"error": " ".join(str(err).split())}, status_code=422)
        except Exception as err:  # noqa: BLE001 - logged whole; the client gets one line and may try again
            log.error("scoring a batch of %d failed", len(batch.responses), exc_info=err)
            return JSONResponse({"error": f"scoring failed: {type(err).__name__}: {' '.join(str(err).split())}"},
                                status_code=500)
        return {"scores": scores}

    return app


# ------------------------------------------------------------------------------------------- the command
def _place(ensemble, device: str) -> str:
    """Puts the model of every reward-model term on ``device`` (as the training loop does); returns the device."""
    import torch

    from chatrlhf.engine.frozen import FrozenModel

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    for source in ensemble.sources:
        if source.needs_placement:
            source.model = FrozenModel(source.model, "device", torch.device(device))
    return device


def run_serve_reward(cfg: ServeRewardConfig) -> None:
    import uvicorn

    from chatrlhf.feedback.security import LOOPBACK_HOSTS
    from chatrlhf.rewards.factory import build_reward_source

    cfg.validate()
    token = resolve_token(cfg)
    source = build_reward_source(cfg.reward, None, cfg.dtype, cfg.trust_remote_code,
                                 normalize_sources=cfg.normalize_sources)
    device = _place(source, cfg.device)
    app = create_app(source, token=token, allowed_hosts=None if token else (*LOOPBACK_HOSTS, cfg.host),
                     max_request_bytes=cfg.max_request_bytes, max_batch=cfg.max_batch)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    original_startup = server.startup

    async def startup(sockets=None):
        await original_startup(sockets=sockets)
        port = server.servers[0].sockets[0].getsockname()[1] if server.servers else cfg.port
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        access = "token required" if token else "loopback only, no token"
        print(f"[chatrlhf] serve-reward: {source.name} on {device} at http://{host}:{port}/score ({access}; "
              "GET /health); Ctrl-C stops it", flush=True)

    server.startup = startup
    server.run()
