"""The config of ``chatrlhf kto`` (``chatrlhf.stages.kto.train_kto``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from chatrlhf.config import ConfigError, DataConfig, EngineConfig, ModelConfig, RunConfig, check_epochs


@dataclass
class KTOConfig:
    """KTO (Ethayarajh et al. 2024) on unpaired answers, each labelled desirable or undesirable.

    What thumbs up/down and 1-5 ratings give, with no pairing: prompt/response/label rows (``chatrlhf export``
    writes them from the feedback app), or preference pairs, split into a desirable chosen and an undesirable
    rejected answer. Against a frozen reference, like DPO. See docs/dpo.md.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy's starting point (usually the SFT model); also the reference unless ``reference`` is set."""
    reference: str | None = None
    """Frozen reference model (None: the starting model)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Unpaired answers (prompt/response/label) or preference pairs (each gives two answers)."""
    engine: EngineConfig = field(
        default_factory=lambda: EngineConfig(learning_rate=5e-6, warmup_steps=2, micro_batch_size=4,
                                             gradient_accumulation_steps=2)
    )
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="outputs/kto"))
    beta: float = 0.1
    """Strength of the implicit KL constraint (the KTO paper and TRL: 0.1)."""
    desirable_weight: float = 1.0
    """lambda_D, the weight of a desirable answer's loss. The paper advises lambda_D n_D / (lambda_U n_U) in
    [1, 4/3] (n: the number of answers of each label); the run logs both counts."""
    undesirable_weight: float = 1.0
    """lambda_U, the weight of an undesirable answer's loss."""
    epochs: int = 1
    """Passes over the answers."""
    max_steps: int = -1
    """Run exactly this many optimizer steps, cycling through epochs as needed (-1: run ``epochs``)."""
    phase: int = 2
    """Which part of ``data.data_split`` this stage trains on (2: the preference phase)."""
    disable_dropout: bool = True
    """Set dropout to 0 in policy and reference, so both see the same deterministic forward."""

    def validate(self, prefix: str = "") -> None:
        """Raises ConfigError naming the flag (``prefix`` is where this config sits)."""
        p = prefix
        self.model.validate(f"{p}model")
        self.engine.validate(f"{p}engine")
        self.run.validate(f"{p}run")
        if not self.beta > 0:  # also catches NaN
            raise ConfigError(f"--{p}beta must be > 0 (the KTO paper uses 0.1), got {self.beta}")
        for name in ("desirable_weight", "undesirable_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"--{p}{name} must be a finite number > 0 (default 1), got {value}")
        check_epochs(self.epochs, self.max_steps, p)
