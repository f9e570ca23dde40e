"""On-policy RLHF: PPO (DeepSpeed-Chat step 3) and its critic-free relatives (REINFORCE, RLOO, GRPO, ...).

One iteration: generate (rollouts from the actor's live weights) -> score (old log-probs, reference
log-probs and, with a critic, values, all in eval mode; the reward source's score) -> advantages (per-token
rewards: the score at the last answer token, minus beta * KL per token when the KL sits in the reward; then
the advantage estimator picked by name, GAE for PPO) -> update (PPO epochs over mini-batches: clipped
policy loss on the actor, plus beta * KL when the KL sits in the loss; clipped value loss on the critic)
-> log / checkpoint. Every choice is listed in docs/ppo.md and docs/rl.md.
Tensors over answer positions are (B, R); ``P`` is the (left-padded) prompt width of the rollout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from chatrlhf.algorithms import gather_log_probs, masked_sum, rl
from chatrlhf.algorithms.advantages import ADVANTAGE_ESTIMATORS
from chatrlhf.data import PromptCollator, encode_records, prepare_records
from chatrlhf.data.encode import eos_id
from chatrlhf.engine import Engine, init_distributed
from chatrlhf.models import load_tokenizer
from chatrlhf.rewards.sources import RaterSource, RewardBatch
from chatrlhf.rollout import answer_logits, decode_responses, generate
from chatrlhf.stages.ppo_config import PPOConfig
from chatrlhf.stages.rl_support import (
    EMA,
    PtxData,
    load_models,
    place_frozen,
    plan_iterations,
    resume,
    save_checkpoint,
    save_final,
)
from chatrlhf.training import MetricsLogger, prepare_output_dir, set_seed, write_resolved_config


@dataclass
class Experience:
    """One rollout batch on this process, ready for the PPO update."""

    sequences: torch.Tensor  # (B, P+R)
    attention_mask: torch.Tensor  # (B, P+R)
    mask: torch.Tensor  # (B, R) float: answer tokens, EOS included
    old_log_probs: torch.Tensor  # (B, R)
    ref_log_probs: torch.Tensor  # (B, R)
    values: torch.Tensor  # (B, R); zeros without a critic
    advantages: torch.Tensor  # (B, R)
    returns: torch.Tensor  # (B, R)


@torch.no_grad()
def _score(cfg: PPOConfig, actor: Engine, reference, critic: Engine | None, reward, ro, rb: RewardBatch):
    """(old log-probs, reference log-probs, values) (B, R) each and the reward's scores (B,).

    The actor and critic run in eval mode (no dropout), so the first PPO ratio is exactly 1. Without a
    critic the values are zeros.
    """
    seq, attn = ro.sequences, ro.attention_mask
    n, r_len, chunk = seq.shape[0], ro.response_mask.shape[1], cfg.actor_engine.micro_batch_size
    temperature = cfg.generation.temperature
    models = [m for m in (actor, critic) if m is not None]
    for m in models:
        m.eval()
    old, ref, values = [], [], []
    with reference.resident():  # an offloaded reference comes to the device once per scoring pass
        for i in range(0, n, chunk):
            s, a, answer = seq[i : i + chunk], attn[i : i + chunk], seq[i : i + chunk, -r_len:]
            old.append(gather_log_probs(answer_logits(actor, s, a, r_len, temperature), answer))
            ref.append(gather_log_probs(answer_logits(reference, s, a, r_len, temperature), answer))
            values.append(_critic_values(critic, s, a, r_len) if critic is not None else torch.zeros_like(old[-1]))
    for m in models:
        m.train()
    return torch.cat(old), torch.cat(ref), torch.cat(values), reward(rb).float()


def _critic_values(critic, sequences, attention_mask, answer_len: int) -> torch.Tensor:
    """V(s_t) for each answer token t, read at the position before it (as the log-probs): (B, R)."""
    values = critic(sequences, attention_mask, per_token=True)  # (B, P+R)
    return values[:, -answer_len - 1 : -1]


def _whiten_global(engine: Engine, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Advantage whitening with the mean and variance over the answer tokens of all processes."""
    total, n = engine.all_reduce(torch.stack([masked_sum(x, mask), mask.sum()]).double()).tolist()
    mean = total / max(n, 1.0)
    sq = engine.all_reduce(masked_sum((x - mean) ** 2, mask).double()).item()
    return rl.whiten(x, mask, mean=mean, var=sq / max(n, 1.0))


def train_ppo(cfg: PPOConfig) -> dict[str, float]:
    cfg.validate()
    rank, world = init_distributed()
    out = prepare_output_dir(cfg.run)
    seed = cfg.actor_engine.seed
    set_seed(seed)

    # ---- data -----------------------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    records, _ = prepare_records(cfg.data, kind="prompt", phase=cfg.phase)
    prompts = encode_records(records, "prompt", tokenizer, cfg.data, progress=False)
    collate = PromptCollator(pad_id=tokenizer.pad_token_id)
    plan, n_iters, local_samples, mini = plan_iterations(cfg, len(prompts), world, seed)
    ptx = PtxData(cfg, tokenizer, rank, world) if cfg.ptx_coef > 0 else None

    # ---- models and engines ---------------------------------------------------------------------------
    estimator = ADVANTAGE_ESTIMATORS[cfg.advantage_estimator]
    whiten = estimator.whiten if cfg.whiten_advantages is None else cfg.whiten_advantages
    actor_model, reference, critic_model, reward = load_models(cfg, tokenizer, with_critic=estimator.critic)
    n_updates = n_iters * cfg.ppo_epochs * (local_samples // mini)
    actor = Engine(actor_model, cfg.actor_engine, total_steps=n_updates)
    critic = Engine(critic_model, cfg.critic_engine, total_steps=n_updates) if estimator.critic else None
    reference = place_frozen(cfg, reference, reward, actor.device)
    kl_ctl = (rl.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target
              else rl.FixedKLController(cfg.kl_coef))
    moments = rl.RunningMoments()
    stateful = {"kl_ctl": kl_ctl, "moments": moments, **_reward_state(reward, actor)}
    ema = EMA(actor, cfg.ema_beta) if cfg.ema_beta > 0 else None
    gold = reward if isinstance(reward, RaterSource) else (RaterSource() if cfg.gold_every else None)
    start = resume(out, actor, critic, cfg, stateful, ema, mini)
    logger = MetricsLogger(out, enabled=actor.is_rank_0, start=start)
    if actor.is_rank_0:
        write_resolved_config(out, cfg)
        logger.log(start, {"prompts": len(prompts), "iterations": n_iters, "reward": reward.name,
                           "advantage_estimator": cfg.advantage_estimator}, "data")

    sampling = cfg.generation.sampling()
    eos = [eos_id(tokenizer)]
    bar = tqdm(total=n_iters, initial=start, desc=cfg.advantage_estimator.replace("gae", "ppo"),
               disable=not (cfg.run.progress and actor.is_rank_0))
    history: list[dict] = []
    for it in range(start, n_iters):
        t0 = time.time()
        # ---- generate: the actor's live weights, in inference mode -------------------------------------
        epoch, in_epoch = divmod(it, plan.steps_per_epoch)
        (local_idx,) = plan.local_micro_batches(plan.batch(epoch, in_epoch), rank)
        items = [prompts[i] for i in local_idx for _ in range(cfg.samples_per_prompt)]
        batch = {k: v.to(actor.device) if torch.is_tensor(v) else v for k, v in collate(items).items()}
        # Sampling randomness is a pure function of (seed, iteration, rank): a resumed run draws the same.
        gen = torch.Generator().manual_seed(seed * 1_000_003 + it * world + rank)
        with actor.generation_mode() as model:
            ro = generate(model, batch["input_ids"], batch["attention_mask"], sampling, eos_token_ids=eos,
                          pad_token_id=tokenizer.pad_token_id, backend=cfg.generation.backend, generator=gen,
                          sync=actor.all_done if world > 1 else None)
        t_gen = time.time() - t0

        # ---- score: old log-probs, reference log-probs and values, all in eval mode ----------------------
        rb = RewardBatch(ro.sequences, ro.attention_mask, batch["prompts"], decode_responses(tokenizer, ro),
                         ro.finished.tolist(), batch.get("meta", []))
        old_logp, ref_logp, values, raw_scores = _score(cfg, actor, reference, critic, reward, ro, rb)
        mask = ro.response_mask.float()
        scores = raw_scores - cfg.missing_eos_penalty * (~ro.finished).float()
        if cfg.normalize_reward:
            moments.update(actor.all_gather(scores))
            scores = moments.normalize(scores)

        # ---- advantages: score at the last answer token (- beta * KL per token), then the estimator -------
        kl = rl.KL_ESTIMATORS[cfg.kl_estimator](old_logp, ref_logp) * mask
        beta_in_reward = kl_ctl.value if cfg.kl_in == "reward" else 0.0
        rewards = rl.shaped_rewards(scores, kl, mask, beta_in_reward, cfg.reward_clip)
        advantages, returns = estimator.fn(rewards, mask, values, cfg.samples_per_prompt, cfg.gamma, cfg.lam)
        if whiten:
            advantages = _whiten_global(actor, advantages, mask)
        exp = Experience(ro.sequences, ro.attention_mask, mask, old_logp, ref_logp, values, advantages, returns)
        n = mask.shape[0]
        t_score = time.time() - t0 - t_gen

        # ---- update: PPO epochs over shuffled mini-batches ----------------------------------------------
        stats = _update(cfg, actor, critic, exp, ptx, it, world, kl_ctl.value)
        seq_kl = rl.sequence_kl(rl.kl_k1(old_logp, ref_logp), mask)  # (B,) the KL the plots report
        mean_kl = actor.all_reduce(seq_kl.sum().double()).item() / (n * world)
        kl_coef_used = kl_ctl.value
        kl_ctl.update(mean_kl, n * world)
        if ema is not None:
            ema.update(actor)

        # ---- log and checkpoint ---------------------------------------------------------------------------
        def mean_all(x: torch.Tensor) -> float:
            return actor.all_reduce(x.double().sum()).item() / (x.numel() * world)

        row = {
            "reward/score": mean_all(raw_scores),
            "reward/total": mean_all(masked_sum(rewards, mask, 1)),
            "kl": mean_kl,
            "kl_coef": kl_coef_used,
            "response_length": mean_all(mask.sum(1)),
            "finished_frac": mean_all(ro.finished.float()),
            **{f"reward/{name}": mean_all(v) for name, v in getattr(reward, "last_parts", {}).items()},
            **stats,
            "lr/actor": actor.lr,
            "skipped_steps/actor": actor.skipped_steps,
            "time/generate": t_gen,
            "time/score": t_score,
            "time/iteration": time.time() - t0,
        }
        if gold is reward:  # training on the rater itself: its score is the gold score, no second pass
            row["gold/overall"] = row["reward/score"]
        elif gold is not None and cfg.gold_every and (it + 1) % cfg.gold_every == 0:
            row["gold/overall"] = mean_all(gold(rb))
        row.update(_critic_metrics(actor, critic, values, mask))
        history.append(row)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward/score']:.3f}", kl=f"{mean_kl:.3f}")
        done = it + 1
        if done % cfg.run.log_every == 0 or done == n_iters:
            logger.log(done, row)
        if cfg.run.save_every and done % cfg.run.save_every == 0 and done < n_iters:
            save_checkpoint(out, actor, critic, done, cfg, stateful, ema, mini)
    bar.close()

    # ---- save -------------------------------------------------------------------------------------------
    summary = save_final(out, actor, critic, ema, tokenizer, history, n_iters, kl_ctl.value, cfg.advantage_estimator)
    logger.close()
    return summary


def _reward_state(reward, actor: Engine) -> dict:
    """An ensemble's per-source normalisers: fed from all processes and saved with the checkpoints."""
    if not hasattr(reward, "state_dict"):
        return {}
    reward.gather = actor.all_gather
    return {"reward": reward}


def _critic_metrics(actor: Engine, critic: Engine | None, values: torch.Tensor, mask: torch.Tensor) -> dict:
    if critic is None:
        return {}
    tokens = max(actor.all_reduce(mask.sum().double()).item(), 1.0)
    return {"value/mean": actor.all_reduce(masked_sum(values, mask).double()).item() / tokens, "lr/critic": critic.lr,
            "skipped_steps/critic": critic.skipped_steps}


def _update(cfg: PPOConfig, actor: Engine, critic: Engine | None, exp: Experience, ptx, it: int, world: int,
            kl_coef: float) -> dict:
    """PPO epochs x mini-batches; losses normalised by the answer tokens of the whole mini-batch on all
    processes, so micro-batching, accumulation and data parallelism give the full mini-batch's gradient.
    (Dr. GRPO normalises by a constant instead: the mini-batch's answers x max_new_tokens.)"""
    constant_norm = ADVANTAGE_ESTIMATORS[cfg.advantage_estimator].constant_normalizer
    micro = cfg.actor_engine.micro_batch_size
    mini = micro * cfg.actor_engine.gradient_accumulation_steps
    n = exp.mask.shape[0]
    sums: dict[str, float] = {}
    updates, stop, first_ratio = 0, False, float("nan")
    gen = torch.Generator().manual_seed(cfg.actor_engine.seed + it)  # mini-batch order, resumable
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, mini):
            idx = order[start : start + mini]
            if constant_norm:
                tokens = float(len(idx) * world * cfg.generation.max_new_tokens)
            else:
                tokens = max(actor.all_reduce(exp.mask[idx].sum().double()).item(), 1.0)
            step: dict[str, float] = {}
            for j, s in enumerate(idx.split(micro)):
                st = _micro_step(cfg, actor, critic, exp, s, tokens, world, kl_coef, ptx, (it, updates, j))
                for k, v in st.items():  # every stat is a share of the mini-batch's: they sum to it
                    _add(step, k, v)
            step = {k: actor.all_reduce(torch.tensor(v, dtype=torch.float64)).item() for k, v in step.items()}
            if updates == 0:  # before any update: exactly 1 when rollout and training forwards agree
                first_ratio = step["ratio"]
            for k, v in step.items():
                _add(sums, k, v)
            _add(sums, "grad_norm/actor", actor.grad_norm or 0.0)
            if critic is not None:
                _add(sums, "grad_norm/critic", critic.grad_norm or 0.0)
            updates += 1
            if cfg.kl_stop is not None and step.get("approx_kl", 0.0) > cfg.kl_stop:
                stop = True  # every process sees the same all-reduced value, so all stop together
                break
        if stop:
            break
    out = {k: v / updates for k, v in sums.items()}
    out["ratio_first"] = first_ratio
    out["ppo_updates"] = updates
    out["early_stop"] = float(stop)
    return out


def _micro_step(cfg: PPOConfig, actor: Engine, critic: Engine | None, exp: Experience, s: torch.Tensor,
                tokens: float, world: int, kl_coef: float, ptx, ptx_key: tuple) -> dict[str, float]:
    """One micro-batch (rows ``s``): actor loss backward + step, then the critic's; returns its stats (sums
    over the micro-batch divided by the mini-batch's normaliser ``tokens``)."""
    r_len = exp.mask.shape[1]
    seq, attn, mask = exp.sequences[s], exp.attention_mask[s], exp.mask[s]
    logits = answer_logits(actor, seq, attn, r_len, cfg.generation.temperature)  # (b, R, V)
    logp = gather_log_probs(logits, seq[:, -r_len:])  # (b, R)
    pg, st = rl.policy_loss(logp, exp.old_log_probs[s], exp.advantages[s], mask, cfg.clip_eps, tokens)
    entropy = masked_sum(rl.entropy_from_logits(logits if cfg.entropy_coef else logits.detach()), mask) / tokens
    loss = pg - cfg.entropy_coef * entropy
    st = {**st, "loss/policy": pg, "entropy": entropy}
    if cfg.kl_in == "loss":  # GRPO: + beta * KL(pi || ref) per answer token
        kl_loss = masked_sum(rl.KL_ESTIMATORS[cfg.kl_estimator](logp, exp.ref_log_probs[s]), mask) / tokens
        loss = loss + kl_coef * kl_loss
        st["loss/kl"] = kl_loss
    if ptx is not None:
        ptx_loss = ptx.loss(actor, ptx_key)
        loss = loss + cfg.ptx_coef * ptx_loss
        st["ptx/loss"] = ptx_loss / world  # stats are summed over processes; this one is a per-process mean
    actor.backward(loss * world)  # x world: DeepSpeed averages gradients over processes
    actor.step()
    if critic is not None:
        values = _critic_values(critic, seq, attn, r_len)
        vl, vst = rl.value_loss(values, exp.values[s], exp.returns[s], mask, cfg.value_clip, tokens)
        critic.backward(vl * world)
        critic.step()
        st = {**st, "loss/value": vl, **vst}
    return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in st.items()}


def _add(d: dict, key: str, value: float) -> None:
    d[key] = d.get(key, 0.0) + value


