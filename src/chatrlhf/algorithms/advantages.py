"""Advantage estimators for on-policy RLHF, picked by name from ``ADVANTAGE_ESTIMATORS``.

Every estimator takes the per-token rewards (B, T) (``rl.shaped_rewards``: the sequence score on the last
answer token, minus beta * KL per token when the KL sits in the reward), the answer mask (B, T), the
critic's values (B, T) or None, and the group size (answers per prompt; a group is ``group_size``
consecutive rows), and returns ``(advantages, returns)``, both (B, T) and zero off the mask. ``returns``
are the critic's regression targets (unused by the critic-free estimators). Sequence-level estimators
(RLOO, GRPO, Dr. GRPO) work on each answer's total reward R_i = sum_t r_t and give every token of the
answer the same advantage. Pure functions of tensors, like ``rl``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from chatrlhf.algorithms import rl
from chatrlhf.algorithms.masking import zero_off_mask

Tensor = torch.Tensor


def returns_to_go(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G_t = sum_{k >= t} gamma^(k - t) r_k over the answer tokens, (B, T), zero off the mask.

    The Monte-Carlo return of REINFORCE (Williams 1992); equals ``rl.gae`` with zero values and lam = 1.
    Example (gamma 0.5): r = [1, 2, 4, 9], mask = [1, 1, 1, 0] -> G = [1 + 0.5 * 4, 2 + 0.5 * 4, 4, 0]
    = [3, 4, 4, 0] (G_2 = 4, G_1 = 2 + 0.5 * 4 = 4, G_0 = 1 + 0.5 * 4 = 3).
    """
    zeros = torch.zeros_like(rewards, dtype=torch.promote_types(rewards.dtype, torch.float32))
    advantages, _ = rl.gae(rewards, zeros, mask, gamma, 1.0)
    return advantages


def sequence_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """R_i = sum of the answer's per-token rewards, (B,). Example: [[1, 2, 9], [0, -1, 3]], mask
    [[1, 1, 0], [1, 1, 1]] -> [3, 2]."""
    return rl.sequence_kl(rewards, mask)  # the same masked row sum


def _per_token(seq_advantages: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B,) sequence advantages -> (advantages, returns) (B, T) on the answer tokens."""
    m = mask.to(seq_advantages.dtype)
    adv = seq_advantages.unsqueeze(-1) * m
    return adv, adv


def _groups(x: Tensor, group_size: int) -> Tensor:
    """(B,) -> (B / k, k); rows i*k .. i*k + k - 1 are the answers to one prompt."""
    if group_size < 2 or x.shape[0] % group_size:
        raise ValueError(f"group estimators need groups of >= 2 answers dividing the batch; got batch "
                         f"{x.shape[0]}, group size {group_size}")
    return x.view(-1, group_size)


def _centred(r: Tensor) -> Tensor:
    """r - its row mean, (G, k), exactly 0 for a row of equal values: the mean is taken of the offsets from
    the row's first element, which are exact zeros there (a plain mean can round off by an ulp)."""
    offsets = r - r[:, :1]
    return offsets - offsets.mean(-1, keepdim=True)


# --- the estimators: fn(rewards, mask, values, group_size, gamma, lam) -> (advantages, returns) ---------


def gae_advantages(rewards, mask, values, group_size, gamma, lam):
    """PPO: GAE with the critic's values (``rl.gae``)."""
    return rl.gae(rewards, values, mask, gamma, lam)


def a2c_advantages(rewards, mask, values, group_size, gamma, lam):
    """Advantage actor-critic (Mnih et al. 2016, with Monte-Carlo returns): A_t = G_t - V(s_t), and
    the critic regresses on G_t. Equals GAE with lam = 1.

    Example (gamma 1): r = [0, 0, 2], V = [0.5, 1, 1.5] -> G = [2, 2, 2], A = [1.5, 1, 0.5].
    """
    g = returns_to_go(rewards, mask, gamma)
    m = mask.to(g.dtype)
    return (g - zero_off_mask(values, mask).to(g.dtype)) * m, g


def reinforce_advantages(rewards, mask, values, group_size, gamma, lam):
    """REINFORCE (Williams 1992): A_t = G_t, the return-to-go, with no baseline."""
    g = returns_to_go(rewards, mask, gamma)
    return g, g


def reinforce_baseline_advantages(rewards, mask, values, group_size, gamma, lam, reduce=None):
    """REINFORCE with a baseline: A_t = G_t - b, b = the batch mean of the answers' returns G_0, each read at
    its answer's first token (wherever the answer starts in the row). ``reduce`` sums a tensor over processes
    (the engine's ``all_reduce``), so b is the mean over every process's answers, not this one's.

    Example (gamma 1): answers' rewards [[0, 1], [0, 3]], full masks -> G = [[1, 1], [3, 3]], b = 2,
    A = [[-1, -1], [1, 1]]. Shifted right, rewards [[0, 0, 1], [0, 3, 0]] with masks [[0, 1, 1], [1, 1, 0]]
    give the same advantages on the answer tokens: [[0, -1, -1], [1, 1, 0]].
    """
    g = returns_to_go(rewards, mask, gamma)
    keep = mask.bool()
    first = keep.int().argmax(-1)  # (B,) each answer's first token (0 for an empty row, dropped below)
    starts = g.gather(1, first.unsqueeze(-1)).squeeze(-1)[keep.any(-1)] if g.shape[1] else g.new_zeros(0)
    total = torch.stack([starts.double().sum(), torch.tensor(float(starts.numel()), dtype=torch.float64)])
    if reduce is not None:
        total = reduce(total.to(g.device))
    baseline = (total[0] / total[1].clamp(min=1.0)).to(g.dtype)
    m = mask.to(g.dtype)
    return (g - baseline) * m, g


def rloo_advantages(rewards, mask, values, group_size, gamma, lam):
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): A_i = R_i - mean of the other k - 1 answers' R_j
    = k / (k - 1) * (R_i - mean_group R).

    Example, k = 3: R = [1, 2, 6] -> [1 - 4, 2 - 3.5, 6 - 1.5] = [-3, -1.5, 4.5].
    """
    r = _groups(sequence_rewards(rewards, mask), group_size)  # (G, k)
    k = group_size
    return _per_token((k / (k - 1) * _centred(r)).reshape(-1), mask)


GRPO_EPS = 1e-4
"""Added to the group std (TRL's value), so a group of equal rewards gives zero advantages, not 0/0."""


def grpo_advantages(rewards, mask, values, group_size, gamma, lam):
    """GRPO (Shao et al. 2024, DeepSeekMath eq. 3 outcome supervision): A_i = (R_i - mean_g) / (std_g + eps),
    std with Bessel's correction (as TRL's GRPOTrainer).

    Example, k = 3: R = [1, 2, 6]: mean 3, std = sqrt((4 + 1 + 9) / 2) = sqrt(7) = 2.6457513110645907
    -> [-2, -1, 3] / (sqrt(7) + 1e-4). Equal rewards -> [0, 0, 0].
    """
    r = _groups(sequence_rewards(rewards, mask), group_size)  # (G, k)
    return _per_token((_centred(r) / (r.std(-1, keepdim=True) + GRPO_EPS)).reshape(-1), mask)


def dr_grpo_advantages(rewards, mask, values, group_size, gamma, lam):
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): A_i = R_i - mean_g, no std scaling
    (which up-weights near-uniform groups); its loss also uses a constant normaliser (see ``Estimator``).

    Example, k = 3: R = [1, 2, 6] -> [-2, -1, 3].
    """
    r = _groups(sequence_rewards(rewards, mask), group_size)
    return _per_token(_centred(r).reshape(-1), mask)


def reinforce_pp_advantages(rewards, mask, values, group_size, gamma, lam):
    """REINFORCE++ (Hu 2025): the return-to-go of the KL-shaped token rewards; the whitening over the
    whole batch (the estimator's ``whiten``) is its baseline. The whitening needs all processes, so the
    training loop applies it."""
    g = returns_to_go(rewards, mask, gamma)
    return g, g


@dataclass(frozen=True)
class Estimator:
    fn: Callable[..., tuple[Tensor, Tensor]]
    critic: bool
    """Trains a critic (value model) and passes its values."""
    whiten: bool
    """Default for whitening the advantages over the batch (``whiten_advantages`` = None)."""
    grouped: bool
    """Compares the answers to one prompt: needs samples_per_prompt >= 2."""
    constant_normalizer: bool = False
    """Divide the policy loss by answers x max_new_tokens instead of the answer-token count (Dr. GRPO)."""
    global_baseline: bool = False
    """Takes ``reduce=`` (a sum over processes) for a baseline over every process's answers."""


ADVANTAGE_ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator(gae_advantages, critic=True, whiten=True, grouped=False),
    "a2c": Estimator(a2c_advantages, critic=True, whiten=True, grouped=False),
    "reinforce": Estimator(reinforce_advantages, critic=False, whiten=False, grouped=False),
    "reinforce_baseline": Estimator(reinforce_baseline_advantages, critic=False, whiten=False, grouped=False,
                                    global_baseline=True),
    "rloo": Estimator(rloo_advantages, critic=False, whiten=False, grouped=True),
    "grpo": Estimator(grpo_advantages, critic=False, whiten=False, grouped=True),
    "dr_grpo": Estimator(dr_grpo_advantages, critic=False, whiten=False, grouped=True, constant_normalizer=True),
    "reinforce_pp": Estimator(reinforce_pp_advantages, critic=False, whiten=True, grouped=False),
}


def stage_name(estimator: str) -> str:
    """What a run with this estimator is called (its output dir, logs and report): ``gae`` is PPO."""
    return "ppo" if estimator == "gae" else estimator


def estimator_for_algo(algo: str) -> str:
    """The advantage estimator ``chatrlhf train --algo`` names: ``ppo`` is GAE, the others are themselves."""
    return "gae" if algo == "ppo" else algo
