"""Reward sources for RL stages: one call, ``source(batch) -> scores (B,)``, whatever judges the answers.

A spec string picks the source (``build_reward_source``):

- a reward-model dir written by ``chatrlhf rm`` (decoder trunk + scalar head). When it shares the policy's
  tokenizer it scores the rollout's token ids directly; otherwise the texts are re-encoded with its own
  tokenizer and chat template;
- ``encoder:DIR`` - an encoder reward model with its own tokenizer (``EncoderRewardModel``), scoring text pairs;
- ``rater`` - the simulated rater's overall score (the demo's gold judge; useful as a known-good reward);
- ``FILE.py:function`` - rewards as code: ``function(prompt: str, response: str, metadata: dict) -> float``.

Every source runs without gradients and leaves the models it holds in eval mode.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from chatrlhf.models.encoder import prompt_text


@dataclass
class RewardBatch:
    """What a reward source may look at: the token ids and the texts of each (prompt, answer)."""

    sequences: torch.Tensor
    """(B, P+R) prompt + answer ids in the policy's vocabulary (left-padded prompt, right-padded answer)."""
    attention_mask: torch.Tensor
    """(B, P+R) 1 on real tokens (the answer's EOS included)."""
    prompts: list[list[dict]]
    """Prompt messages (ending with the user turn)."""
    responses: list[str]
    """Answer texts (special tokens removed)."""
    finished: list[bool]
    """Whether each answer ended with EOS (False: cut at the token limit)."""
    meta: list[dict] = field(default_factory=list)
    """Per-prompt metadata from the data rows (e.g. ``harmful``)."""


class RewardSource(Protocol):
    name: str

    def __call__(self, batch: RewardBatch) -> torch.Tensor: ...


def _same_vocab(tok_a, tok_b) -> bool:
    return tok_a.get_vocab() == tok_b.get_vocab() and tok_a.chat_template == tok_b.chat_template


class RewardModelSource:
    """A decoder reward model's score at the answer's last real token."""

    def __init__(self, path: str, policy_tokenizer, dtype: str = "float32", trust_remote_code: bool = False):
        from chatrlhf.models import load_reward_model, load_tokenizer

        self.name = f"rm:{path}"
        self.path = path
        self.model = load_reward_model(path, dtype=dtype, trust_remote_code=trust_remote_code).eval()
        self.tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code, padding_side="right")
        self.shares_tokenizer = _same_vocab(self.tokenizer, policy_tokenizer)

    @torch.no_grad()
    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        if self.shares_tokenizer:
            return self.model(batch.sequences, batch.attention_mask).float().cpu()
        from chatrlhf.data.encode import answer_ids, encode_prompt

        seqs = [encode_prompt(self.tokenizer, p, 10**9) + answer_ids(self.tokenizer, r)
                for p, r in zip(batch.prompts, batch.responses)]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return self.model(ids, mask).float().cpu()


class EncoderSource:
    """An encoder reward model (own tokenizer) reading ``prompt [SEP] response`` text."""

    def __init__(self, path: str, trust_remote_code: bool = False):
        from chatrlhf.models import load_encoder_reward_model

        self.name = f"encoder:{path}"
        self.model = load_encoder_reward_model(path, trust_remote_code=trust_remote_code).eval()

    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        return self.model.score_texts(batch.prompts, batch.responses).float()


def _harmful(meta: dict) -> bool | None:
    value = meta.get("harmful") if meta else None
    return None if value is None else bool(value)


def prompt_texts(batch: RewardBatch) -> list[str]:
    """Each prompt as text: a single user turn as its content, a conversation as ``role: content`` lines."""
    return [prompt_text(p[-1]["content"] if len(p) == 1 else p) for p in batch.prompts]


def rater_inputs(batch: RewardBatch) -> tuple[list[str], list[bool] | None, list[bool]]:
    """(prompt texts, harmful flags or None, truncated flags) for ``SimulatedRater.score``."""
    texts = prompt_texts(batch)
    flags = [_harmful(m) for m in batch.meta] if batch.meta else []
    harmful = flags if flags and all(f is not None for f in flags) else None
    return texts, harmful, [not f for f in batch.finished]


class RaterSource:
    """The simulated rater's overall score in [0, 1] (``chatrlhf.rewards.rater``)."""

    name = "rater"

    def __init__(self, rater=None):
        from chatrlhf.rewards.rater import SimulatedRater

        self.rater = rater or SimulatedRater()

    def score(self, batch: RewardBatch):
        texts, harmful, truncated = rater_inputs(batch)
        return self.rater.score(texts, batch.responses, harmful, truncated)

    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        return torch.tensor([s.overall for s in self.score(batch)], dtype=torch.float32)


class FunctionSource:
    """Rewards as code: ``FILE.py:function`` with ``function(prompt, response, metadata) -> float``."""

    def __init__(self, spec: str):
        path, _, fn_name = spec.rpartition(":")
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"reward function file {file} does not exist (from reward spec {spec!r})")
        module_spec = importlib.util.spec_from_file_location(f"chatrlhf_reward_{file.stem}", file)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        fn = getattr(module, fn_name, None)
        if not callable(fn):
            raise ValueError(f"{file} has no function {fn_name!r}; define {fn_name}(prompt, response, metadata)")
        self.name, self.fn = f"fn:{spec}", fn

    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        texts = prompt_texts(batch)
        metas = batch.meta or [{} for _ in texts]
        out = []
        for i, (prompt, response, meta) in enumerate(zip(texts, batch.responses, metas)):
            value = self.fn(prompt, response, {**meta, "finished": batch.finished[i]})
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"reward function {self.name} returned {value!r} for sample {i}; "
                                 "it must return a finite float")
            out.append(float(value))
        return torch.tensor(out, dtype=torch.float32)


def build_reward_source(spec: str, policy_tokenizer, dtype: str = "float32",
                        trust_remote_code: bool = False) -> RewardSource:
    """The reward source a spec string names (see the module docstring)."""
    if not spec:
        raise ValueError("no reward given: set --reward to a reward-model dir, 'rater', 'encoder:DIR' "
                         "or 'FILE.py:function'")
    if spec == "rater":
        return RaterSource()
    if spec.startswith("encoder:"):
        return EncoderSource(spec.removeprefix("encoder:"), trust_remote_code)
    head, _, tail = spec.rpartition(":")
    if head.endswith(".py") and tail.isidentifier():
        return FunctionSource(spec)
    path = Path(spec)
    meta = path / "chatrlhf_reward.json"
    if meta.is_file() and json.loads(meta.read_text()).get("kind") == "encoder_reward":
        return EncoderSource(spec, trust_remote_code)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"reward model dir {path} not found (no config.json); pass the dir written by "
                                "`chatrlhf rm` (its model/ subdir), 'rater', 'encoder:DIR' or 'FILE.py:function'")
    return RewardModelSource(spec, policy_tokenizer, dtype, trust_remote_code)
