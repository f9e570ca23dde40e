"""RLHF with PPO (DeepSpeed-Chat step 3): actor, critic, frozen reference and a reward source.

One iteration: generate (rollouts from the actor's live weights) -> score (old log-probs, reference
log-probs and values in eval mode; the reward source's score) -> advantages (per-token -beta * KL plus the
score at the last answer token, GAE) -> update (PPO epochs over mini-batches: clipped policy loss on the
actor, clipped value loss on the critic) -> log / checkpoint. Every choice is listed in docs/ppo.md.
Tensors over answer positions are (B, R); ``P`` is the (left-padded) prompt width of the rollout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from chatrlhf.algorithms import gather_log_probs, masked_sum, position_ids_from_mask, rl, token_nll
from chatrlhf.checkpoint import complete_checkpoints, load_weights, save_weights, write_json_atomic
from chatrlhf.config import DataConfig, PPOConfig
from chatrlhf.data import PromptCollator, SFTCollator, encode_records, prepare_records
from chatrlhf.data.encode import eos_id
from chatrlhf.engine import Engine, init_distributed
from chatrlhf.models import RewardModel, disable_dropout, load_causal_lm, load_reward_model, load_tokenizer
from chatrlhf.models.loading import resolve_model
from chatrlhf.rewards.sources import RaterSource, RewardBatch, RewardModelSource, build_reward_source
from chatrlhf.rollout import answer_logits, decode_responses, generate
from chatrlhf.training import (
    CHECKPOINTS_SUBDIR,
    MODEL_SUBDIR,
    BatchPlan,
    MetricsLogger,
    prepare_output_dir,
    set_seed,
    total_steps,
    write_resolved_config,
)


@dataclass
class Experience:
    """One rollout batch on this process, ready for the PPO update."""

    sequences: torch.Tensor  # (B, P+R)
    attention_mask: torch.Tensor  # (B, P+R)
    mask: torch.Tensor  # (B, R) float: answer tokens, EOS included
    old_log_probs: torch.Tensor  # (B, R)
    values: torch.Tensor  # (B, R)
    advantages: torch.Tensor  # (B, R)
    returns: torch.Tensor  # (B, R)


@torch.no_grad()
def _score(cfg: PPOConfig, actor: Engine, reference, critic: Engine, reward, ro, rb: RewardBatch):
    """(old log-probs, reference log-probs, values) (B, R) each and the reward's scores (B,).

    The actor and critic run in eval mode (no dropout), so the first PPO ratio is exactly 1.
    """
    seq, attn = ro.sequences, ro.attention_mask
    n, r_len, chunk = seq.shape[0], ro.response_mask.shape[1], cfg.actor_engine.micro_batch_size
    temperature = cfg.generation.temperature
    actor.eval()
    critic.eval()
    old, ref, values = [], [], []
    for i in range(0, n, chunk):
        s, a, answer = seq[i : i + chunk], attn[i : i + chunk], seq[i : i + chunk, -r_len:]
        old.append(gather_log_probs(answer_logits(actor, s, a, r_len, temperature), answer))
        ref.append(gather_log_probs(answer_logits(reference, s, a, r_len, temperature), answer))
        values.append(_critic_values(critic, s, a, r_len))
    actor.train()
    critic.train()
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


class EMA:
    """Exponential moving average of the actor's weights (DeepSpeed-Chat's ``--enable_ema``, beta 0.992)."""

    def __init__(self, engine: Engine, beta: float):
        self.beta = beta
        with engine.gathered_parameters():
            self.shadow = {k: v.detach().clone().float() for k, v in engine.module.state_dict().items()}

    @torch.no_grad()
    def update(self, engine: Engine) -> None:
        with engine.gathered_parameters():
            for k, v in engine.module.state_dict().items():
                self.shadow[k].lerp_(v.detach().float(), 1.0 - self.beta)


def _load_models(cfg: PPOConfig, tokenizer):
    """(actor, reference, critic, reward source): plain modules; the actor and critic get engines later."""
    m = cfg.model
    actor = load_causal_lm(m.name_or_path, dtype=m.dtype, trust_remote_code=m.trust_remote_code,
                           gradient_checkpointing=m.gradient_checkpointing)
    reference = load_causal_lm(cfg.reference or m.name_or_path, dtype=m.dtype,
                               trust_remote_code=m.trust_remote_code).eval().requires_grad_(False)
    reward = build_reward_source(cfg.reward, tokenizer, m.dtype, m.trust_remote_code)
    critic_from = cfg.critic
    if critic_from is None and isinstance(reward, RewardModelSource) and reward.shares_tokenizer:
        critic_from = reward.path
    if critic_from is not None and _is_reward_dir(critic_from):
        critic = load_reward_model(critic_from, dtype=m.dtype, trust_remote_code=m.trust_remote_code)
    else:  # no RM in the actor's vocabulary: the actor's trunk with a fresh value head
        critic = RewardModel.from_causal_lm(critic_from or m.name_or_path, dtype=m.dtype,
                                            trust_remote_code=m.trust_remote_code)
    if cfg.disable_dropout:
        disable_dropout(actor)
        disable_dropout(critic)
    critic.train()
    return actor, reference, critic, reward


class PtxData:
    """PPO-ptx (InstructGPT): LM loss on SFT or pretraining text mixed into the actor's loss.

    Each actor micro-batch draws ``micro_batch_size`` examples from a generator seeded by (iteration,
    update, micro-batch, rank), so a resumed run draws the same ones; the term is that micro-batch's
    token-mean NLL divided by the micro-batches per mini-batch (the mean of micro-batch means).
    """

    def __init__(self, cfg: PPOConfig, tokenizer, rank: int, world: int):
        data = DataConfig(datasets=cfg.ptx_data, data_split="1,0,0", eval_fraction=0.0, seed=cfg.data.seed,
                          max_len=cfg.data.max_len, max_prompt_len=cfg.data.max_prompt_len,
                          long_prompt=cfg.data.long_prompt, bad_rows=cfg.data.bad_rows)
        records, _ = prepare_records(data, kind="sft", phase=1)
        self.items = encode_records(records, "sft", tokenizer, data, progress=False)
        self.collate = SFTCollator(pad_id=tokenizer.pad_token_id)
        self.micro = cfg.actor_engine.micro_batch_size
        self.per_mini = cfg.actor_engine.gradient_accumulation_steps
        self.seed, self.rank = cfg.actor_engine.seed, rank

    def loss(self, actor: Engine, key: tuple[int, int, int]) -> torch.Tensor:
        it, update, j = key
        gen = torch.Generator().manual_seed(hash((self.seed, it, update, j, self.rank)) % 2**62)
        idx = torch.randint(len(self.items), (self.micro,), generator=gen).tolist()
        batch = self.collate([self.items[i] for i in idx])
        mask = batch["attention_mask"]
        logits = actor(input_ids=batch["input_ids"], attention_mask=mask,
                       position_ids=position_ids_from_mask(mask), use_cache=False).logits
        nll, labelled = token_nll(logits, batch["labels"])
        return nll.sum() / labelled.sum().clamp(min=1) / self.per_mini


def _is_reward_dir(path: str) -> bool:
    return (Path(resolve_model(path)) / "chatrlhf_reward.json").is_file()


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
    plan, n_iters, local_samples, mini = _plan(cfg, len(prompts), world, seed)
    ptx = PtxData(cfg, tokenizer, rank, world) if cfg.ptx_coef > 0 else None

    # ---- models and engines ---------------------------------------------------------------------------
    actor_model, reference, critic_model, reward = _load_models(cfg, tokenizer)
    n_updates = n_iters * cfg.ppo_epochs * (local_samples // mini)
    actor = Engine(actor_model, cfg.actor_engine, total_steps=n_updates)
    critic = Engine(critic_model, cfg.critic_engine, total_steps=n_updates)
    kl_ctl = (rl.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target
              else rl.FixedKLController(cfg.kl_coef))
    moments = rl.RunningMoments()
    ema = EMA(actor, cfg.ema_beta) if cfg.ema_beta > 0 else None
    gold = reward if isinstance(reward, RaterSource) else (RaterSource() if cfg.gold_every else None)
    start = _resume(out, actor, critic, cfg, kl_ctl, moments, ema)
    logger = MetricsLogger(out, enabled=actor.is_rank_0)
    if actor.is_rank_0:
        write_resolved_config(out, cfg)
        logger.log(start, {"prompts": len(prompts), "iterations": n_iters, "reward": reward.name}, "data")

    sampling = cfg.generation.sampling()
    eos = [eos_id(tokenizer)]
    bar = tqdm(total=n_iters, initial=start, desc="ppo", disable=not (cfg.run.progress and actor.is_rank_0))
    history: list[dict] = []
    for it in range(start, n_iters):
        t0 = time.time()
        # ---- generate: the actor's live weights, in inference mode -------------------------------------
        epoch, in_epoch = divmod(it, plan.steps_per_epoch)
        (local_idx,) = plan.local_micro_batches(plan.batch(epoch, in_epoch), rank)
        items = [prompts[i] for i in local_idx for _ in range(cfg.samples_per_prompt)]
        batch = collate(items)
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

        # ---- advantages: -beta * KL per token + score at the last answer token, then GAE -----------------
        kl = rl.KL_ESTIMATORS[cfg.kl_estimator](old_logp, ref_logp) * mask
        rewards = rl.shaped_rewards(scores, kl, mask, kl_ctl.value, cfg.reward_clip)
        advantages, returns = rl.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = _whiten_global(actor, advantages, mask)
        exp = Experience(ro.sequences, ro.attention_mask, mask, old_logp, values, advantages, returns)
        n = mask.shape[0]
        t_score = time.time() - t0 - t_gen

        # ---- update: PPO epochs over shuffled mini-batches ----------------------------------------------
        stats = _update(cfg, actor, critic, exp, ptx, it, world)
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
            "value/mean": actor.all_reduce(masked_sum(values, mask).double()).item()
            / max(actor.all_reduce(mask.sum().double()).item(), 1.0),
            **stats,
            "lr/actor": actor.lr,
            "lr/critic": critic.lr,
            "time/generate": t_gen,
            "time/score": t_score,
            "time/iteration": time.time() - t0,
        }
        if gold is reward:  # training on the rater itself: its score is the gold score, no second pass
            row["gold/overall"] = row["reward/score"]
        elif gold is not None and cfg.gold_every and (it + 1) % cfg.gold_every == 0:
            row["gold/overall"] = mean_all(gold(rb))
        history.append(row)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward/score']:.3f}", kl=f"{mean_kl:.3f}")
        done = it + 1
        if done % cfg.run.log_every == 0 or done == n_iters:
            logger.log(done, row)
        if cfg.run.save_every and done % cfg.run.save_every == 0 and done < n_iters:
            _save_checkpoint(out, actor, critic, done, cfg, kl_ctl, moments, ema)
    bar.close()

    # ---- save -------------------------------------------------------------------------------------------
    summary = _save_final(out, actor, critic, ema, tokenizer, history, n_iters, kl_ctl.value)
    logger.close()
    return summary


def _plan(cfg: PPOConfig, n_prompts: int, world: int, seed: int):
    """(prompt plan, iterations, answers per process per iteration, mini-batch per process)."""
    if cfg.rollout_batch_size % world:
        raise ValueError(f"rollout_batch_size={cfg.rollout_batch_size} must be divisible by the {world} processes")
    plan = BatchPlan(n_prompts, cfg.rollout_batch_size // world, 1, world, seed)
    plan.check("ppo")
    local_samples = cfg.rollout_batch_size // world * cfg.samples_per_prompt
    mini = cfg.actor_engine.micro_batch_size * cfg.actor_engine.gradient_accumulation_steps
    if local_samples % mini:
        raise ValueError(
            f"each process gets {local_samples} answers per iteration (rollout_batch_size / processes x "
            f"samples_per_prompt), not a multiple of the mini-batch {mini} (actor_engine.micro_batch_size x "
            "gradient_accumulation_steps); change one of them"
        )
    return plan, total_steps(plan, cfg.epochs, cfg.max_iterations), local_samples, mini


def _save_final(out, actor: Engine, critic: Engine, ema, tokenizer, history: list[dict], n_iters: int,
                kl_coef: float):
    """The actor (``model/``), the critic (``critic/``), the EMA actor (``model_ema/``) and ``eval.json``."""
    actor.save_hf(out / MODEL_SUBDIR, tokenizer)
    critic.save_hf(out / "critic", tokenizer)
    if ema is not None and actor.is_rank_0:
        actor.module.save_pretrained(out / "model_ema", state_dict=ema.shadow)
        tokenizer.save_pretrained(out / "model_ema")
    last = history[-max(1, len(history) // 4):]  # the last quarter of the run
    summary = {k: sum(h[k] for h in last) / len(last) for k in ("reward/score", "kl", "response_length", "gold/overall")
               if last and all(k in h for h in last)}
    summary.update({"stage": "ppo", "iterations": n_iters, "kl_coef": kl_coef})
    if actor.is_rank_0:
        write_json_atomic(out / "eval.json", summary)
    return summary


def _update(cfg: PPOConfig, actor: Engine, critic: Engine, exp: Experience, ptx, it: int, world: int) -> dict:
    """PPO epochs x mini-batches; losses normalised by the answer tokens of the whole mini-batch on all
    processes, so micro-batching, accumulation and data parallelism give the full mini-batch's gradient."""
    micro = cfg.actor_engine.micro_batch_size
    mini = micro * cfg.actor_engine.gradient_accumulation_steps
    n, r_len = exp.mask.shape
    temperature = cfg.generation.temperature
    sums: dict[str, float] = {}
    updates, stop, first_ratio = 0, False, float("nan")
    gen = torch.Generator().manual_seed(cfg.actor_engine.seed + it)  # mini-batch order, resumable
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, mini):
            idx = order[start : start + mini]
            tokens = actor.all_reduce(exp.mask[idx].sum().double()).item()
            tokens = max(tokens, 1.0)
            step: dict[str, float] = {}
            for j, s in enumerate(idx.split(micro)):
                seq, attn, mask = exp.sequences[s], exp.attention_mask[s], exp.mask[s]
                logits = answer_logits(actor, seq, attn, r_len, temperature)  # (b, R, V)
                logp = gather_log_probs(logits, seq[:, -r_len:])
                pg, st = rl.policy_loss(logp, exp.old_log_probs[s], exp.advantages[s], mask, cfg.clip_eps, tokens)
                entropy = masked_sum(rl.entropy_from_logits(logits.detach() if not cfg.entropy_coef else logits),
                                     mask) / tokens
                loss = pg - cfg.entropy_coef * entropy
                if ptx is not None:
                    ptx_loss = ptx.loss(actor, (it, updates, j))
                    loss = loss + cfg.ptx_coef * ptx_loss
                    _add(step, "ptx/loss", ptx_loss.item() / len(idx.split(micro)))
                actor.backward(loss * world)  # x world: DeepSpeed averages gradients over processes
                actor.step()
                values = _critic_values(critic, seq, attn, r_len)
                vl, vst = rl.value_loss(values, exp.values[s], exp.returns[s], mask, cfg.value_clip, tokens)
                critic.backward(vl * world)
                critic.step()
                for key, value in (("loss/policy", pg), ("loss/value", vl), ("entropy", entropy), *st.items(),
                                   *vst.items()):
                    _add(step, key, float(value.detach()) if torch.is_tensor(value) else float(value))
            step = {k: actor.all_reduce(torch.tensor(v, dtype=torch.float64)).item() for k, v in step.items()}
            if updates == 0:  # before any update: exactly 1 when rollout and training forwards agree
                first_ratio = step["ratio"]
            for k, v in step.items():
                _add(sums, k, v)
            sums["grad_norm/actor"] = sums.get("grad_norm/actor", 0.0) + (actor.grad_norm or 0.0)
            sums["grad_norm/critic"] = sums.get("grad_norm/critic", 0.0) + (critic.grad_norm or 0.0)
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


def _add(d: dict, key: str, value: float) -> None:
    d[key] = d.get(key, 0.0) + value


# ---- checkpoints: actor and critic each in their own crash-safe dir; the trainer state rides with the actor


def _save_checkpoint(out, actor, critic, step, cfg, kl_ctl, moments, ema) -> None:
    from chatrlhf.checkpoint import TrainerState

    root = out / CHECKPOINTS_SUBDIR
    if ema is not None and actor.is_rank_0:
        (root / "ema").mkdir(parents=True, exist_ok=True)
        tmp = root / "ema" / f".step-{step}.tmp"
        save_weights(ema.shadow, tmp)
        tmp.replace(root / "ema" / f"step-{step}.safetensors")
    critic.save_checkpoint(root / "critic", step, keep_last=cfg.run.keep_last)
    extra = {"kl_ctl": kl_ctl.state_dict(), "moments": moments.state_dict()}
    actor.save_checkpoint(root / "actor", step, TrainerState(step=step, extra=extra), keep_last=cfg.run.keep_last)


def _resume(out, actor, critic, cfg, kl_ctl, moments, ema) -> int:
    """The iteration to start from: the latest step with complete actor and critic checkpoints."""
    if not cfg.run.resume:
        return 0
    root = out / CHECKPOINTS_SUBDIR
    steps = {s for s, _ in complete_checkpoints(root / "actor")} & {s for s, _ in complete_checkpoints(root / "critic")}
    if not steps:
        print(f"[chatrlhf] --run.resume: no complete checkpoint under {root}; starting at iteration 0")
        return 0
    step = max(steps)
    critic.load_checkpoint(root / "critic" / f"step-{step}")
    state = actor.load_checkpoint(root / "actor" / f"step-{step}")
    kl_ctl.load_state_dict(state.extra["kl_ctl"])
    moments.load_state_dict(state.extra["moments"])
    if ema is not None:
        ema.shadow = load_weights(root / "ema" / f"step-{step}.safetensors")
    print(f"[chatrlhf] resumed PPO from {root} at iteration {step}")
    return step
