"""Sampling answers to evaluation prompts, and scoring sampled answers with other models.

Every model is sampled the same way: prompts through its chat template (long ones keep their last
tokens), grouped by length into batches, and one ``torch.Generator`` seeded with ``seed`` drives all the
randomness, so two models with the same tokenizer see the same batches and the same random stream.
Scores that need a second model (reference log-probs, reward-model scores) are computed on the kept
rollout tensors, so they read exactly the tokens that were sampled, never a re-tokenised text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from chatrlhf.algorithms.losses import gather_log_probs
from chatrlhf.algorithms.rl import kl_k1, sequence_kl
from chatrlhf.data.collate import PromptCollator
from chatrlhf.data.encode import encode_prompt, eos_id
from chatrlhf.evaluation.prompts import EvalPrompt
from chatrlhf.rollout.logprobs import answer_logits

if TYPE_CHECKING:
    from chatrlhf.rollout import Rollout, SamplingConfig
    from chatrlhf.rollout.inference import InferenceEngine


@dataclass
class Answer:
    """One sampled answer."""

    text: str
    """Decoded answer without the end-of-turn token or padding."""
    finished: bool
    """It ended with an end-of-turn token (False: cut at ``max_new_tokens``)."""
    num_tokens: int
    """Generated tokens, the final end-of-turn token included."""


class Answers(list):
    """The answers in prompt order (a plain list) plus ``.batches``: ``(prompt indices, Rollout)`` per
    generation batch, whose row ``j`` answers ``prompts[indices[j]]``."""

    batches: list[tuple[list[int], Rollout]]

    @property
    def rollouts(self) -> list[Rollout]:
        return [rollout for _, rollout in self.batches]

    def scatter(self, per_batch: Sequence[torch.Tensor]) -> list[float]:
        """Per-row values of each batch, (b,) tensors in ``.batches`` order -> a list in prompt order."""
        out: list[float] = [0.0] * len(self)
        for (indices, _), values in zip(self.batches, per_batch):
            for i, v in zip(indices, values.tolist()):
                out[i] = float(v)
        return out


def eos_token_ids(tokenizer, model=None, generation_config=None) -> list[int]:
    """The tokenizer's end-of-turn token, then any other eos of the generation config (``model``'s, or the
    one given: a vLLM-only caller has no Hugging Face model loaded)."""
    ids = [eos_id(tokenizer)]
    gen = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    for token in extra if isinstance(extra, (list, tuple)) else [extra]:
        if token is not None and int(token) not in ids:
            ids.append(int(token))
    return ids


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def sample_answers(
    model,
    tokenizer,
    prompts: list[EvalPrompt],
    sampling: SamplingConfig,
    *,
    batch_size: int,
    seed: int,
    max_prompt_len: int = 256,
    backend: str = "native",
    progress: bool = False,
    engine: InferenceEngine | None = None,
) -> Answers:
    """Samples one answer per prompt with ``chatrlhf.rollout.generate`` (or ``engine``, e.g. a vLLM one built
    once for the model, which ``backend`` then does not choose); returns :class:`Answers`.

    The model is switched to eval mode while sampling (no dropout) and back to its previous mode after.
    """
    from chatrlhf.rollout import decode_responses
    from chatrlhf.rollout.inference import InferenceEngine

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    engine = engine or InferenceEngine(backend, model=model)
    eos = eos_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    encoded = [
        encode_prompt(tokenizer, p.messages, max_prompt_len, long_prompt="truncate_left") for p in prompts
    ]
    # Batches of similar prompt lengths waste little compute on padding; the sort is stable, so models
    # sharing a tokenizer get identical batches.
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    device = engine.device if model is None else model_device(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    collate = PromptCollator(pad)
    answers = Answers([None] * len(prompts))
    answers.batches = []
    was_training = model is not None and model.training
    if model is not None:
        model.eval()
    try:
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="sample", disable=not progress, leave=False):
            indices = order[start : start + batch_size]
            batch = collate([{"input_ids": encoded[i]} for i in indices])
            rollout = engine.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device), sampling,
                                      eos_token_ids=eos, pad_token_id=pad, generator=generator)
            _store_answers(answers, indices, rollout, decode_responses(tokenizer, rollout))
    finally:
        if model is not None:
            model.train(was_training)
    return answers


def _store_answers(answers: Answers, indices: list[int], rollout, texts: list[str]) -> None:
    """The batch's answers into their prompts' slots of ``answers``; the rollout kept in ``answers.batches``."""
    lengths = rollout.response_lengths.tolist()
    finished = rollout.finished.tolist()
    for row, i in enumerate(indices):
        answers[i] = Answer(text=texts[row], finished=bool(finished[row]), num_tokens=int(lengths[row]))
    answers.batches.append((indices, rollout))


def _row_chunks(n: int, chunk: int | None) -> list[slice]:
    step = n if not chunk or chunk < 1 else chunk
    return [slice(s, s + step) for s in range(0, n, step)]


@torch.no_grad()
def response_log_probs(model, rollout: Rollout, chunk: int | None = None) -> torch.Tensor:
    """(B, R) log-probs of the sampled answer tokens under ``model`` at temperature 1, 0 on padding.

    One training-style forward over prompt + answer: position ids from the attention mask (left padding
    does not shift them), logits only for the R positions that predict answer tokens (position P-1+t
    predicts answer token t), masks from ``response_mask``. ``chunk`` rows per forward bound the memory
    of the (rows, R, V) logits.
    """
    seqs, mask = rollout.sequences, rollout.attention_mask  # (B, P+R)
    targets, resp_mask = rollout.response_ids, rollout.response_mask  # (B, R)
    r = targets.shape[1]
    device = model_device(model)
    out = []
    for rows in _row_chunks(seqs.shape[0], chunk):
        logits = answer_logits(model, seqs[rows].to(device), mask[rows].to(device), r)  # (b, R, V)
        logp = gather_log_probs(logits, targets[rows].to(device))  # (b, R)
        out.append(logp.masked_fill(~resp_mask[rows].to(device).bool(), 0.0))
    return torch.cat(out) if out else torch.zeros_like(targets, dtype=torch.float32)


def answer_kl(
    log_probs: torch.Tensor, ref_log_probs: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """(B,) summed per-token k1 KL of each answer, sum_t mask_t (log pi(y_t) - log pi_ref(y_t)).

    Averaged over answers sampled from pi at temperature 1 this is an unbiased estimate of
    KL(pi || pi_ref) over whole answers, the estimator of PPO's KL penalty (one answer's can be negative).
    """
    return sequence_kl(kl_k1(log_probs, ref_log_probs), response_mask.to(log_probs.device))


def kl_to_reference(
    policy, reference, rollouts: Rollout | Sequence[Rollout], chunk: int | None = None
) -> float:
    """Mean over answers of sum_t [log pi(y_t) - log pi_ref(y_t)] on the policy's own samples.

    Both log-probs at temperature 1 from the same forward recipe, so a model compared with itself gives
    exactly 0. It estimates KL(pi || pi_ref) only when the answers were sampled from pi itself
    (temperature 1, no top-k/top-p); otherwise it is the mean log-ratio on those answers.
    """
    rollouts = [rollouts] if not isinstance(rollouts, (list, tuple)) else rollouts
    kls = [
        answer_kl(
            response_log_probs(policy, r, chunk), response_log_probs(reference, r, chunk), r.response_mask
        )
        for r in rollouts
    ]
    total = torch.cat(kls) if kls else torch.zeros(0)
    return float(total.mean()) if total.numel() else 0.0


@torch.no_grad()
def reward_scores(reward_model, rollout: Rollout, chunk: int | None = None) -> torch.Tensor:
    """(B,) reward-model scores of prompt + answer, read at each row's last real token.

    The rollout's sequences are left-padded prompts followed by right-padded answers; the reward model
    takes positions from the mask and reads the last position where the mask is 1, so both paddings are
    harmless. A cut answer (no EOS) is scored at its last generated token, as in PPO.
    """
    device = model_device(reward_model)
    seqs, mask = rollout.sequences, rollout.attention_mask
    scores = [
        reward_model(seqs[rows].to(device), mask[rows].to(device)).float()
        for rows in _row_chunks(seqs.shape[0], chunk)
    ]
    return torch.cat(scores) if scores else torch.zeros(0)
