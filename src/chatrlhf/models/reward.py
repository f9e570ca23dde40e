"""Reward, rating and value models: a decoder trunk plus a linear head, DeepSpeed-Chat style.

Both models wrap a plain transformers ``AutoModelForSequenceClassification`` (trunk ``model.base_model``,
head ``model.score``), so a saved dir loads with ``AutoModelForSequenceClassification.from_pretrained``.
Our forward does NOT use transformers' pooling, which picks the last token whose id != pad_token_id:
with pad == eos that skips the real end-of-turn token. Instead:

* the head is applied at every position -> per-token values (B, T), which is what a PPO critic needs;
* the sequence score is read at the last position where ``attention_mask == 1``;
* position ids come from the mask, ``(cumsum(mask) - 1).clamp(min=0)``, so left and right padding give
  the same scores.

A saved dir also holds ``chatrlhf_reward.json`` saying which kind it is and how the score is read.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from chatrlhf.algorithms.masking import gather_last, position_ids_from_mask
from chatrlhf.data.packing import packed_inputs, plan_packing, unpack
from chatrlhf.models.loading import (
    check_model_dir,
    enable_checkpointing,
    resolve_dtype,
    resolve_model,
    uses_flash_attention,
)
from chatrlhf.models.lora import merged_for_save

logger = logging.getLogger(__name__)

META_FILE = "chatrlhf_reward.json"
SCORE_POSITION = "last index where attention_mask == 1"
POSITION_IDS = "(cumsum(attention_mask) - 1).clamp(min=0)"


class _TrunkWithHead(nn.Module):
    """Shared plumbing: a ``...ForSequenceClassification`` whose head we apply to every position."""

    kind = ""

    def __init__(self, model):
        super().__init__()
        if not isinstance(getattr(model, "score", None), nn.Linear):
            raise TypeError(
                f"{type(model).__name__} has no linear `score` head over the decoder's hidden states; "
                "decoder models (Llama, Qwen2, Mistral, GPT-2, ...) have one. For encoder models (BERT, "
                "MiniLM) use chatrlhf.models.encoder.EncoderRewardModel."
            )
        self.model = model

    @property
    def config(self):
        return self.model.config

    @property
    def trunk(self) -> nn.Module:
        return self.model.base_model

    @property
    def head(self) -> nn.Linear:
        return self.model.score

    packing = False
    """Run the trunk on the rows packed without padding (``chatrlhf.data.packing``; the stages set it from
    ``--engine.packing``); the hidden states come back in the padded layout, equal up to float rounding."""

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last-layer hidden states (B, T, H), positions taken from the mask (zeros at padding when packed)."""
        if self.packing:
            plan = plan_packing(attention_mask)
            packed = packed_inputs(plan, input_ids, pad_id=0, flash=uses_flash_attention(self.model))
            return unpack(plan, self.trunk(**packed, use_cache=False).last_hidden_state)
        out = self.trunk(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        return out.last_hidden_state

    def head_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The head at every position, (B, T, K), in fp32 so losses are not computed in bf16."""
        return self.head(self.hidden_states(input_ids, attention_mask)).float()

    def gradient_checkpointing_enable(self) -> None:
        enable_checkpointing(self.model)

    def save_pretrained(self, out_dir: str | os.PathLike, tokenizer=None, state_dict: dict | None = None) -> Path:
        """Writes a plain HF sequence-classification dir plus ``chatrlhf_reward.json``.

        ``state_dict``: this wrapper's full state (keys ``model.*``), e.g. consolidated from ZeRO-3 shards.
        LoRA adapters on the trunk (``chatrlhf.models.lora.apply_lora``) are merged into the saved weights.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _, state_dict = merged_for_save(self, state_dict)
        if state_dict is not None:
            state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
        self.model.save_pretrained(out, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        meta = {
            "kind": self.kind,
            "num_labels": self.config.num_labels,
            "score_position": SCORE_POSITION,
            "position_ids": POSITION_IDS,
            "head": "score (applied to base_model's last_hidden_state at every position)",
            **self._extra_meta(),
        }
        (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return out

    def _extra_meta(self) -> dict:
        return {}


def _head_from_causal_lm(path, num_labels, dtype, trust_remote_code, head_init_std):
    """A ``...ForSequenceClassification`` with the causal LM's trunk and a fresh, small head."""
    from transformers import AutoModelForSequenceClassification

    check_model_dir(path, trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model(path),
        num_labels=num_labels,
        dtype=resolve_dtype(dtype),
        trust_remote_code=trust_remote_code,
    )
    hidden = model.score.in_features
    # OpenRLHF initialises the head with std 1/(H+1) so initial scores are ~0 and the first pairwise
    # losses are ~log 2 (DeepSpeed-Chat keeps nn.Linear's default init). We follow OpenRLHF.
    std = 1.0 / (hidden + 1) if head_init_std is None else head_init_std
    with torch.no_grad():
        model.score.weight.normal_(mean=0.0, std=std)
        if model.score.bias is not None:
            model.score.bias.zero_()
    if model.config.pad_token_id is None:  # HF's own forward needs it for batches > 1
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    model.train()
    return model


def _load_seq_cls(path, kind, dtype, trust_remote_code):
    """Loads a saved dir, checking ``chatrlhf_reward.json`` (if present) names the expected kind."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    check_model_dir(path, trust_remote_code)
    local = resolve_model(path)
    meta_path = Path(local) / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta and meta.get("kind") != kind:
        loader = "load_rating_model" if meta.get("kind") == "rating" else "load_reward_model"
        raise ValueError(
            f"{meta_path} says kind={meta.get('kind')!r}, not {kind!r}; load it with {loader}()."
        )
    config = AutoConfig.from_pretrained(local, trust_remote_code=trust_remote_code)
    archs = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ValueError(
            f"{local} holds {archs or 'an unknown architecture'}, not a sequence-classification model. To "
            "start a reward/value model from a causal LM use RewardModel.from_causal_lm(path)."
        )
    if not meta:
        logger.info("%s has no %s; reading it as a plain HF %s model", local, META_FILE, kind)
    model = AutoModelForSequenceClassification.from_pretrained(
        local, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code
    )
    model.train()
    return model, meta


class RewardModel(_TrunkWithHead):
    """Scalar reward / value model: ``values`` per token (B, T), ``forward`` score (B,) at the last real token."""

    kind = "reward"

    def __init__(self, model):
        super().__init__(model)
        if model.config.num_labels != 1:
            raise ValueError(
                f"A reward model has one output, this one has num_labels={model.config.num_labels}."
            )

    @classmethod
    def from_causal_lm(
        cls,
        name_or_path: str | os.PathLike,
        dtype: str | torch.dtype = "float32",
        trust_remote_code: bool = False,
        head_init_std: float | None = None,
    ) -> RewardModel:
        """Trunk from a causal LM (dir, hub id or built-in name), new head ~ N(0, head_init_std or 1/(H+1))."""
        return cls(_head_from_causal_lm(name_or_path, 1, dtype, trust_remote_code, head_init_std))

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-token values (B, T), fp32; entries at pad positions are meaningless, mask them."""
        return self.head_outputs(input_ids, attention_mask).squeeze(-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, per_token: bool = False) -> torch.Tensor:
        """Sequence scores (B,) read at the last position where attention_mask == 1; with ``per_token`` the
        values at every position (B, T) instead (the critic's use; a forward, so DeepSpeed's hooks run)."""
        if per_token:
            return self.values(input_ids, attention_mask)
        hidden = self.hidden_states(input_ids, attention_mask)  # (B, T, H)
        return self.head(gather_last(hidden, attention_mask)).squeeze(-1).float()  # (B,)


class RatingModel(_TrunkWithHead):
    """Pointwise rating classifier: logits over K rating levels at the last real token.

    ``levels`` are the scores the K classes stand for (default 1..K, a 5-star scale at K=5).
    """

    kind = "rating"

    def __init__(self, model, levels: list[float] | None = None):
        super().__init__(model)
        k = model.config.num_labels
        levels = [float(i + 1) for i in range(k)] if levels is None else [float(v) for v in levels]
        if len(levels) != k:
            raise ValueError(f"{len(levels)} rating levels given for a head with num_labels={k}.")
        self.register_buffer("levels", torch.tensor(levels), persistent=False)

    @classmethod
    def from_causal_lm(
        cls,
        name_or_path: str | os.PathLike,
        num_levels: int = 5,
        levels: list[float] | None = None,
        dtype: str | torch.dtype = "float32",
        trust_remote_code: bool = False,
        head_init_std: float | None = None,
    ) -> RatingModel:
        """Trunk from a causal LM, a fresh K-way head (K = ``num_levels``, or ``len(levels)``)."""
        k = len(levels) if levels is not None else num_levels
        return cls(_head_from_causal_lm(name_or_path, k, dtype, trust_remote_code, head_init_std), levels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) at the last position where attention_mask == 1."""
        hidden = self.hidden_states(input_ids, attention_mask)  # (B, T, H)
        return self.head(gather_last(hidden, attention_mask)).float()  # (B, K)

    def expected_score(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., K) logits -> (...) expected level, sum_k softmax(logits)_k * levels_k."""
        return torch.softmax(logits.float(), dim=-1) @ self.levels.to(logits.device)

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Expected level at every position (B, T), so a rating model can serve as a critic."""
        return self.expected_score(self.head_outputs(input_ids, attention_mask))

    def label_of(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores (B,) -> class index (B,) of the nearest level (ties go to the lower level)."""
        return (scores.float().unsqueeze(-1) - self.levels.to(scores.device)).abs().argmin(-1)

    def _extra_meta(self) -> dict:
        return {"levels": self.levels.tolist()}


def load_reward_model(
    path: str | os.PathLike, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False
) -> RewardModel:
    """Loads a dir written by ``RewardModel.save_pretrained`` (or any HF seq-cls dir with num_labels=1)."""
    model, _ = _load_seq_cls(path, RewardModel.kind, dtype, trust_remote_code)
    return RewardModel(model)


def load_rating_model(
    path: str | os.PathLike, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False
) -> RatingModel:
    """Loads a dir written by ``RatingModel.save_pretrained`` (levels from its chatrlhf_reward.json)."""
    model, meta = _load_seq_cls(path, RatingModel.kind, dtype, trust_remote_code)
    return RatingModel(model, meta.get("levels"))
