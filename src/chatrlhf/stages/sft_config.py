"""The config of ``chatrlhf sft`` (``chatrlhf.stages.sft.train_sft``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from chatrlhf.config import DataConfig, EngineConfig, ModelConfig, RunConfig, check_epochs


@dataclass
class SFTConfig:
    """Supervised fine-tuning: loss on assistant tokens only (each turn's end-of-turn token included)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(learning_rate=2e-5, warmup_steps=5))
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="outputs/sft"))
    epochs: int = 2
    """Passes over the training records."""
    max_steps: int = -1
    """Run exactly this many optimizer steps, cycling through epochs as needed (-1: run ``epochs``)."""
    phase: int = 1
    """Which part of ``data.data_split`` this stage trains on (DeepSpeed-Chat: 1 = SFT)."""

    def validate(self, prefix: str = "") -> None:
        """Raises ConfigError naming the flag (``prefix`` is where this config sits)."""
        self.model.validate(f"{prefix}model")
        self.engine.validate(f"{prefix}engine")
        self.run.validate(f"{prefix}run")
        check_epochs(self.epochs, self.max_steps, prefix)
