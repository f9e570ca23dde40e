"""``chatrlhf serve``: the feedback web app on one or two models and an SQLite file (docs/feedback.md)."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from chatrlhf.config import ConfigError, GenerationConfig, ModelLoadConfig

TOKEN_ENV = "CHATRLHF_TOKEN"


@dataclass
class ServeConfig:
    """Web app to chat with models, compare and rate their answers; the feedback goes to an SQLite file
    that ``chatrlhf export`` and ``chatrlhf train --feedback`` turn into training data."""

    model: ModelLoadConfig = field(default_factory=ModelLoadConfig)
    """The model to serve: a local HF model dir or a built-in name. The compare page shows two samples of it,
    unless ``compare_with`` names a second model."""
    compare_with: str | None = None
    """A second model (dir or built-in name, loaded like ``model``): the compare page then pits one answer of
    each against the other, in a random order per prompt."""
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=256, temperature=0.7,
                                                                                  top_p=0.9))
    """How answers are sampled (temperature 0: greedy, then one model's two samples are equal)."""
    db: str = "feedback.db"
    """The SQLite file the feedback goes to (created if missing; an existing one is added to)."""
    prompts: list[str] = field(default_factory=list)
    """Prompt files to add to the queue at start-up (same syntax as ``data.datasets``, e.g. ``demo:prompts_eval``
    or ``prompts.jsonl``); prompts already in the database are not added twice."""
    host: str = "127.0.0.1"
    """Address to listen on. Loopback by default; any other address needs an access token."""
    port: int = 8000
    """TCP port (0: any free port; the address is printed)."""
    token: str | None = None
    """Access token every request must carry. Default: the CHATRLHF_TOKEN environment variable; on a
    non-loopback ``host`` with neither, a random token is made and printed with the URL."""
    seed: int = 0
    """Seed of the queue's answers: prompt i's pair is sampled with seed + i, so a restart writes the same pair."""
    system: str | None = None
    """System message placed before every conversation (None: the chat template's default, if any)."""
    max_request_bytes: int = 2 << 20
    """Largest request body accepted (bytes); larger ones get 413. Bounds prompt-file uploads too."""
    guidelines: str | None = None
    """A text file of annotation guidelines (what "better" means for this project), shown on the Compare page
    (None: the built-in ones: helpful, correct, safe, clear; length alone is not quality)."""
    pregenerate: bool = True
    """Generate the queue's answer pairs in the background, ahead of the annotators (off: only when a page asks
    for one, still in the background while the page says it is waiting)."""

    def validate(self) -> None:
        self.model.validate("model")
        self.generation.validate("generation")
        if self.compare_with == "":
            raise ConfigError("--compare_with is empty: name a second model dir, or leave it unset (null)")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        if self.max_request_bytes < 1024:
            raise ConfigError(f"--max_request_bytes must be >= 1024, got {self.max_request_bytes}")
        if self.token is not None and len(self.token) < 16:
            raise ConfigError("--token must be at least 16 characters (make one with: python -c "
                              "'import secrets; print(secrets.token_urlsafe())')")

    def guidelines_text(self) -> str | None:
        """The ``--guidelines`` file's text (None: the built-in guidelines)."""
        if self.guidelines is None:
            return None
        try:
            text = Path(self.guidelines).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"--guidelines {self.guidelines}: cannot be read as UTF-8 text ({err}); name a "
                              "plain-text file") from None
        if not text or len(text) > 20_000:
            raise ConfigError(f"--guidelines {self.guidelines}: must hold 1 to 20,000 characters, has {len(text)}")
        return text


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def resolve_token(cfg: ServeConfig) -> str | None:
    """The token requests must carry: --token, else $CHATRLHF_TOKEN, else on a non-loopback host a new one."""
    token = cfg.token or os.environ.get(TOKEN_ENV) or None
    if token is not None and len(token) < 16:  # --token was checked by validate(); the variable was not
        raise ConfigError(f"{TOKEN_ENV} must be at least 16 characters, got {len(token)} (make one with: python -c "
                          "'import secrets; print(secrets.token_urlsafe())')")
    if token is None and not is_loopback(cfg.host):
        token = secrets.token_urlsafe(24)
    return token


def run_serve(cfg: ServeConfig) -> None:
    import uvicorn

    from chatrlhf.data.sources import load_records
    from chatrlhf.feedback.answerer import Answerer, PairWorker
    from chatrlhf.feedback.app import create_app
    from chatrlhf.feedback.store import FeedbackStore

    cfg.validate()
    guidelines = cfg.guidelines_text()
    token = resolve_token(cfg)
    store = FeedbackStore(cfg.db)
    for source in cfg.prompts:
        records, _ = load_records(source, fmt="prompt")
        added, present = store.add_prompts([r["prompt"] for r in records], source=source)
        print(f"[chatrlhf] serve: {source}: {added} prompts queued, {present} already in {cfg.db}")
    if not store.progress()["prompts"]:
        print("[chatrlhf] serve: the prompt queue is empty: import a prompt file on the Queue page, or start with "
              "--prompts FILE (e.g. --prompts demo:prompts_eval); chat works without one")
    models = [cfg.model] + ([dataclasses.replace(cfg.model, name_or_path=cfg.compare_with)] if cfg.compare_with else [])
    print(f"[chatrlhf] serve: loading {', '.join(m.name_or_path for m in models)}")
    answerer = Answerer(models, cfg.generation, seed=cfg.seed, system=cfg.system)
    worker = PairWorker(store, answerer, pregenerate=cfg.pregenerate)  # off: only the pairs a page waits for
    extra = {"guidelines": guidelines} if guidelines else {}
    app = create_app(store, answerer, worker, token=token, max_request_bytes=cfg.max_request_bytes, **extra,
                     allowed_hosts=None if token else ("127.0.0.1", "localhost", "[::1]", cfg.host))
    worker.start()

    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    original_startup = server.startup

    async def startup(sockets=None):
        await original_startup(sockets=sockets)
        port = server.servers[0].sockets[0].getsockname()[1] if server.servers else cfg.port
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        url = f"http://{host}:{port}/" + (f"?token={token}" if token else "")
        print(f"[chatrlhf] serve: feedback app at {url} (database {cfg.db}); Ctrl-C stops it", flush=True)

    server.startup = startup
    try:
        server.run()
    finally:
        worker.stop()
        answerer.close()
