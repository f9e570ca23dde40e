"""On-policy RLHF: PPO (DeepSpeed-Chat step 3) and its critic-free relatives (REINFORCE, RLOO, GRPO, ...).

``train_ppo`` runs one iteration per prompt batch, each phase a function below, in this order:
  generate_rollouts   answers from the actor's live weights, in inference mode; with dynamic sampling, in
                      rounds until the groups' rewards differ (``ppo_sampling``)
  score_rollouts      old log-probs, reference log-probs and, with a critic, values, all in eval mode; the
                      reward source's score
  compute_advantages  per-token rewards (the score at the last answer token, minus beta * KL per token when
                      the KL sits in the reward), then the advantage estimator picked by name (GAE for PPO)
  ppo_update          PPO epochs over mini-batches: clipped policy loss on the actor, plus beta * KL when the
                      KL sits in the loss; clipped value loss on the critic
  iteration_metrics   one metrics row, every value the same on all processes; then log and checkpoint.
The math is in ``chatrlhf.algorithms`` (``rl``, ``advantages``, ``losses``); every choice is listed in
docs/ppo.md and docs/rl.md. Tensors over answer positions are (B, R); ``P`` is the (left-padded) prompt
width of the rollout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from chatrlhf.algorithms import (
    aggregation_weights,
    entropy_from_logits,
    gather_log_probs,
    masked_sum,
    policy_loss,
    rl,
    tis_weights,
    value_loss,
)
from chatrlhf.algorithms.advantages import stage_name
from chatrlhf.engine import Engine
from chatrlhf.resume import resume_rl_step, save_rl_final, save_rl_resumable
from chatrlhf.rewards.contract import RewardBatch
from chatrlhf.rollout import Rollout, answer_logits
from chatrlhf.stages.ppo_config import PPOConfig
from chatrlhf.stages.ppo_env import episode_metrics
from chatrlhf.stages.ppo_metrics import critic_metrics, mismatch_metrics, sampling_metrics
from chatrlhf.stages.ppo_sampling import generate_answers, penalised_scores, reward_batch, sample_informative
from chatrlhf.stages.ppo_setup import RLRun, rollout_micro_batches, setup_run
from chatrlhf.training import MetricsLogger, logged_rows, write_resolved_config


@dataclass
class Experience:
    """One iteration's rollouts on this process, scored: what the update and the metrics read."""

    sequences: torch.Tensor  # (B, P+R)
    attention_mask: torch.Tensor  # (B, P+R)
    mask: torch.Tensor  # (B, R) float: answer tokens, EOS included
    finished: torch.Tensor  # (B,) bool: the answer ended with EOS
    reward_batch: RewardBatch  # prompts and decoded answers, what reward sources read
    old_logprobs: torch.Tensor  # (B, R) the trainer's, at rollout time (filled by the update when reused)
    rollout_logprobs: torch.Tensor  # (B, R) the generating engine's own
    ref_logprobs: torch.Tensor  # (B, R)
    values: torch.Tensor  # (B, R); zeros without a critic
    raw_scores: torch.Tensor  # (B,) the reward source's scores, as logged
    scores: torch.Tensor  # (B,) after the missing-EOS penalty and normalisation: what the rewards use
    rewards: torch.Tensor | None = None  # (B, R) per-token rewards, from compute_advantages
    advantages: torch.Tensor | None = None  # (B, R)
    returns: torch.Tensor | None = None  # (B, R)
    turn_rewards: torch.Tensor | None = None  # (B, R) an environment's per-turn rewards, on each turn's last token
    episodes: list | None = None  # an environment's episodes (``environments.episodes.Episode``)
    sampling: dict | None = None  # dynamic sampling's counts on this process (``ppo_sampling``); None: off


def train_ppo(cfg: PPOConfig) -> dict[str, float]:
    cfg.validate()
    run = setup_run(cfg)
    start = resume_rl_step(run.out, run.actor, run.critic, cfg.run, run.stateful, run.ema, run.mini)
    logger = _start_logger(run, start)
    bar = tqdm(total=run.n_iters, initial=start, desc=stage_name(cfg.advantage_estimator),
               disable=not (cfg.run.progress and run.actor.is_rank_0))
    history = logged_rows(run.out, start)  # a resumed run's summary covers the iterations before it too
    try:  # a vLLM engine left to the garbage collector would tear down the trainer's process groups
        for iteration in range(start, run.n_iters):
            started = time.time()
            rollout, prompt_batch = generate_rollouts(run, iteration)
            t_generate = time.time() - started
            exp = score_rollouts(run, rollout, prompt_batch)
            exp.rewards, exp.advantages, exp.returns = compute_advantages(run, exp)
            t_score = time.time() - started - t_generate
            update_stats = ppo_update(run, exp, iteration)
            run.rollouts.weights_changed()
            t_update = time.time() - started - t_generate - t_score
            kl, kl_coef = _adapt_kl(run, exp)
            if run.ema is not None:
                run.ema.update(run.actor)
            row = iteration_metrics(run, exp, {"kl": kl, "kl_coef": kl_coef}, update_stats,
                                    {"time/generate": t_generate, "time/score": t_score, "time/update": t_update},
                                    started, iteration)
            history.append(row)
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward/score']:.3f}", kl=f"{kl:.3f}")
            _log_and_save(run, logger, row, done=iteration + 1)
    finally:
        run.rollouts.close()
    bar.close()
    summary = save_rl_final(run.out, run.actor, run.critic, run.ema, run.tokenizer, history, run.n_iters,
                            run.kl_ctl.value, cfg.advantage_estimator,
                            {"precision": run.actor.precision.summary(), "rollout_backend": run.rollouts.backend,
                             "rollout_form": run.rollouts.form})
    logger.close()
    return summary


def _start_logger(run: RLRun, start: int) -> MetricsLogger:
    logger = MetricsLogger(run.out, enabled=run.actor.is_rank_0, start=start)
    if run.actor.is_rank_0:
        write_resolved_config(run.out, run.cfg)
        logger.log(start, {"prompts": len(run.prompts), "iterations": run.n_iters, "reward": run.reward.name,
                           "advantage_estimator": run.cfg.advantage_estimator}, "data")
    return logger


# ---- generate -------------------------------------------------------------------------------------------


def generate_rollouts(run: RLRun, iteration: int) -> tuple[Rollout, dict]:
    """This process's answers to the iteration's prompts (``samples_per_prompt`` each), sampled from the
    actor's live weights in inference mode; and the collated prompt batch they answer. With
    ``dynamic_sampling``, rounds of other prompts replace the groups whose rewards are all equal."""
    epoch, step_in_epoch = divmod(iteration, run.plan.steps_per_epoch)
    (local_idx,) = run.plan.local_micro_batches(run.plan.batch(epoch, step_in_epoch), run.rank)
    # Sampling randomness is a pure function of (seed, iteration, rank): a resumed run draws the same.
    gen = torch.Generator().manual_seed(run.cfg.actor_engine.seed * 1_000_003 + iteration * run.world + run.rank)
    if run.cfg.dynamic_sampling:
        return sample_informative(run, iteration, list(local_idx), gen)
    return generate_answers(run, local_idx, gen)


# ---- score ----------------------------------------------------------------------------------------------


@torch.no_grad()
def score_rollouts(run: RLRun, rollout: Rollout, prompt_batch: dict) -> Experience:
    """Old and reference log-probs, values and the reward source's scores of the rollouts.

    Answers cut off without EOS lose ``missing_eos_penalty``, long ones DAPO's ``overlong_penalty`` within
    ``overlong_buffer`` tokens of ``max_new_tokens``; with ``normalize_reward`` the scores are
    normalised by running moments over all processes' scores. Under dynamic sampling the rounds have already
    called the reward source (``raw_scores`` in the batch).
    """
    cfg = run.cfg
    rewarded = reward_batch(run, rollout, prompt_batch)
    old_logprobs, ref_logprobs, values = _logprobs_and_values(run, rollout)
    raw_scores = prompt_batch["raw_scores"] if "raw_scores" in prompt_batch else run.reward(rewarded).float()
    mask = rollout.response_mask.float()  # from the rollout, never from pad ids (pad == eos in SmolLM2)
    scores = penalised_scores(cfg, raw_scores, rollout)
    if cfg.normalize_reward:
        run.moments.update(run.actor.all_gather(scores))
        scores = run.moments.normalize(scores)
    return Experience(rollout.sequences, rollout.attention_mask, mask, rollout.finished, rewarded,
                      old_logprobs, rollout.log_probs.float(), ref_logprobs, values, raw_scores, scores,
                      turn_rewards=prompt_batch.get("turn_rewards"), episodes=prompt_batch.get("episodes"),
                      sampling=prompt_batch.get("sampling"))


def _logprobs_and_values(run: RLRun, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(old log-probs, reference log-probs, values) (B, R) each, a micro-batch at a time.

    The actor and critic run in eval mode (no dropout), so the first PPO ratio is exactly 1. Without a
    critic the values are zeros. When the update reuses its own forward as the old log-probs
    (``run.reuse_update_logprobs``), the actor is not run here and the old log-probs start as zeros.
    """
    sequences, attention_mask = rollout.sequences, rollout.attention_mask
    answer_len = rollout.response_mask.shape[1]
    temperature, packing = run.cfg.generation.temperature, run.cfg.actor_engine.packing
    models = [m for m in (run.actor, run.critic) if m is not None]
    for m in models:
        m.eval()
    old_logprobs, ref_logprobs, values = [], [], []
    micro = rollout_micro_batches(run, attention_mask, torch.arange(sequences.shape[0]))
    with run.reference.resident():  # an offloaded reference comes to the device once per scoring pass
        for rows in micro:
            seq, attn = sequences[rows], attention_mask[rows]
            answer = seq[:, -answer_len:]
            ref_logprobs.append(gather_log_probs(answer_logits(run.reference, seq, attn, answer_len, temperature,
                                                               packing), answer))
            old_logprobs.append(torch.zeros_like(ref_logprobs[-1]) if run.reuse_update_logprobs else gather_log_probs(
                answer_logits(run.actor, seq, attn, answer_len, temperature, packing), answer))
            values.append(_critic_values(run.critic, seq, attn, answer_len) if run.critic is not None
                          else torch.zeros_like(ref_logprobs[-1]))
    for m in models:
        m.train()
    order = torch.cat(micro).argsort()  # back to the rollout's row order
    return torch.cat(old_logprobs)[order], torch.cat(ref_logprobs)[order], torch.cat(values)[order]


def _critic_values(critic, sequences, attention_mask, answer_len: int) -> torch.Tensor:
    """V(s_t) for each answer token t, read at the position before it (as the log-probs): (B, R)."""
    values = critic(sequences, attention_mask, per_token=True)  # (B, P+R)
    return values[:, -answer_len - 1 : -1].float()


# ---- advantages -----------------------------------------------------------------------------------------


def compute_advantages(run: RLRun, exp: Experience) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rewards, advantages, returns) (B, R): the score at the last answer token (- beta * KL per token when
    the KL sits in the reward), then the estimator; advantages whitened over all processes if asked."""
    cfg = run.cfg
    kl = rl.kl_estimate(cfg.kl_estimator, exp.old_logprobs, exp.ref_logprobs, cfg.kl_clamp) * exp.mask  # (B, R)
    beta_in_reward = run.kl_ctl.value if cfg.kl_in == "reward" else 0.0
    rewards = rl.shaped_rewards(exp.scores, kl, exp.mask, beta_in_reward, cfg.reward_clip)
    if exp.turn_rewards is not None:  # an environment's per-turn rewards, each on its turn's last token
        rewards = rewards + exp.turn_rewards
    over_processes = {"reduce": run.actor.all_reduce} if run.estimator.global_baseline else {}
    advantages, returns = run.estimator.fn(rewards, exp.mask, exp.values, cfg.samples_per_prompt, cfg.gamma,
                                           cfg.lam, **over_processes)
    if run.whiten:
        advantages = _whiten_global(run.actor, advantages, exp.mask)
    return rewards, advantages, returns


def _whiten_global(engine: Engine, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Advantage whitening with the mean and variance over the answer tokens of all processes."""
    total, n = engine.all_reduce(torch.stack([masked_sum(x, mask), mask.sum()]).double()).tolist()
    mean = total / max(n, 1.0)
    sq = engine.all_reduce(masked_sum((x - mean) ** 2, mask).double()).item()
    return rl.whiten(x, mask, mean=mean, var=sq / max(n, 1.0))


# ---- update ---------------------------------------------------------------------------------------------


def ppo_update(run: RLRun, exp: Experience, iteration: int) -> dict[str, float]:
    """PPO epochs x shuffled mini-batches, stopping early once the approx KL passes ``kl_stop``.

    Returns each statistic's mean over the updates, plus ``ratio_first`` (the ratio before any update:
    exactly 1 when rollout and training forwards agree), ``ppo_updates`` and ``early_stop``.
    """
    cfg = run.cfg
    sums: dict[str, float] = {}
    updates, early_stop, ratio_first = 0, False, float("nan")
    gen = torch.Generator().manual_seed(cfg.actor_engine.seed + iteration)  # mini-batch order, resumable
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(exp.mask.shape[0], generator=gen)
        for start in range(0, len(order), run.mini):
            stats = _minibatch_step(run, exp, order[start : start + run.mini], iteration, updates)
            if updates == 0:
                ratio_first = stats["ratio"]
            for k, v in stats.items():
                _add(sums, k, v)
            updates += 1
            if cfg.kl_stop is not None and stats.get("approx_kl", 0.0) > cfg.kl_stop:
                early_stop = True  # every process sees the same all-reduced value, so all stop together
                break
        if early_stop:
            break
    return {**{k: v / updates for k, v in sums.items()}, "ratio_first": ratio_first, "ppo_updates": updates,
            "early_stop": float(early_stop)}


def _minibatch_step(run: RLRun, exp: Experience, rows: torch.Tensor, iteration: int, update: int) -> dict:
    """One optimizer step of the actor (and critic) over the mini-batch ``rows``, a micro-batch at a time.

    Losses are normalised by the answer tokens of the whole mini-batch on all processes, counted before the
    first backward, so micro-batching, accumulation and data parallelism give the full mini-batch's gradient.
    (Dr. GRPO normalises by a constant instead: the mini-batch's answers x max_new_tokens.) Returns the
    statistics summed over micro-batches and processes.
    """
    if run.estimator.constant_normalizer:
        tokens = float(len(rows) * run.world * run.cfg.generation.max_new_tokens)
    else:
        tokens = max(run.actor.all_reduce(exp.mask[rows].sum().double()).item(), 1.0)
    agg = run.cfg.loss_agg
    answers = float(len(rows) * run.world)  # every process trains the same number of rows per mini-batch
    stats: dict[str, float] = {}
    micro = rollout_micro_batches(run, exp.attention_mask, rows)
    for engine in (run.actor, run.critic) if run.critic is not None else (run.actor,):
        engine.begin_step(len(micro))
    for micro_index, micro_rows in enumerate(micro):
        agg_weights = (None if agg == "token-mean" else
                       aggregation_weights(exp.mask[micro_rows], agg, tokens, answers, run.cfg.generation.max_new_tokens))
        micro_stats = _actor_step(run, exp, micro_rows, tokens, (iteration, update, micro_index, len(micro)),
                                  agg_weights)
        if run.critic is not None:
            micro_stats.update(_critic_step(run, exp, micro_rows, tokens))
        for k, v in micro_stats.items():  # every stat is a share of the mini-batch's: they sum to it
            _add(stats, k, float(v.detach()) if torch.is_tensor(v) else float(v))
    stats = {k: run.actor.all_reduce(torch.tensor(v, dtype=torch.float64)).item() for k, v in stats.items()}
    stats["grad_norm/actor"] = run.actor.grad_norm or 0.0
    if run.critic is not None:
        stats["grad_norm/critic"] = run.critic.grad_norm or 0.0
    return stats


def _actor_step(run: RLRun, exp: Experience, rows: torch.Tensor, tokens: float, ptx_key: tuple,
                agg_weights: torch.Tensor | None = None) -> dict:
    """Policy loss (- entropy bonus, + beta * KL in the loss, + ptx) on micro-batch ``rows``: backward, step.
    Statistics are sums over the micro-batch divided by the mini-batch's normaliser ``tokens``.
    ``agg_weights`` (b, R): ``loss_agg``'s per-token weights on the policy, entropy and KL terms (None: the
    token mean)."""
    cfg, actor = run.cfg, run.actor
    answer_len = exp.mask.shape[1]
    sequences, mask = exp.sequences[rows], exp.mask[rows]
    logits = answer_logits(actor, sequences, exp.attention_mask[rows], answer_len, cfg.generation.temperature,
                           cfg.actor_engine.packing)
    logprobs = gather_log_probs(logits, sequences[:, -answer_len:])  # (b, R)
    if run.reuse_update_logprobs:  # the one update: this forward IS the rollout-time policy
        exp.old_logprobs[rows] = logprobs.detach()
    old = exp.old_logprobs[rows]
    weights = tis_weights(old, exp.rollout_logprobs[rows], run.tis_cap) if run.tis_cap else None
    if agg_weights is not None:
        weights = agg_weights if weights is None else weights * agg_weights
    agg = 1.0 if agg_weights is None else agg_weights
    pg_loss, stats = policy_loss(logprobs, old, exp.advantages[rows], mask, cfg.clip_eps, tokens, weights,
                                 cfg.clip_eps_high, cfg.dual_clip, cfg.ratio_level == "sequence")
    entropy = masked_sum(entropy_from_logits(logits if cfg.entropy_coef else logits.detach()) * agg, mask) / tokens
    loss = pg_loss - cfg.entropy_coef * entropy
    stats = {**stats, "loss/policy": pg_loss, "entropy": entropy}
    if cfg.kl_in == "loss":  # GRPO: + beta * KL(pi || ref) per answer token
        kl = rl.kl_estimate(cfg.kl_estimator, logprobs, exp.ref_logprobs[rows], cfg.kl_clamp)
        kl_loss = masked_sum(kl * agg, mask) / tokens
        loss = loss + run.kl_ctl.value * kl_loss
        stats["loss/kl"] = kl_loss
    if run.ptx is not None:
        ptx_loss = run.ptx.loss(actor, ptx_key)
        loss = loss + cfg.ptx_coef * ptx_loss
        stats["ptx/loss"] = ptx_loss / run.world  # stats are summed over processes; this one is a per-process mean
    actor.backward(loss * run.world)  # x world: DeepSpeed averages gradients over processes
    actor.step()
    return stats


def _critic_step(run: RLRun, exp: Experience, rows: torch.Tensor, tokens: float) -> dict:
    """Clipped value loss on micro-batch ``rows``: backward, step; its statistics, as ``_actor_step``'s."""
    answer_len = exp.mask.shape[1]
    values = _critic_values(run.critic, exp.sequences[rows], exp.attention_mask[rows], answer_len)
    v_loss, v_stats = value_loss(values, exp.values[rows], exp.returns[rows], exp.mask[rows], run.cfg.value_clip,
                                 tokens)
    run.critic.backward(v_loss * run.world)
    run.critic.step()
    return {"loss/value": v_loss, **v_stats}


def _add(d: dict, key: str, value: float) -> None:
    d[key] = d.get(key, 0.0) + value


# ---- log and checkpoint ---------------------------------------------------------------------------------


def _adapt_kl(run: RLRun, exp: Experience) -> tuple[float, float]:
    """(mean answer KL over all processes, the beta this iteration used); then the KL controller's step, fed
    the mean answer KL or, with ``kl_target_of=token``, the mean token KL."""
    n = exp.mask.shape[0] * run.world
    seq_kl = rl.sequence_kl(rl.kl_k1(exp.old_logprobs, exp.ref_logprobs), exp.mask)  # (B,) the KL the plots report
    kl_sum, tokens = run.actor.all_reduce(torch.stack([seq_kl.sum().double(), exp.mask.sum().double()])).tolist()
    kl = kl_sum / n
    kl_coef = run.kl_ctl.value
    run.kl_ctl.update(kl if run.cfg.kl_target_of == "answer" else kl_sum / max(tokens, 1.0), n)
    return kl, kl_coef


def iteration_metrics(run: RLRun, exp: Experience, kl: dict, update_stats: dict, timings: dict, started: float,
                      iteration: int) -> dict[str, float]:
    """The iteration's metrics row; every value is over all processes, so the same on each."""
    actor = run.actor

    def mean_all(x: torch.Tensor) -> float:
        return actor.all_reduce(x.double().sum()).item() / (x.numel() * run.world)

    row = {
        "reward/score": mean_all(exp.raw_scores),
        "reward/total": mean_all(masked_sum(exp.rewards, exp.mask, 1)),
        **kl,
        "response_length": mean_all(exp.mask.sum(1)),
        "finished_frac": mean_all(exp.finished.float()),
        **{f"reward/{name}": mean_all(v) for name, v in run.reward.logged_parts.items()},
        **update_stats,
        "lr/actor": actor.lr,
        "skipped_steps/actor": actor.skipped_steps,
        **timings,
        "time/iteration": time.time() - started,
    }
    if run.gold is run.reward:  # training on the rater itself: its score is the gold score, no second pass
        row["gold/overall"] = row["reward/score"]
    elif run.gold is not None and run.cfg.gold_every and (iteration + 1) % run.cfg.gold_every == 0:
        row["gold/overall"] = mean_all(run.gold(exp.reward_batch))
    row.update(critic_metrics(run, exp))
    row.update(mismatch_metrics(run, exp))
    row.update(sampling_metrics(run, exp.sampling))
    if run.env is not None:
        row.update(episode_metrics(run, exp.episodes))
    return row


def _log_and_save(run: RLRun, logger: MetricsLogger, row: dict, done: int) -> None:
    """Logs every ``log_every`` iterations and the last; a resumable checkpoint every ``save_every``."""
    if done % run.cfg.run.log_every == 0 or done == run.n_iters:
        logger.log(done, row)
    if run.cfg.run.save_every and done % run.cfg.run.save_every == 0 and done < run.n_iters:
        save_rl_resumable(run.out, run.actor, run.critic, done, run.cfg.run, run.stateful, run.ema, run.mini)
