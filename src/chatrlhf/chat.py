"""``chatrlhf chat``: talk to a model in the terminal, multi-turn (DeepSpeed-Chat's ``chat.py``).

Each turn renders the whole conversation (optional system message + the turns so far) with the model's
chat template and samples the answer with ``chatrlhf.rollout.generate``. When the conversation grows past
``max_history_tokens`` the oldest exchanges are dropped (a user turn with its answer, so the history still
starts with a user turn); a single message longer than that keeps its last tokens.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from chatrlhf.config import ConfigError, GenerationConfig, ModelLoadConfig
from chatrlhf.data.encode import encode_prompt

HELP = "/reset clears the history, /exit or /quit (or Ctrl-D) leaves, /help shows this."
_NO_LIMIT = 1 << 30


@dataclass
class ChatConfig:
    """Chat with a model in the terminal: multi-turn, /reset clears the history, /exit or Ctrl-D leaves."""

    model: ModelLoadConfig = field(default_factory=ModelLoadConfig)
    """The model: a local HF model dir (e.g. ``outputs/pipeline/ppo/model``) or a built-in name."""
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=256, temperature=0.7,
                                                                                  top_p=0.9))
    """How answers are sampled (temperature 0: greedy); a longer answer than ``max_new_tokens`` is cut."""
    system: str | None = None
    """System message placed before the conversation (None: the chat template's default, if any)."""
    seed: int = 0
    """Seed of the sampling generator: the same inputs and seed give the same answers."""
    max_history_tokens: int = 1536
    """Prompt budget in tokens: the oldest turns are dropped beyond it."""

    def validate(self) -> None:
        self.model.validate("model")
        self.generation.validate("generation")
        if self.max_history_tokens < 1:
            raise ConfigError(f"--max_history_tokens must be >= 1, got {self.max_history_tokens}")


def fit_history(
    tokenizer, system: str | None, turns: list[dict], max_tokens: int
) -> tuple[list[int], list[dict]]:
    """(prompt ids, kept turns): drops the oldest user+assistant exchanges until the prompt fits in
    ``max_tokens``; when the last user turn alone does not fit, its prompt keeps the last ``max_tokens``.

    Example: turns [u1, a1, u2, a2, u3] whose full prompt is too long -> tries [u2, a2, u3], then [u3].
    """
    head = [{"role": "system", "content": system}] if system else []
    while True:
        ids = encode_prompt(tokenizer, head + turns, _NO_LIMIT)
        if len(ids) <= max_tokens or len(turns) <= 1:
            break
        turns = turns[2:]
    if len(ids) > max_tokens:
        ids = encode_prompt(tokenizer, head + turns, max_tokens, long_prompt="truncate_left")
    return ids, turns


def load_for_chat(model_cfg: ModelLoadConfig, backend: str = "native", *, seed: int = 0, max_model_len: int = 2048):
    """(generation engine, tokenizer, eos ids) for ``model_cfg`` with ``--generation.backend backend``: the model
    in eval mode on the best device, or a vLLM engine built from its directory (its Hugging Face weights are
    then not loaded). A missing model is a FileNotFoundError."""
    from chatrlhf.evaluation.answers import eos_token_ids
    from chatrlhf.models import builtin_names, load_causal_lm, load_tokenizer, resolve_model
    from chatrlhf.models.loading import check_model_dir
    from chatrlhf.rollout.inference import InferenceEngine, inference_backend

    ref, trust = model_cfg.name_or_path, model_cfg.trust_remote_code
    chosen, _ = inference_backend(backend, model_cfg.dtype)
    model = None
    try:
        tokenizer = load_tokenizer(ref, trust_remote_code=trust)
        if chosen == "vllm":
            check_model_dir(ref, trust)  # the checks load_causal_lm makes, before vLLM reads the dir
        else:
            model = load_causal_lm(ref, dtype=model_cfg.dtype, trust_remote_code=trust)
    except FileNotFoundError:
        raise
    except OSError as err:
        # Neither a local dir nor a built-in name, and not loadable as a hub id (offline, or no such repo).
        local = ref not in builtin_names() and not Path(ref).expanduser().is_dir()
        raise FileNotFoundError(
            f"Model {ref} could not be loaded"
            + (": no such dir or built-in model" if local else "")
            + f" ({err.__class__.__name__}). Pass a saved model dir (holding config.json), a reachable "
            f"hub id or one of {', '.join(builtin_names())}."
        ) from err
    if model is not None:
        model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    model_dir = resolve_model(ref)
    engine = InferenceEngine(chosen, model=model, model_dir=model_dir, dtype=model_cfg.dtype, seed=seed,
                             max_model_len=_fit_positions(model_dir, max_model_len), trust_remote_code=trust)
    generation_config = model.generation_config if model is not None else _generation_config(model_dir)
    return engine, tokenizer, eos_token_ids(tokenizer, generation_config=generation_config)


def _generation_config(model_dir: str):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: the tokenizer's eos only
        return None


def _fit_positions(model_dir: str, max_model_len: int) -> int:
    """``max_model_len`` capped at the model's positions (vLLM refuses a longer one); a longer conversation
    keeps its last turns (``fit_history``), a longer single prompt then fails naming the limit."""
    from transformers import AutoConfig

    try:
        limit = getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", None)
    except (OSError, ValueError):
        return max_model_len
    return min(max_model_len, limit) if limit else max_model_len


def run_chat(cfg: ChatConfig, input_fn=input, output: TextIO = sys.stdout) -> None:
    """The chat loop: reads a line with ``input_fn``, prints the answer to ``output``, until /exit or EOF."""
    cfg.validate()

    def say(text: str) -> None:
        print(text, file=output, flush=True)

    session = ChatSession(cfg)
    say(f"chatrlhf chat: {cfg.model.name_or_path}. {HELP}")
    try:
        _chat_loop(session, input_fn, say)
    finally:
        session.close()


def _chat_loop(session: ChatSession, input_fn, say) -> None:
    while True:
        try:
            line = input_fn("user> ")
        except (EOFError, KeyboardInterrupt):
            say("")
            break
        command = line.strip().lower()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            session.history.clear()
            say("[history cleared]")
        elif command == "/help":
            say(HELP)
        elif command:
            for text in session.answer(line):
                say(text)


class ChatSession:
    """One conversation: the model, its sampler state and the turns so far."""

    def __init__(self, cfg: ChatConfig):
        self.cfg = cfg
        self.engine, self.tokenizer, self.eos = load_for_chat(
            cfg.model, cfg.generation.backend, seed=cfg.seed,
            max_model_len=cfg.max_history_tokens + cfg.generation.max_new_tokens)
        self.device = self.engine.device
        self.sampling = cfg.generation.sampling()
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos[0]
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.history: list[dict] = []

    def close(self) -> None:
        self.engine.close()

    def answer(self, line: str) -> list[str]:
        """The lines to show for one user message (notes, then the answer); the history grows by one exchange."""
        from chatrlhf.rollout import decode_responses

        cfg, notes = self.cfg, []
        ids, kept = fit_history(self.tokenizer, cfg.system, self.history + [{"role": "user", "content": line}],
                                cfg.max_history_tokens)
        if len(kept) < len(self.history) + 1:
            notes.append(f"[history over {cfg.max_history_tokens} tokens: oldest turns dropped]")
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, P)
        try:
            rollout = self.engine.generate(input_ids, torch.ones_like(input_ids), self.sampling, eos_token_ids=self.eos,
                                           pad_token_id=self.pad, generator=self.generator)
        except KeyboardInterrupt:
            return notes + ["\n[interrupted; the message was not added to the history]"]
        answer = decode_responses(self.tokenizer, rollout)[0]
        self.history = kept + [{"role": "assistant", "content": answer}]
        notes.append(f"assistant> {answer}")
        if not bool(rollout.finished[0]):
            notes.append(f"[answer cut at max_new_tokens={cfg.generation.max_new_tokens}]")
        return notes
