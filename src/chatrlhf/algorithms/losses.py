"""Losses and the small tensor helpers they share: SFT, reward model, and PPO's policy and value losses.

Conventions: B = batch, T = sequence length, V = vocabulary, K = rating levels. Masks are float or bool
tensors taken from ``attention_mask`` or labels, never from matching pad ids (pad == eos in SmolLM2).
Every loss returns *per-example or per-token values*; callers sum them and divide by the number of
tokens/examples in the whole optimizer step, so that micro-batch x accumulation == full batch exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chatrlhf.algorithms.masking import zero_off_mask

Tensor = torch.Tensor

IGNORE_INDEX = -100


def gather_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[..., token] for each position.

    logits (B, T, V) and tokens (B, T) are already aligned (logits[:, t] scores tokens[:, t]).
    Returns (B, T). Uses ``log_softmax`` once, in float32, for numerical stability.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)


def answer_mask(attention_mask: torch.Tensor, prompt_lens: torch.Tensor) -> torch.Tensor:
    """(B, T) bool mask of the answer tokens of right-padded ``prompt + answer`` rows: positions at or after
    the row's prompt length that hold a real token (``attention_mask`` 1), so the answer's EOS is in it and
    padding is not, even where the pad id equals the EOS id.

    Example: attention_mask [[1, 1, 1, 1, 0]], prompt_lens [2] -> [[False, False, True, True, False]].
    """
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)  # (T,)
    return (positions >= prompt_lens.to(attention_mask.device)[:, None]) & (attention_mask != 0)  # (B, T)


def sequence_log_probs(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of the masked tokens of each row: sum_t mask[t] log p(tokens[t] | tokens[<t]).

    logits (B, T, V) from a causal LM over tokens (B, T), so logits[:, t] predicts tokens[:, t+1]; mask (B, T)
    marks the tokens that count (e.g. :func:`answer_mask`). ``mask[:, 0]`` is ignored: nothing predicts the
    first token. Returns (B,) in float32. Masked-out positions are dropped with ``where``, not multiplied by
    0, so a -inf log-prob at a padded position cannot turn the sum into NaN.

    Example (V = 3): tokens [2, 0, 2, 1], mask [0, 0, 1, 1]; logits[1] = log [1, 1, 2] gives p(2) = 2/4 and
    logits[2] = log [1, 3, 4] gives p(1) = 3/8, so the sum is log(1/2) + log(3/8) = log(3/16) = -1.6739764.
    """
    logp = gather_log_probs(logits[:, :-1], tokens[:, 1:])  # (B, T-1): log p of tokens 1..T-1
    return torch.where(mask[:, 1:].bool(), logp, 0.0).sum(-1)  # (B,)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token negative log-likelihood of the labelled tokens.

    logits (B, T, V) from a causal LM over ``input_ids``; labels (B, T) = input ids with
    ``IGNORE_INDEX`` wherever no loss is taken (prompt, user turns, padding). Position t predicts
    labels[:, t+1]. Returns (nll (B, T-1) with zeros at ignored positions, mask (B, T-1) float).
    The SFT loss of a step is ``nll.sum() / (labelled tokens in the whole step)``.
    """
    shift_logits = logits[:, :-1].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(shift_labels)
    return nll, (shift_labels != IGNORE_INDEX).float()


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry pairwise reward-model loss, per pair: -log sigmoid(r_chosen - r_rejected).

    chosen, rejected: (B,) sequence scores read at each answer's last real token (padding never enters).
    Returns (B,). Computed with ``logsigmoid`` so large margins do not underflow to log(0).
    """
    return -F.logsigmoid(chosen.float() - rejected.float())


def rating_loss(logits: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Pointwise ratings classifier loss, per example: cross-entropy of the rating level.

    logits (B, K) read at the last real token; levels (B,) integer classes in [0, K) (rating 1..K minus 1).
    Returns (B,).
    """
    return F.cross_entropy(logits.float(), levels.long(), reduction="none")


# --- PPO losses (token level). Sums over the mask divided by a normalizer the caller may fix to the
# token count of the whole mini-batch, so that micro-batch x accumulation (and ranks) == full batch. ---


def loss_normalizer(mask: Tensor, normalizer: float | Tensor | None, name: str = "normalizer") -> float | Tensor:
    """The divisor of a summed token loss: ``normalizer`` as given (> 0; a ValueError naming ``name`` otherwise),
    or, when None, the mask's own token count (>= 1): a plain masked mean."""
    if normalizer is None:
        return mask.sum().clamp(min=1)
    if not isinstance(normalizer, Tensor) and normalizer <= 0:
        raise ValueError(f"{name} must be > 0 (the mini-batch's answer-token count), got {normalizer}")
    return normalizer


def sequence_log_ratio(log_ratio: Tensor, log_probs: Tensor, mask: Tensor) -> Tensor:
    """GSPO (Zheng et al. 2025), its per-token form: every answer token takes the answer's log-ratio, the mean
    of its tokens' (the ratio is their geometric mean), with each token's own gradient:
    log r_t = sg[mean_t log_ratio] + log p_t - sg[log p_t]. All (B, T), zero off the mask."""
    seq = log_ratio.detach().sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)  # (B, 1)
    return (log_probs - log_probs.detach() + seq) * mask


def policy_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    normalizer: float | Tensor | None = None,
    weights: Tensor | None = None,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    sequence_ratio: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), negated to a loss, per token.

    loss = sum_mask w max(-A r, -A clip(r, 1 - eps, 1 + eps_high)) / normalizer, r = exp(log p - log p_old).
    All inputs (B, T); normalizer defaults to mask.sum() (at least 1); ``weights`` (B, T), constant per
    token (e.g. :func:`tis_weights`), default 1. ``clip_eps_high``: the upper clip range when it differs from
    the lower (DAPO's clip-higher, Yu et al. 2025: 0.28 with eps 0.2); None: eps. ``dual_clip`` C > 1 (Ye et
    al. 2020; verl's default 3): where A < 0 the per-token loss is also capped at -A C. ``sequence_ratio``:
    GSPO's per-answer ratio (:func:`sequence_log_ratio`). Stats (detached, sums / normalizer):
    clipfrac (tokens where the clipped branch is strictly larger), clipfrac_dual (tokens the dual clip capped),
    approx_kl (k3 of old vs new: (r - 1) - log r), approx_kl_k1 (log p_old - log p, the peers'), ratio (mean r).

    Example, eps 0.2, four answer tokens (r, A) -> max(-A r, -A clip(r)):
      (1.5,  1) -> max(-1.5, -1.2) = -1.2 clipped      (0.5, -1) -> max(0.5, 0.8) = 0.8 clipped
      (0.5,  2) -> max(-1.0, -1.6) = -1.0               (1.1, -2) -> max(2.2, 2.2) = 2.2 (tie: not clipped)
      loss = (-1.2 + 0.8 - 1.0 + 2.2) / 4 = 0.2, clipfrac 2/4 = 0.5, ratio 3.6/4 = 0.9,
      approx_kl = [(0.5 - ln 1.5) + 2 (ln 2 - 0.5) + (0.1 - ln 1.1)] / 4 = 0.12137976830185...
    With eps_high 0.6 the first token is not clipped (r 1.5 < 1.6): loss (-1.5 + 0.8 - 1.0 + 2.2) / 4 = 0.125.
    With dual_clip 1.5 a token (r 4, A -1) gives min(max(4, 1.2), 1.5) = 1.5 instead of 4.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    keep = mask.bool()
    m = keep.to(log_probs.dtype)
    n = loss_normalizer(m, normalizer)
    log_ratio = zero_off_mask(log_probs, keep) - zero_off_mask(old_log_probs, keep)  # (B, T), 0 off the mask
    if sequence_ratio:
        log_ratio = sequence_log_ratio(log_ratio, zero_off_mask(log_probs, keep), m)
    ratio = torch.exp(log_ratio)  # (B, T)
    adv = zero_off_mask(advantages, keep).to(ratio.dtype)  # (B, T)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    dual = torch.zeros_like(per_token, dtype=torch.bool)
    if dual_clip is not None:
        cap = -adv * dual_clip
        dual = (adv < 0) & (per_token > cap)
        per_token = torch.where(dual, cap, per_token)
    if weights is not None:
        per_token = per_token * zero_off_mask(weights.detach(), keep).to(per_token.dtype)
    loss = (per_token * m).sum() / n
    with torch.no_grad():
        stats = {
            "clipfrac": ((clipped > unclipped).to(m.dtype) * m).sum() / n,
            "clipfrac_dual": (dual.to(m.dtype) * m).sum() / n,
            "approx_kl": (((ratio - 1.0) - log_ratio) * m).sum() / n,
            "approx_kl_k1": (-log_ratio * m).sum() / n,
            "ratio": (ratio * m).sum() / n,
        }
    return loss, stats


LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
"""How per-token losses become one number (verl's ``loss_agg_mode``): the mean over all answer tokens; the
mean over answers of each answer's token mean (TRL's ``grpo`` loss type); of each answer's token sum; of each
answer's token sum divided by a constant length (Dr. GRPO)."""


def aggregation_weights(mask: Tensor, mode: str, tokens: float, answers: float, max_len: int) -> Tensor:
    """Per-token weights (B, T) that turn ``sum(loss * mask * w) / tokens`` (the token mean over the whole
    mini-batch, as ``policy_loss`` computes it) into ``mode``'s aggregate. ``tokens`` and ``answers`` are the
    mini-batch's answer tokens and answers over all processes, so micro-batches and processes add up to the
    whole mini-batch's loss; ``max_len``: the constant length of ``seq-mean-token-sum-norm``.

    Example, tokens 4, answers 2, answer lengths [1, 3]: token-mean [1 | 1 1 1]; seq-mean-token-mean
    4 / (2 L_i) = [2 | 2/3 2/3 2/3]; seq-mean-token-sum 4 / 2 = 2 everywhere; seq-mean-token-sum-norm with
    max_len 8: 4 / (2 * 8) = 0.25 everywhere.
    """
    m = mask.to(torch.float64)
    if mode == "token-mean":
        w = torch.ones_like(m)
    elif mode == "seq-mean-token-mean":
        w = (tokens / answers / m.sum(-1, keepdim=True).clamp(min=1.0)).expand_as(m)
    elif mode == "seq-mean-token-sum":
        w = torch.full_like(m, tokens / answers)
    elif mode == "seq-mean-token-sum-norm":
        w = torch.full_like(m, tokens / (answers * max_len))
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}; one of {', '.join(LOSS_AGGREGATIONS)}")
    return (w * m).to(mask.dtype if mask.is_floating_point() else torch.float32)


def tis_weights(old_log_probs: Tensor, rollout_log_probs: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling (Yao et al. 2025; verl, OpenRLHF and TRL do the same): per-token weight
    min(p_train / p_rollout, cap), detached, where p_train is the trainer's probability of the sampled token
    at rollout time (the old log-probs) and p_rollout the generating engine's (bf16 copy, vLLM). It corrects
    the policy gradient for sampling from a slightly different distribution than the one trained.

    Example, cap 2: log p_train - log p_rollout = [ln 1.5, ln 0.5, ln 3] -> [1.5, 0.5, 2.0].
    """
    return torch.exp(old_log_probs.detach().float() - rollout_log_probs.float()).clamp(max=cap)


def mismatch_stats(old_log_probs: Tensor, rollout_log_probs: Tensor, mask: Tensor, cap: float | None) -> dict:
    """How far the generating engine's distribution is from the trainer's, on the sampled tokens (sums are
    over mask tokens, divided by their count):

    ``mismatch_kl``: mean of log p_rollout - log p_train, the k1 estimate of KL(rollout || train) from the
    rollout's own samples; ``max_ratio`` / ``min_ratio``: extremes of p_train / p_rollout; ``tis_clipfrac``:
    the share of tokens whose ratio exceeds ``cap``.
    Example: log-ratios train - rollout [0.1, -0.3] -> mismatch_kl = (-0.1 + 0.3) / 2 = 0.1.
    """
    keep = mask.bool()
    log_ratio = (old_log_probs.float() - rollout_log_probs.float())[keep]  # (N,)
    n = log_ratio.numel()
    if n == 0:
        return {"mismatch_kl": 0.0, "max_ratio": 1.0, "min_ratio": 1.0, "tis_clipfrac": 0.0}
    ratio = log_ratio.exp()
    return {"mismatch_kl": float(-log_ratio.sum() / n), "max_ratio": float(ratio.max()),
            "min_ratio": float(ratio.min()),
            "tis_clipfrac": float((ratio > cap).sum() / n) if cap else 0.0}


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float | None,
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (PPO2 / OpenAI baselines): 0.5 sum_mask max((V - R)^2, (V_clip - R)^2) / normalizer.

    V_clip = V_old + clamp(V - V_old, -eps, eps); clip_eps None -> plain 0.5 (V - R)^2. All inputs (B, T).
    Stats: vf_clipfrac (tokens where the clipped term is strictly larger), detached, / normalizer.

    Example, eps 0.2, four answer tokens (V, V_old, R) -> V_clip, (V - R)^2, (V_clip - R)^2:
      (1.0, 0.5, 1.0) -> 0.7, 0, 0.09 clipped        (0.0, 0.1, -1.0) -> 0.0, 1, 1
      (2.0, 1.0, 3.0) -> 1.2, 1, 3.24 clipped        (0.5, 1.0,  2.0) -> 0.8, 2.25, 1.44
      loss = 0.5 (0.09 + 1 + 3.24 + 2.25) / 4 = 0.8225, vf_clipfrac 0.5; unclipped 0.5 * 4.25 / 4 = 0.53125.
    """
    keep = mask.bool()
    m = keep.to(values.dtype)
    n = loss_normalizer(m, normalizer)
    v = zero_off_mask(values, keep)
    target = zero_off_mask(returns, keep).to(v.dtype)
    unclipped = (v - target) ** 2  # (B, T)
    if clip_eps is None:
        per_token, clipfrac = unclipped, torch.zeros((), dtype=v.dtype, device=v.device)
    else:
        old = zero_off_mask(old_values, keep).to(v.dtype)
        clipped = (old + (v - old).clamp(-clip_eps, clip_eps) - target) ** 2  # (B, T)
        per_token = torch.maximum(unclipped, clipped)
        with torch.no_grad():
            clipfrac = ((clipped > unclipped).to(m.dtype) * m).sum() / n
    loss = 0.5 * (per_token * m).sum() / n
    return loss, {"vf_clipfrac": clipfrac}


def entropy_from_logits(logits: Tensor) -> Tensor:
    """(B, T, V) logits -> (B, T) entropy of softmax(logits): -sum_v p_v log p_v.

    From log_softmax (no exp overflow); computed in at least float32. Logits of -inf (filtered tokens) add
    0, not NaN: their log-prob is clamped to the most negative finite value before multiplying by p = 0.
    Examples: uniform over V -> log V; logits log([2, 1, 1]) -> p [.5, .25, .25] -> 1.5 ln 2 = 1.03972077.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logp = torch.log_softmax(logits, dim=-1)  # (B, T, V)
    logp = logp.clamp(min=torch.finfo(logp.dtype).min)
    return -(logp.exp() * logp).sum(-1)  # (B, T)
