"""The PPO iteration's metrics beyond the rewards: the generating engine against the trainer, the critic, and
dynamic sampling's rounds."""

from __future__ import annotations

import torch

from chatrlhf.algorithms import masked_sum, mismatch_stats, rl


def mismatch_metrics(run, exp) -> dict:
    """The generating engine vs the trainer on the sampled tokens (``mismatch_stats``), over all processes, and
    the share of the rollout's (prompt + answer) positions that are padding (what a padded forward computes
    in vain; packed forwards skip it)."""
    local = mismatch_stats(exp.old_logprobs, exp.rollout_logprobs, exp.mask, run.tis_cap or run.cfg.tis_cap)
    n = exp.mask.sum().double()
    parts = run.actor.all_gather(torch.tensor([[local["mismatch_kl"], local["max_ratio"], local["min_ratio"],
                                                local["tis_clipfrac"], n]], dtype=torch.float64))  # (world, 5)
    weight = parts[:, 4] / parts[:, 4].sum().clamp(min=1.0)
    mask = exp.attention_mask
    real, positions = run.actor.all_reduce(torch.tensor([mask.sum().item(), mask.numel()], dtype=torch.float64)).tolist()
    return {"rollout/pad_frac": 1 - real / max(positions, 1.0),"rollout/mismatch_kl": float((parts[:, 0] * weight).sum()), "rollout/max_ratio": float(parts[:, 1].max()),
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


def sampling_metrics(run, counts: dict | None) -> dict:
    """Dynamic sampling's figures over all processes (none when it is off): ``sampling/rounds`` (the same on
    every process), ``sampling/kept_frac`` (informative groups / groups generated, every round counted),
    ``sampling/filled`` (all-equal groups trained on because the rounds ran out) and
    ``sampling/first_round_reward`` (the mean raw score of round 0: the unfiltered batch's ``reward/score``)."""
    if counts is None:
        return {}
    keys = ("groups", "informative", "filled", "first_reward_sum", "first_answers")
    groups, informative, filled, reward_sum, answers = run.actor.all_reduce(
        torch.tensor([float(counts[k]) for k in keys], dtype=torch.float64)).tolist()
    return {"sampling/rounds": float(counts["rounds"]), "sampling/kept_frac": informative / max(groups, 1.0),
            "sampling/filled": filled, "sampling/first_round_reward": reward_sum / max(answers, 1.0)}
