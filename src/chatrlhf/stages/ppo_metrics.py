"""The PPO iteration's metrics beyond the rewards: the generating engine against the trainer, and the critic."""

from __future__ import annotations

import torch

from chatrlhf.algorithms import masked_sum, mismatch_stats, rl


def mismatch_metrics(run, exp) -> dict:
    """The generating engine vs the trainer on the sampled tokens (``mismatch_stats``), over all processes."""
    local = mismatch_stats(exp.old_logprobs, exp.rollout_logprobs, exp.mask, run.tis_cap or run.cfg.tis_cap)
    n = exp.mask.sum().double()
    parts = run.actor.all_gather(torch.tensor([[local["mismatch_kl"], local["max_ratio"], local["min_ratio"],
                                                local["tis_clipfrac"], n]], dtype=torch.float64))  # (world, 5)
    weight = parts[:, 4] / parts[:, 4].sum().clamp(min=1.0)
    return {"rollout/mismatch_kl": float((parts[:, 0] * weight).sum()), "rollout/max_ratio": float(parts[:, 1].max()),
            "rollout/min_ratio": float(parts[:, 2].min()), "rollout/tis_clipfrac": float((parts[:, 3] * weight).sum())}


def critic_metrics(run, exp) -> dict:
    """The critic's rollout values: their mean, and the explained variance of the returns (CleanRL's
    ``explained_variance``, from moment sums added over all processes)."""
    if run.critic is None:
        return {}
    tokens = max(run.actor.all_reduce(exp.mask.sum().double()).item(), 1.0)
    residuals = exp.returns.double() - exp.values.double()
    sums = run.actor.all_reduce(torch.cat([rl.moment_sums(exp.returns, exp.mask), rl.moment_sums(residuals, exp.mask)]))
    return {"value/mean": run.actor.all_reduce(masked_sum(exp.values, exp.mask).double()).item() / tokens,
            "value/explained_variance": rl.explained_variance_from_sums(sums[:3], sums[3:]).item(),
            "lr/critic": run.critic.lr, "skipped_steps/critic": run.critic.skipped_steps}
