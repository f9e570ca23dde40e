"""PPO math for RLHF: KL estimators, reward shaping, GAE, whitening, the critic's explained variance, KL
controllers and reward moments. The clipped policy and value losses live in ``losses``.

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

from chatrlhf.algorithms.masking import last_token_index, zero_off_mask
from chatrlhf.checkpoint_schema import Schema, apply, number

Tensor = torch.Tensor


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


def kl_k3_plus(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """k3's value with k2's gradient (straight-through; verl's ``k3+``): k2 + (k3 - k2).detach(). k2's
    gradient is the unbiased gradient of KL(p || q) on p's own samples, which k3's is not.

    Example as k1: value [e^-1, e - 2]; d value / d log p = log p - log q = [1, -1].
    """
    k2 = kl_k2(log_probs, ref_log_probs)
    return k2 + (kl_k3(log_probs, ref_log_probs) - k2).detach()


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3,
                                                                "k3+": kl_k3_plus}


def kl_estimate(name: str, log_probs: Tensor, ref_log_probs: Tensor, clamp: float | None = None) -> Tensor:
    """Per-token KL estimate ``KL_ESTIMATORS[name]``, clamped to [-clamp, clamp] when given (verl clamps its
    k3 to +-10, so one token far off the reference cannot dominate the reward or the loss).

    Example: k1, log p = [-1, -30], log q = [-2, -1], clamp 10 -> [1, -10]."""
    kl = KL_ESTIMATORS[name](log_probs, ref_log_probs)
    return kl if clamp is None else kl.clamp(-clamp, clamp)


def sequence_kl(kl: Tensor, mask: Tensor) -> Tensor:
    """(B, T) per-token KL -> (B,) sum over answer tokens.

    Example: kl [[0.1, 0.2, 0.3], [1, 2, 3]], mask [[1, 1, 0], [0, 1, 1]] -> [0.3, 5.0].
    """
    return zero_off_mask(kl, mask).sum(-1)


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
    rewards = -kl_coef * zero_off_mask(kl, keep)  # (B, T)
    score = scores if clip is None else scores.clamp(-clip, clip)  # (B,)
    positions = torch.arange(keep.shape[-1], device=keep.device)  # (T,)
    at_last = (positions == last_token_index(keep).unsqueeze(-1)) & keep.any(-1, keepdim=True)  # (B, T)
    return rewards + torch.where(at_last, score.unsqueeze(-1).to(rewards.dtype), torch.zeros_like(rewards))


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, factor: float) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the score: 0 up to
    ``max_len - buffer`` tokens, then falling linearly to ``-factor`` at ``max_len``; lengths (B,) -> (B,).

    Example: max_len 10, buffer 4, factor 1, lengths [3, 6, 8, 10] -> [0, 0, -0.5, -1].
    """
    exceed = (lengths.double() - (max_len - buffer)).clamp(min=0.0)
    return (-factor * exceed / max(buffer, 1)).clamp(min=-factor).to(torch.float32)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016, eq. 16), one episode per row.

    The time steps are the mask == 1 positions, in order; with t' the next one after t:
    delta_t = r_t + gamma * V_t' - V_t
    A_t     = delta_t + gamma * lam * A_t'
    returns = A + V (the value-function targets). rewards, values, mask (B, T) -> (advantages, returns),
    each (B, T) and zero where mask == 0. After the last answer token V and A are 0: the episode ends there
    (EOS or the token limit; the reward model has already scored the cut answer). A mask == 0 gap between
    answer tokens (a multi-turn episode's environment turn) is skipped: the policy's last token before it
    bootstraps from its first token after it, as verl does for multi-turn rollouts.

    Example (gamma 0.9, lam 0.8, so gamma * lam = 0.72): r = [1, 0, 2, 9], V = [0.5, 1, 1.5, 7],
    mask = [1, 1, 1, 0] (the 9 and 7 sit on padding and are never read):
      delta_2 = 2 + 0 - 1.5 = 0.5                A_2 = 0.5
      delta_1 = 0 + 0.9 * 1.5 - 1 = 0.35         A_1 = 0.35 + 0.72 * 0.5 = 0.71
      delta_0 = 1 + 0.9 * 1 - 0.5 = 1.4          A_0 = 1.4 + 0.72 * 0.71 = 1.9112
      advantages = [1.9112, 0.71, 0.5, 0], returns = [2.4112, 1.71, 2.0, 0]
    With a gap, r = [1, 5, 0, 2], V = [0.5, 9, 1, 1.5], mask = [1, 0, 1, 1] gives the same numbers on the
    policy tokens as r = [1, 0, 2], V = [0.5, 1, 1.5]: [1.9112, 0, 0.71, 0.5].
    """
    keep = mask.bool()
    m = keep.to(values.dtype)  # (B, T)
    r = zero_off_mask(rewards, keep).to(values.dtype)  # (B, T)
    v = zero_off_mask(values, keep)  # (B, T)
    next_value = torch.zeros_like(v[:, 0])  # (B,) V at the next answer token; 0 past the last
    next_adv = torch.zeros_like(v[:, 0])  # (B,) A at the next answer token
    columns = []
    # A reverse loop over T, vectorised over B: T is at most a few thousand tokens.
    for t in reversed(range(v.shape[1])):
        adv = r[:, t] + gamma * next_value - v[:, t] + gamma * lam * next_adv
        columns.append(adv)
        # Off the mask the carried values pass through unchanged: the gap is not a time step.
        next_value = torch.where(keep[:, t], v[:, t], next_value)
        next_adv = torch.where(keep[:, t], adv, next_adv)
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
    x = zero_off_mask(x, keep)
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


def moment_sums(x: Tensor, mask: Tensor) -> Tensor:
    """(count, sum x, sum x^2) over the masked entries, float64 (3,).

    Sums add across shards: summed over processes (an all-reduce) they are the sums of the whole batch, so
    statistics built from them are the same on every process and equal to one process holding everything.
    Example: x [[1, 2, 3, 10]], mask [[1, 1, 1, 0]] -> [3, 6, 14].
    """
    keep = mask.bool()
    x = zero_off_mask(x, keep).to(torch.float64)
    return torch.stack([keep.sum().to(torch.float64), x.sum(), (x * x).sum()])


def _variance(sums: Tensor) -> tuple[Tensor, Tensor]:
    """(population variance, mean of squares) from ``moment_sums``; an empty mask gives (0, 0)."""
    n = sums[0].clamp(min=1.0)
    mean, mean_sq = sums[1] / n, sums[2] / n
    return (mean_sq - mean * mean).clamp(min=0.0), mean_sq


EV_ZERO_VARIANCE = 1e-12
"""Var[R] at or below this fraction of E[R^2] counts as zero: the float64 rounding of sum R^2 / n - mean^2
when every return is equal (a few ulps of E[R^2], far below any variance a critic could explain)."""


def explained_variance_from_sums(return_sums: Tensor, residual_sums: Tensor) -> Tensor:
    """1 - Var[R - V] / Var[R] from the ``moment_sums`` of the returns R and of the residuals R - V.

    NaN when Var[R] is zero (every return equal, or no answer tokens): there is nothing to explain and any
    number would mislead, as in CleanRL and Stable-Baselines3; the metrics file then holds NaN.
    """
    var_returns, mean_sq = _variance(return_sums)
    var_residual, _ = _variance(residual_sums)
    undefined = (var_returns <= EV_ZERO_VARIANCE * mean_sq) | (return_sums[0] == 0)
    return torch.where(undefined, torch.full_like(var_returns, math.nan), 1.0 - var_residual / var_returns)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """How much of the returns' variance the critic explains: 1 - Var[R - V] / Var[R] over the answer tokens.

    CleanRL's ``explained_variance`` (population variances over the masked entries, float64). 1 is a perfect
    critic, 0 one no better than a constant, negative worse than one. NaN when Var[R] is zero (see
    ``explained_variance_from_sums``). values, returns, mask (B, T) -> a float64 scalar.

    Example: R = [1, 2, 3], V = [0.5, 2, 2.5] (a fourth, masked token holds garbage):
      Var[R] = ((-1)^2 + 0 + 1^2) / 3 = 2/3; R - V = [0.5, 0, 0.5], mean 1/3,
      Var[R - V] = ((1/6)^2 + (1/3)^2 + (1/6)^2) / 3 = (6/36) / 3 = 1/18
      -> 1 - (1/18) / (2/3) = 1 - 1/12 = 11/12 = 0.9166666666666666.
    """
    residuals = returns.to(torch.float64) - values.to(torch.float64)
    return explained_variance_from_sums(moment_sums(returns, mask), moment_sums(residuals, mask))


# --- KL coefficient controllers ---

KL_STATE = Schema({"value": number()})
"""A saved KL coefficient: finite (an adaptive one may drift below 0 on a long horizon step, so no bound)."""


class FixedKLController:
    """A constant KL coefficient; ``update`` is a no-op so the PPO loop treats both controllers alike."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        return None

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Raises ``checkpoint_schema.Invalid`` (a ValueError naming the field) unless ``value`` is finite."""
        self.value = float(apply(KL_STATE, state)["value"])


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
        """Raises ``checkpoint_schema.Invalid`` (a ValueError naming the field) unless ``value`` is finite."""
        self.value = float(apply(KL_STATE, state)["value"])


MOMENTS_STATE = Schema({"count": number(0.0), "mean": number(), "m2": number(0.0)})


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
        """Raises ``checkpoint_schema.Invalid`` (a ValueError naming the field) before setting anything unless
        the fields are finite (count and m2, a sum of squares, also >= 0)."""
        state = apply(MOMENTS_STATE, state)
        self._count, self._mean, self._m2 = float(state["count"]), float(state["mean"]), float(state["m2"])
