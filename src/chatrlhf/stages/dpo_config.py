"""The config of ``chatrlhf dpo`` (``chatrlhf.stages.dpo.train_dpo``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from chatrlhf.config import ConfigError, DataConfig, EngineConfig, ModelConfig, RunConfig, check_epochs


@dataclass
class DPOConfig:
    """Direct preference optimisation (Rafailov et al. 2023) and its IPO / cDPO variants on preference pairs.

    No reward model and no sampling: the policy's summed answer log-probs on chosen and rejected answers,
    against a frozen reference's, enter the loss picked by ``loss``. See docs/dpo.md.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy's starting point (usually the SFT model); also the reference unless ``reference`` is set."""
    reference: str | None = None
    """Frozen reference model (None: the starting model)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Preference pairs; with the demo default, DSC's phase split gives DPO the reward model's share."""
    engine: EngineConfig = field(
        default_factory=lambda: EngineConfig(learning_rate=5e-6, warmup_steps=2, micro_batch_size=4,
                                             gradient_accumulation_steps=2)
    )
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="outputs/dpo"))
    loss: Literal["sigmoid", "ipo", "simpo", "orpo"] = "sigmoid"
    """``sigmoid``: DPO (with ``label_smoothing`` > 0: cDPO); ``ipo``: IPO (Azar et al. 2023); ``simpo``: SimPO
    (Meng et al. 2024) and ``orpo``: ORPO (Hong et al. 2024), both reference-free on each answer's mean
    per-token log-prob (no reference is loaded; the logged log-probs and rewards are per-token means)."""
    beta: float = 0.1
    """Strength of the implicit KL constraint (DPO paper: 0.1; for IPO it sets the target margin 1/(2 beta));
    SimPO's beta (its paper: 2-2.5); ORPO's lambda, the weight of its odds-ratio term (its paper: 0.1)."""
    simpo_gamma: float = 0.5
    """SimPO's target margin gamma (TRL's ``simpo_gamma``: 0.5)."""
    label_smoothing: float = 0.0
    """cDPO: the assumed probability that a pair's label is flipped, in [0, 0.5). Sigmoid loss only."""
    reference_free: bool = False
    """Drop the reference (its log-probs are taken as 0): the loss depends on the policy alone."""
    precompute_reference: bool = True
    """Compute the reference's log-probs for every pair once before training (no reference forward per
    step, and the reference is freed); off: a reference forward per micro-batch."""
    epochs: int = 1
    """Passes over the pairs."""
    max_steps: int = -1
    """Run exactly this many optimizer steps, cycling through epochs as needed (-1: run ``epochs``)."""
    phase: int = 2
    """Which part of ``data.data_split`` this stage trains on (2: the preference-pair phase)."""
    disable_dropout: bool = True
    """Set dropout to 0 in policy and reference, so both see the same deterministic forward."""

    def validate(self, prefix: str = "") -> None:
        """Raises ConfigError naming the flag (``prefix`` is where this config sits, e.g. ``dpo.``)."""
        p = prefix
        self.model.validate(f"{p}model")
        self.engine.validate(f"{p}engine")
        self.run.validate(f"{p}run")
        if self.loss not in ("sigmoid", "ipo", "simpo", "orpo"):
            raise ConfigError(f"--{p}loss must be 'sigmoid' (DPO, cDPO), 'ipo', 'simpo' or 'orpo', got {self.loss!r}")
        if self.loss in ("simpo", "orpo") and (self.reference or self.label_smoothing):
            raise ConfigError(f"--{p}loss {self.loss} is reference-free and has no label smoothing: drop "
                              f"--{p}reference and --{p}label_smoothing")
        if not self.beta > 0:  # also catches NaN
            raise ConfigError(f"--{p}beta must be > 0 (the DPO paper uses 0.1), got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"--{p}label_smoothing must be in [0, 0.5) (the share of flipped labels cDPO "
                              f"assumes), got {self.label_smoothing}")
        if self.loss == "ipo" and self.label_smoothing:
            raise ConfigError(f"--{p}label_smoothing (cDPO) applies to --{p}loss sigmoid only; set "
                              f"--{p}label_smoothing 0 for IPO")
        if self.reference_free and self.reference:
            raise ConfigError(f"--{p}reference_free true uses no reference: drop --{p}reference or set "
                              f"--{p}reference_free false")
        check_epochs(self.epochs, self.max_steps, p)

