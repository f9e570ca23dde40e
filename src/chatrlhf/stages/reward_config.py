"""The config of ``chatrlhf rm`` (``chatrlhf.stages.reward.train_reward_model``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from chatrlhf.config import ConfigError, DataConfig, EngineConfig, ModelConfig, RunConfig, check_epochs


@dataclass
class RMConfig:
    """Reward model: pairwise (Bradley-Terry) from preference pairs, or a pointwise ratings classifier."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(learning_rate=2e-5, warmup_steps=5))
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="outputs/rm"))
    objective: Literal["pairwise", "ratings"] = "pairwise"
    """pairwise: -log sigmoid(r_chosen - r_rejected) on preference data; ratings: a K-way classifier of
    pointwise scores (e.g. 1-5) whose expected score is the reward."""
    num_levels: int = 5
    """Rating levels for ``objective=ratings``; scores must be integers 1..num_levels."""
    epochs: int = 1
    """Passes over the training records."""
    max_steps: int = -1
    """Run exactly this many optimizer steps, cycling through epochs as needed (-1: run ``epochs``)."""
    phase: int = 2
    """Which part of ``data.data_split`` this stage trains on (DeepSpeed-Chat: 2 = reward model)."""

    def validate(self, prefix: str = "") -> None:
        """Raises ConfigError naming the flag (``prefix`` is where this config sits)."""
        self.model.validate(f"{prefix}model")
        self.engine.validate(f"{prefix}engine")
        self.run.validate(f"{prefix}run")
        check_epochs(self.epochs, self.max_steps, prefix)
        if self.num_levels < 2:
            raise ConfigError(f"--{prefix}num_levels must be >= 2, got {self.num_levels}")
