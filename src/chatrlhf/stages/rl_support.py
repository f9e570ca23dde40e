"""Pieces the RL loop in ``stages/ppo.py`` uses around its phases: model loading, the EMA actor, PPO-ptx
data, the iteration plan, and saving/resuming. Each is orchestration around the loop, not math."""

from __future__ import annotations

from pathlib import Path

import torch

from chatrlhf import engine as engine_lib
from chatrlhf.algorithms import position_ids_from_mask, token_nll
from chatrlhf.checkpoint import (
    CheckpointError,
    TrainerState,
    latest_checkpoint,
    load_weights,
    save_weights,
    write_json_atomic,
)
from chatrlhf.config import DataConfig
from chatrlhf.data import SFTCollator, encode_records, prepare_records
from chatrlhf.engine import Engine
from chatrlhf.models import RewardModel, apply_lora, disable_dropout, load_causal_lm, load_reward_model
from chatrlhf.models.loading import resolve_model
from chatrlhf.models.lora import merged_for_save
from chatrlhf.rewards.sources import RewardModelSource, build_reward_source
from chatrlhf.stages.ppo_config import PPOConfig
from chatrlhf.training import (
    CHECKPOINTS_SUBDIR,
    MODEL_SUBDIR,
    BatchPlan,
    check_resume_layout,
    nothing_to_resume,
    total_steps,
)


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


def load_models(cfg: PPOConfig, tokenizer, with_critic: bool):
    """(actor, reference, critic or None, reward source): plain modules; the actor and critic get engines later."""
    m = cfg.model
    actor = apply_lora(load_causal_lm(m.name_or_path, dtype=m.dtype, trust_remote_code=m.trust_remote_code,
                                      gradient_checkpointing=m.gradient_checkpointing), m)
    reference = load_causal_lm(cfg.reference or m.name_or_path, dtype=m.dtype,
                               trust_remote_code=m.trust_remote_code).eval().requires_grad_(False)
    reward = build_reward_source(cfg.reward, tokenizer, m.dtype, m.trust_remote_code,
                                 normalize_sources=cfg.normalize_sources)
    if cfg.disable_dropout:
        disable_dropout(actor)
    if not with_critic:
        return actor, reference, None, reward
    critic_from = cfg.critic
    if critic_from is None and isinstance(reward, RewardModelSource) and reward.shares_tokenizer:
        critic_from = reward.path
    if critic_from is not None and _is_reward_dir(critic_from):
        critic = load_reward_model(critic_from, dtype=m.dtype, trust_remote_code=m.trust_remote_code)
    else:  # no RM in the actor's vocabulary: the actor's trunk with a fresh value head
        critic = RewardModel.from_causal_lm(critic_from or m.name_or_path, dtype=m.dtype,
                                            trust_remote_code=m.trust_remote_code)
    if m.gradient_checkpointing:
        critic.gradient_checkpointing_enable()
    critic = apply_lora(critic, m)  # like the actor's: adapters on the trunk, the value head in full
    if cfg.disable_dropout:
        disable_dropout(critic)
    critic.train()
    return actor, reference, critic, reward


def place_frozen(cfg: PPOConfig, reference, reward, device):
    """The reference, and the model of every reward-model source, placed as ``cfg`` asks (see FrozenModel)."""
    for source in getattr(reward, "sources", [reward]):
        if isinstance(source, RewardModelSource):
            source.model = engine_lib.FrozenModel(source.model, cfg.reward_placement, device)
    return engine_lib.FrozenModel(reference, cfg.reference_placement, device)


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


def save_final(out, actor: Engine, critic: Engine | None, ema, tokenizer, history: list[dict], n_iters: int,
               kl_coef: float, estimator: str):
    """The actor (``model/``), the critic (``critic/``), the EMA actor (``model_ema/``) and ``eval.json``."""
    actor.save_hf(out / MODEL_SUBDIR, tokenizer)
    if critic is not None:
        critic.save_hf(out / "critic", tokenizer)
    if ema is not None and actor.is_rank_0:
        model, state = merged_for_save(actor.module, ema.shadow)  # LoRA: the averaged adapters merged in
        model.save_pretrained(out / "model_ema", state_dict=state)
        tokenizer.save_pretrained(out / "model_ema")
    last = history[-max(1, len(history) // 4):]  # the last quarter of the run
    summary = {k: sum(h[k] for h in last) / len(last) for k in ("reward/score", "kl", "response_length", "gold/overall")
               if last and all(k in h for h in last)}
    summary.update({"stage": "ppo" if estimator == "gae" else estimator, "advantage_estimator": estimator, "iterations": n_iters, "kl_coef": kl_coef})
    if actor.is_rank_0:
        write_json_atomic(out / "eval.json", summary)
    return summary


def _engines(actor: Engine, critic: Engine | None) -> dict[str, Engine]:
    return {"actor": actor} if critic is None else {"actor": actor, "critic": critic}


def save_checkpoint(out, actor: Engine, critic: Engine | None, step: int, cfg: PPOConfig, stateful: dict,
                    ema, mini: int) -> None:
    """One crash-safe checkpoint per iteration: ``actor/`` and ``critic/`` engine state, the EMA weights
    (``ema.safetensors``) and ``stateful`` (name -> object with ``state_dict``: the KL controller, reward
    normalisers) in the trainer state, all committed together."""
    extra = {name: obj.state_dict() for name, obj in stateful.items()}
    state = TrainerState(step=step, extra=extra, world_size=actor.world_size, global_batch=mini * actor.world_size)

    def write_ema(directory: Path) -> None:
        if ema is not None:
            save_weights(ema.shadow, directory / "ema.safetensors")

    engine_lib.save_checkpoint(out / CHECKPOINTS_SUBDIR, step, _engines(actor, critic), state, cfg.run.keep_last,
                               write_extra=write_ema)


def resume(out, actor: Engine, critic: Engine | None, cfg: PPOConfig, stateful: dict, ema, mini: int) -> int:
    """The iteration to start from: 0, or that of the latest complete checkpoint on ``--run.resume``."""
    if not cfg.run.resume:
        return 0
    root = out / CHECKPOINTS_SUBDIR
    path = latest_checkpoint(root)
    if path is None:
        nothing_to_resume(out, cfg.run)
        return 0
    check_resume_layout(path, actor.world_size, mini * actor.world_size)
    state = engine_lib.load_checkpoint(path, _engines(actor, critic))
    for name, obj in stateful.items():
        if name not in state.extra:
            raise CheckpointError(f"{path / 'trainer_state.json'} has no {name!r} state; it was written by "
                                  "a run with other settings (reward, KL controller); resume with the same ones")
        obj.load_state_dict(state.extra[name])
    if ema is not None:
        if not (path / "ema.safetensors").is_file():
            raise CheckpointError(f"{path} has no ema.safetensors: it was written without --ema_beta; resume "
                                  "with the same --ema_beta as the run that wrote it")
        ema.shadow = load_weights(path / "ema.safetensors", device=actor.device)
    print(f"[chatrlhf] resumed RL from {path} at iteration {state.step}")
    return state.step
