"""What an RL run builds once, before its first iteration: the processes, the prompts and the iteration
plan, the models and their engines, the KL controller, the reward normaliser and the EMA actor, gathered in
``RLRun`` for the phases of ``stages/ppo.py``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from chatrlhf.algorithms import rl
from chatrlhf.algorithms.advantages import ADVANTAGE_ESTIMATORS, Estimator
from chatrlhf.data import PromptCollator, encode_records, prepare_records
from chatrlhf.data.micro_batches import RowSize, even_out, split
from chatrlhf.engine import Engine, FrozenModel, init_distributed
from chatrlhf.environments import Environment, load_environment
from chatrlhf.models import load_tokenizer
from chatrlhf.models.loading import resolve_model
from chatrlhf.precision import announce
from chatrlhf.rewards.sources import RaterSource
from chatrlhf.rollout import ActorRollouts, resolve_backend
from chatrlhf.stages.ppo_config import PPOConfig
from chatrlhf.stages.ppo_models import EMA, load_models, place_frozen
from chatrlhf.stages.ppo_ptx import PtxData
from chatrlhf.training import BatchPlan, prepare_output_dir, set_seed, total_steps


@dataclass
class RLRun:
    """What every phase of every iteration reads, built once by ``setup_run``."""

    cfg: PPOConfig
    rank: int
    world: int
    out: Path
    tokenizer: object
    prompts: list[dict]  # encoded prompts
    collate: PromptCollator
    plan: BatchPlan  # which prompts each iteration draws
    n_iters: int
    mini: int  # mini-batch per process (micro_batch_size x gradient_accumulation_steps)
    estimator: Estimator
    actor: Engine
    critic: Engine | None  # None for critic-free estimators
    reference: FrozenModel
    reward: object  # the reward source: RewardBatch -> (B,) scores
    gold: RaterSource | None  # the gold rater logged beside the proxy reward
    kl_ctl: rl.FixedKLController | rl.AdaptiveKLController
    moments: rl.RunningMoments  # the running reward normaliser
    ema: EMA | None
    ptx: PtxData | None
    stateful: dict  # name -> object with state_dict, saved with every checkpoint
    rollouts: ActorRollouts  # how the actor generates: live weights, a bf16 copy or vLLM
    env: Environment | None = None  # the environment played (``--env``); None: one answer per prompt

    @property
    def reuse_update_logprobs(self) -> bool:
        """One optimizer step per rollout batch and no KL in the reward: the old log-probs are then the update
        forward's own (detached, taken before the step), so scoring skips its actor forward."""
        local_samples = self.cfg.rollout_batch_size // self.world * self.cfg.samples_per_prompt
        return self.cfg.ppo_epochs == 1 and self.mini == local_samples and self.cfg.kl_in == "loss"

    @property
    def tis_cap(self) -> float:
        """The truncated-importance-sampling cap in force (0: none; the rollouts are the trainer's own form)."""
        return self.cfg.tis_cap if self.rollouts.differs else 0.0

    @property
    def whiten(self) -> bool:
        return self.estimator.whiten if self.cfg.whiten_advantages is None else self.cfg.whiten_advantages


def rollout_micro_batches(run: RLRun, attention_mask: torch.Tensor, rows: torch.Tensor) -> list[torch.Tensor]:
    """``rows`` (indices into this process's rollout) longest first, cut into micro-batches of the actor's
    ``micro_batch_size`` rows or ``max_tokens_per_micro_batch`` positions (``chatrlhf.data.micro_batches``);
    the same count on every process (one all-gather)."""
    engine = run.cfg.actor_engine
    tokens, width = attention_mask[rows].sum(-1).tolist(), attention_mask.shape[1]
    sizes = [RowSize(n, width) for n in tokens]
    groups = split(range(len(sizes)), sizes, engine.micro_batch_size, engine.max_tokens_per_micro_batch,
                   engine.packing)
    count = int(run.actor.all_gather(torch.tensor([len(groups)])).max())
    return [rows[group] for group in even_out(groups, count, sizes, engine.packing)]


def setup_run(cfg: PPOConfig) -> RLRun:
    """Processes, output dir, prompts, the iteration plan, models and engines, KL controller, EMA."""
    rank, world = init_distributed()
    out = prepare_output_dir(cfg.run)
    seed = cfg.actor_engine.seed
    set_seed(seed)
    tokenizer = load_tokenizer(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    records, _ = prepare_records(cfg.data, kind="prompt", phase=cfg.phase)
    env = load_environment(cfg.env) if cfg.env else None
    if env is not None:
        from chatrlhf.stages.ppo_env import check_rows

        check_rows(env, cfg.env, records)
    prompts = encode_records(records, "prompt", tokenizer, cfg.data, progress=False)
    plan, n_iters, local_samples, mini = plan_iterations(cfg, len(prompts), world, seed)
    ptx = PtxData(cfg, tokenizer, rank, world) if cfg.ptx_coef > 0 else None
    estimator = ADVANTAGE_ESTIMATORS[cfg.advantage_estimator]
    actor_model, reference, critic_model, reward = load_models(cfg, tokenizer, with_critic=estimator.critic)
    n_updates = n_iters * cfg.ppo_epochs * (local_samples // mini)
    actor = Engine(actor_model, cfg.actor_engine, total_steps=n_updates, precision=cfg.run.precision,
                   flag="actor_engine")
    critic = (Engine(critic_model, cfg.critic_engine, total_steps=n_updates, precision=actor.precision,
                     flag="critic_engine")
              if estimator.critic else None)
    reference = place_frozen(cfg, reference, reward, actor.device,
                             actor.precision.compute_dtype if actor.precision.mixed else None)
    rollouts = _rollouts(cfg, actor, rank, env)
    kl_ctl = (rl.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target
              else rl.FixedKLController(cfg.kl_coef))
    moments = rl.RunningMoments()
    stateful = {"kl_ctl": kl_ctl, "moments": moments, **_reward_state(reward, actor)}
    ema = EMA(actor, cfg.ema_beta) if cfg.ema_beta > 0 else None
    # The gold rater judges single answers; an environment's episodes are judged by the environment.
    gold = reward if reward.is_gold_judge else (RaterSource() if cfg.gold_every and env is None else None)
    return RLRun(cfg, rank, world, out, tokenizer, prompts, PromptCollator(pad_id=tokenizer.pad_token_id), plan,
                 n_iters, mini, estimator, actor, critic, reference, reward, gold, kl_ctl, moments, ema, ptx,
                 stateful, rollouts, env)


def _rollouts(cfg: PPOConfig, actor: Engine, rank: int, env: Environment | None) -> ActorRollouts:
    """The actor's generation form, chosen (and announced) from the precision and ``--generation.backend``."""
    backend, why = resolve_backend(cfg.generation.backend, actor.precision)
    max_len = cfg.data.max_prompt_len + cfg.generation.max_new_tokens
    if env is not None:  # an episode's last turn sees the whole conversation
        max_len = max(max_len, cfg.env_max_tokens or env.max_total_tokens)

    def build(backend: str) -> ActorRollouts:
        return ActorRollouts(actor, backend, actor.precision, model_dir=resolve_model(cfg.model.name_or_path),
                             max_model_len=max_len,
                             seed=cfg.actor_engine.seed, trust_remote_code=cfg.model.trust_remote_code)

    try:
        rollouts = build(backend)
    except ValueError as err:  # a model vLLM cannot run (e.g. a head size its CPU attention lacks)
        if cfg.generation.backend != "auto":
            raise
        backend, why = "native", f"auto: vLLM cannot run this model ({err}) -> native engine"
        rollouts = build(backend)
    if rank == 0:
        announce(actor.precision)
        print(f"[chatrlhf] rollouts: {backend} backend, {rollouts.form} form ({why})", flush=True)
    return rollouts


def plan_iterations(cfg: PPOConfig, n_prompts: int, world: int, seed: int):
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


def _reward_state(reward, actor: Engine) -> dict:
    """An ensemble's per-source normalisers: fed from all processes and saved with the checkpoints."""
    if not reward.has_state:
        return {}
    reward.gather = actor.all_gather
    return {"reward": reward}
