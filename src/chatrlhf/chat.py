"""``chatrlhf chat``: talk to a model in the terminal, multi-turn (DeepSpeed-Chat's ``chat.py``).

Each turn renders the whole conversation (optional system message + the turns so far) with the model's
chat template and samples the answer with ``chatrlhf.rollout.generate``. When the conversation grows past
``max_history_tokens`` the oldest exchanges are dropped (a user turn with its answer, so the history still
starts with a user turn); a single message longer than that keeps its last tokens.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

import torch

from chatrlhf.config import ConfigError
from chatrlhf.data.encode import encode_prompt

HELP = "/reset clears the history, /exit or /quit (or Ctrl-D) leaves, /help shows this."
_NO_LIMIT = 1 << 30


@dataclass
class ChatConfig:
    """Chat with a model in the terminal: multi-turn, /reset clears the history, /exit or Ctrl-D leaves."""

    model: str = "smollm2-135m-instruct"
    """A local HF model dir (e.g. ``outputs/run/ppo/model``) or a built-in name."""
    system: str | None = None
    """System message placed before the conversation (None: the chat template's default, if any)."""
    max_new_tokens: int = 256
    """Longest answer in tokens; a longer one is cut and marked as cut."""
    temperature: float = 0.7
    """Sampling temperature; 0 means greedy decoding."""
    top_p: float = 0.9
    """Nucleus sampling threshold (1.0: off)."""
    seed: int = 0
    """Seed of the sampling generator: the same inputs and seed give the same answers."""
    backend: Literal["native", "hf"] = "native"
    """Generation backend: ``native`` (chatrlhf's KV-cache sampler) or ``hf`` (transformers generate)."""
    max_history_tokens: int = 1536
    """Prompt budget in tokens: the oldest turns are dropped beyond it."""

    def validate(self) -> None:
        check_sampling_flags(self.max_new_tokens, self.temperature, self.top_p)
        if self.max_history_tokens < 1:
            raise ConfigError(f"--max_history_tokens must be >= 1, got {self.max_history_tokens}")


def check_sampling_flags(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """The sampling flags of ``chatrlhf chat`` and ``chatrlhf serve``."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ConfigError(f"--temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"--top_p must be in (0, 1], got {top_p}")


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


def _load(ref: str):
    """(model in eval mode on the best device, tokenizer); a missing model is a FileNotFoundError."""
    from chatrlhf.evaluation.answers import model_device
    from chatrlhf.models import builtin_names, load_causal_lm, load_tokenizer

    try:
        tokenizer = load_tokenizer(ref)
        model = load_causal_lm(ref)
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
    model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return model, tokenizer, model_device(model)


def run_chat(cfg: ChatConfig, input_fn=input, output: TextIO = sys.stdout) -> None:
    """The chat loop: reads a line with ``input_fn``, prints the answer to ``output``, until /exit or EOF."""
    from chatrlhf.evaluation.answers import eos_token_ids
    from chatrlhf.rollout import SamplingConfig, decode_responses, generate

    cfg.validate()

    def say(text: str) -> None:
        print(text, file=output, flush=True)

    model, tokenizer, device = _load(cfg.model)
    sampling = SamplingConfig(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature or 1.0,
        top_p=cfg.top_p,
        do_sample=cfg.temperature > 0,
    )
    eos = eos_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    history: list[dict] = []
    say(f"chatrlhf chat: {cfg.model}. {HELP}")
    while True:
        try:
            line = input_fn("user> ")
        except (EOFError, KeyboardInterrupt):
            say("")
            break
        command = line.strip().lower()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            break
        if command in ("/reset", "/help"):
            if command == "/reset":
                history.clear()
            say("[history cleared]" if command == "/reset" else HELP)
            continue
        ids, kept = fit_history(
            tokenizer, cfg.system, history + [{"role": "user", "content": line}], cfg.max_history_tokens
        )
        if len(kept) < len(history) + 1:
            say(f"[history over {cfg.max_history_tokens} tokens: oldest turns dropped]")
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)  # (1, P)
        try:
            rollout = generate(
                model,
                input_ids,
                torch.ones_like(input_ids),
                sampling,
                eos_token_ids=eos,
                pad_token_id=pad,
                backend=cfg.backend,
                generator=generator,
            )
        except KeyboardInterrupt:
            say("\n[interrupted; the message was not added to the history]")
            continue
        answer = decode_responses(tokenizer, rollout)[0]
        history = kept + [{"role": "assistant", "content": answer}]
        say(f"assistant> {answer}")
        if not bool(rollout.finished[0]):
            say(f"[answer cut at max_new_tokens={cfg.max_new_tokens}]")
