"""The models of an RL run besides the loop: the actor, the frozen reference, the critic and the reward
source loaded for ``stages/ppo.py``, the frozen ones placed on or off the device, and the EMA of the actor."""

from __future__ import annotations

from pathlib import Path

import torch

from chatrlhf.engine import Engine, FrozenModel
from chatrlhf.models import RewardModel, apply_lora, disable_dropout, load_causal_lm, load_reward_model
from chatrlhf.models.loading import resolve_model
from chatrlhf.rewards.factory import build_reward_source
from chatrlhf.stages.ppo_config import PPOConfig


def _is_reward_dir(path: str) -> bool:
    return (Path(resolve_model(path)) / "chatrlhf_reward.json").is_file()


def load_models(cfg: PPOConfig, tokenizer, with_critic: bool):
    """(actor, reference, critic or None, reward source): plain modules; the actor and critic get engines later."""
    m = cfg.model
    actor = apply_lora(load_causal_lm(m.name_or_path, dtype=m.dtype, trust_remote_code=m.trust_remote_code,
                                      gradient_checkpointing=m.gradient_checkpointing), m)
    reference = load_causal_lm(cfg.reference or m.name_or_path, dtype=m.dtype,
                               trust_remote_code=m.trust_remote_code).eval().requires_grad_(False)
    if cfg.env:  # the environment's rewards: read from each episode, no model to load
        from chatrlhf.stages.ppo_env import EnvironmentScores

        reward = EnvironmentScores(cfg.env)
    else:
        reward = build_reward_source(cfg.reward, tokenizer, m.dtype, m.trust_remote_code,
                                     normalize_sources=cfg.normalize_sources)
    if cfg.disable_dropout:
        disable_dropout(actor)
    if not with_critic:
        return actor, reference, None, reward
    return actor, reference, load_critic(cfg, reward), reward


def load_critic(cfg: PPOConfig, reward) -> RewardModel:
    """The critic: the reward model (``--critic``, or the reward source's when it shares the actor's
    tokenizer), else the actor's trunk with a fresh value head."""
    m = cfg.model
    critic_from = cfg.critic
    if critic_from is None:
        critic_from = reward.critic_init
    if critic_from is not None and _is_reward_dir(critic_from):
        critic = load_reward_model(critic_from, dtype=m.dtype, trust_remote_code=m.trust_remote_code)
    else:  # no RM in the actor's vocabulary: the actor's trunk with a fresh value head
        critic = RewardModel.from_causal_lm(critic_from or m.name_or_path, dtype=m.dtype,
                                            trust_remote_code=m.trust_remote_code)
    critic.packing = cfg.critic_engine.packing
    if m.gradient_checkpointing:
        critic.gradient_checkpointing_enable()
    critic = apply_lora(critic, m)  # like the actor's: adapters on the trunk, the value head in full
    if cfg.disable_dropout:
        disable_dropout(critic)
    critic.train()
    return critic


def place_frozen(cfg: PPOConfig, reference, reward, device, dtype: torch.dtype | None = None) -> FrozenModel:
    """The reference, and the model of every reward-model source, cast to ``dtype`` if given (bf16 in mixed
    precision) and placed as ``cfg`` asks (see FrozenModel)."""
    cast = (lambda m: m.to(dtype)) if dtype is not None else (lambda m: m)  # noqa: E731
    for source in reward.sources:
        if source.needs_placement:
            source.model = FrozenModel(cast(source.model), cfg.reward_placement, device)
    return FrozenModel(cast(reference), cfg.reference_placement, device)


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
