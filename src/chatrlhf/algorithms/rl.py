"""PPO math for RLHF: KL estimators, reward shaping, GAE, whitening, the clipped losses, KL controllers.

Pure functions of tensors (no models, no config objects, no logging, no collectives).
Conventions: B = batch, T = answer positions, V = vocabulary. ``mask`` (B, T) is 1 on answer tokens
(including the final EOS; pad == eos in SmolLM2, so it comes from the rollout, never from token ids) and
0 on prompt or padding positions anywhere in the row. Inputs at mask == 0 are replaced by 0 before any
arithmetic (``torch.where``, not a multiply), so garbage there, even inf or NaN, changes no answer-position
output bit and sends no NaN into a gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from chatrlhf.algorithms.masking import last_token_index

Tensor = torch.Tensor


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """x with every mask == 0 entry replaced by 0 (the values there are never read)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _normalizer(mask: Tensor, normalizer: float | Tensor | None) -> float | Tensor:
    if normalizer is None:
        return mask.sum().clamp(min=1)
    if not isinstance(normalizer, Tensor) and normalizer <= 0:
        raise ValueError(f"normalizer must be > 0 (the mini-batch's answer-token count), got {normalizer}")
    return normalizer


# --- KL estimators (Schulman, "Approximating KL divergence", 2020). Samples come from p (the policy). ---


def kl_k1(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """k1 = log p - log q, unbiased for KL(p || q) but can be negative per token.

    Example: log p = [-1, -2], log q = [-2, -1] -> [1, -1].
    """
    return log_probs - ref_log_probs


def kl_k2(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """k2 = 0.5 (log p - log q)^2, biased, low variance, >= 0. Example as k1 -> [0.5, 0.5]."""
    return 0.5 * (log_probs - ref_log_probs) ** 2


def kl_k3(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """k3 = exp(d) - d - 1 with d = log q - log p: unbiased and >= 0 (since e^d >= 1 + d).

    Example as k1: d = [-1, 1] -> [e^-1, e - 2] = [0.36787944117144233, 0.7182818284590451].
    ``expm1(d) - d`` keeps precision for the tiny d of a policy close to its reference.
    """
    d = ref_log_probs - log_probs
    return torch.expm1(d) - d


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def sequence_kl(kl: Tensor, mask: Tensor) -> Tensor:
    """(B, T) per-token KL -> (B,) sum over answer tokens.

    Example: kl [[0.1, 0.2, 0.3], [1, 2, 3]], mask [[1, 1, 0], [0, 1, 1]] -> [0.3, 5.0].
    """
    return _masked(kl, mask).sum(-1)


# --- Rewards and advantages ---


def shaped_rewards(
    scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float, clip: float | None = None
) -> Tensor:
    """Per-token PPO reward: KL penalty on every answer token, the sequence score on the last one.

    r_t = -kl_coef * kl_t + [t == last answer token] * clip(score, -clip, clip)
    (Ziegler et al. 2019 eq. 2 spread per token, as in InstructGPT and DeepSpeed-Chat).
    scores (B,), kl (B, T), mask (B, T) -> (B, T), zero where mask == 0. The last answer token is the last
    position with mask == 1 (the EOS itself when the answer finished), not the padding after it; a row with
    an empty mask gets all zeros.

    Example: kl_coef 0.5, clip 3, scores [2, -5, 7],
      kl   [[0.1, 0.2, 0.3, 0.4], [0.4, -0.2, 0.2, 0.6], [1, 1, 1, 1]]
      mask [[1, 1, 1, 0],         [0, 1, 1, 1],          [0, 0, 0, 0]]
      -> [[-0.05, -0.1, -0.15 + 2, 0], [0, 0.1, -0.1, -0.3 - 3], [0, 0, 0, 0]]
    """
    keep = mask.bool()  # (B, T)
    rewards = -kl_coef * _masked(kl, keep)  # (B, T)
    score = scores if clip is None else scores.clamp(-clip, clip)  # (B,)
    positions = torch.arange(keep.shape[-1], device=keep.device)  # (T,)
    at_last = (positions == last_token_index(keep).unsqueeze(-1)) & keep.any(-1, keepdim=True)  # (B, T)
    return rewards + torch.where(at_last, score.unsqueeze(-1).to(rewards.dtype), torch.zeros_like(rewards))


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016, eq. 16), one episode per row.

    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
    A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}
    returns = A + V (the value-function targets). rewards, values, mask (B, T) -> (advantages, returns),
    each (B, T) and zero where mask == 0. The value after the last answer token is 0: the episode ends
    there (EOS or the token limit; the reward model has already scored the cut answer). Answer tokens are
    contiguous in a row; a mask == 0 gap would end the episode the same way.

    Example (gamma 0.9, lam 0.8, so gamma * lam = 0.72): r = [1, 0, 2, 9], V = [0.5, 1, 1.5, 7],
    mask = [1, 1, 1, 0] (the 9 and 7 sit on padding and are never read):
      delta_2 = 2 + 0 - 1.5 = 0.5                A_2 = 0.5
      delta_1 = 0 + 0.9 * 1.5 - 1 = 0.35         A_1 = 0.35 + 0.72 * 0.5 = 0.71
      delta_0 = 1 + 0.9 * 1 - 0.5 = 1.4          A_0 = 1.4 + 0.72 * 0.71 = 1.9112
      advantages = [1.9112, 0.71, 0.5, 0], returns = [2.4112, 1.71, 2.0, 0]
    """
    keep = mask.bool()
    m = keep.to(values.dtype)  # (B, T)
    r = _masked(rewards, keep).to(values.dtype)  # (B, T)
    v = _masked(values, keep)  # (B, T)
    next_value = torch.zeros_like(v[:, 0])  # (B,) V_{t+1}; 0 past the end of the row
    next_adv = torch.zeros_like(v[:, 0])  # (B,) A_{t+1}
    next_mask = torch.zeros_like(v[:, 0])  # (B,) m_{t+1}
    columns = []
    # A reverse loop over T, vectorised over B: T is at most a few hundred answer tokens.
    for t in reversed(range(v.shape[1])):
        delta = r[:, t] + gamma * next_value * next_mask - v[:, t]
        next_adv = delta + gamma * lam * next_mask * next_adv
        columns.append(next_adv)
        next_value, next_mask = v[:, t], m[:, t]
    advantages = torch.stack(columns[::-1], dim=1) * m  # (B, T)
    return advantages, (advantages + v) * m


def whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    *,
    mean: float | Tensor | None = None,
    var: float | Tensor | None = None,
) -> Tensor:
    """(x - mean) / sqrt(var + eps) over all masked entries of the batch (population variance).

    Zero where mask == 0; shift_mean=False adds the mean back (scale only). An empty mask gives zeros.
    ``mean`` / ``var`` given: use them instead of this batch's (e.g. statistics summed over all processes,
    so that data parallel whitens exactly like one process holding the whole batch).
    Example: x = [1, 2, 3, 100], mask = [1, 1, 1, 0]: mean 2, var 2/3, std 0.816496580927726
      -> [-1.224744871391589, 0, 1.224744871391589, 0]; shift_mean=False -> [0.7752551, 2, 3.2247449, 0].
    """
    keep = mask.bool()
    m = keep.to(x.dtype)
    x = _masked(x, keep)
    n = m.sum().clamp(min=1)
    if mean is None:
        mean = x.sum() / n
    if var is None:
        var = (((x - mean) * m) ** 2).sum() / n
    var = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


# --- PPO losses (token level). Sums over the mask divided by a normalizer the caller may fix to the
# token count of the whole mini-batch, so that micro-batch x accumulation (and ranks) == full batch. ---


def policy_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), negated to a loss, per token.

    loss = sum_mask max(-A r, -A clip(r, 1 - eps, 1 + eps)) / normalizer, r = exp(log p - log p_old).
    All inputs (B, T); normalizer defaults to mask.sum() (at least 1). Stats (detached, sums / normalizer):
    clipfrac (tokens where the clipped branch is strictly larger), approx_kl (k3 of old vs new:
    (r - 1) - log r), ratio (mean r).

    Example, eps 0.2, four answer tokens (r, A) -> max(-A r, -A clip(r)):
      (1.5,  1) -> max(-1.5, -1.2) = -1.2 clipped      (0.5, -1) -> max(0.5, 0.8) = 0.8 clipped
      (0.5,  2) -> max(-1.0, -1.6) = -1.0               (1.1, -2) -> max(2.2, 2.2) = 2.2 (tie: not clipped)
      loss = (-1.2 + 0.8 - 1.0 + 2.2) / 4 = 0.2, clipfrac 2/4 = 0.5, ratio 3.6/4 = 0.9,
      approx_kl = [(0.5 - ln 1.5) + 2 (ln 2 - 0.5) + (0.1 - ln 1.1)] / 4 = 0.12137976830185...
    """
    keep = mask.bool()
    m = keep.to(log_probs.dtype)
    n = _normalizer(m, normalizer)
    log_ratio = _masked(log_probs, keep) - _masked(old_log_probs, keep)  # (B, T), 0 off the mask
    ratio = torch.exp(log_ratio)  # (B, T)
    adv = _masked(advantages, keep).to(ratio.dtype)  # (B, T)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = (torch.maximum(unclipped, clipped) * m).sum() / n
    with torch.no_grad():
        stats = {
            "clipfrac": ((clipped > unclipped).to(m.dtype) * m).sum() / n,
            "approx_kl": (((ratio - 1.0) - log_ratio) * m).sum() / n,
            "ratio": (ratio * m).sum() / n,
        }
    return loss, stats


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
    n = _normalizer(m, normalizer)
    v = _masked(values, keep)
    target = _masked(returns, keep).to(v.dtype)
    unclipped = (v - target) ** 2  # (B, T)
    if clip_eps is None:
        per_token, clipfrac = unclipped, torch.zeros((), dtype=v.dtype, device=v.device)
    else:
        old = _masked(old_values, keep).to(v.dtype)
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


# --- KL coefficient controllers ---


class FixedKLController:
    """A constant KL coefficient; ``update`` is a no-op so the PPO loop treats both controllers alike."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        return None

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-tuning LMs from human preferences", sec. 2.2).

    e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n_steps / horizon), where KL is the
    measured per-sequence KL and n_steps the number of samples (episodes) since the last update.
    Example: beta 0.2, target 6, horizon 10000; update(9, 500): e = clip(0.5) = 0.2 -> 0.2 * 1.01 = 0.202;
    update(5.7, 1000): e = -0.05 -> * 0.995 = 0.20099; update(3, 2000): e = -0.2 -> * 0.96 = 0.1929504.
    The state is beta alone: target and horizon come from the config, so a resume can change them.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0:
            raise ValueError(f"target (the KL target) must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class RunningMoments:
    """Running mean and standard deviation of scalar rewards, for optional reward normalisation.

    ``update(batch)`` merges the batch with Chan et al.'s parallel algorithm (1979) in float64, so merging
    pieces gives the statistics of their concatenation. ``std`` is the sample (Bessel-corrected) standard
    deviation, like ``torch.std``; 0 until two values are seen. Use: ``update(scores)`` first, then
    ``normalize(scores)``, so the first batch is normalised by its own statistics.
    Example: update([1, 2]); update([3, 4]) -> count 4, mean 2.5, std sqrt(5/3) = 1.2909944487358056,
    normalize(4) = 1.5 / 1.2909944487358056 = 1.161895003862225.
    """

    def __init__(self, eps: float = 1e-8):
        self.eps = eps
        self._count = 0.0
        self._mean = 0.0
        self._m2 = 0.0  # sum of squared deviations from the mean

    def update(self, x: Tensor) -> None:
        x = x.detach().reshape(-1).to(torch.float64)
        n_b = float(x.numel())
        if n_b == 0:
            return
        mean_b = x.mean().item()
        m2_b = ((x - mean_b) ** 2).sum().item()
        total = self._count + n_b
        delta = mean_b - self._mean
        self._mean += delta * n_b / total
        self._m2 += m2_b + delta * delta * self._count * n_b / total
        self._count = total

    @property
    def count(self) -> float:
        return self._count

    @property
    def mean(self) -> float:
        return self._mean

    @property
    def std(self) -> float:
        return math.sqrt(self._m2 / (self._count - 1)) if self._count > 1 else 0.0

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self._mean) / max(self.std, self.eps)

    def state_dict(self) -> dict[str, float]:
        return {"count": self._count, "mean": self._mean, "m2": self._m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self._count = float(state["count"])
        self._mean = float(state["mean"])
        self._m2 = float(state["m2"])
