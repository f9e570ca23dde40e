"""The config of ``chatrlhf train`` (``chatrlhf.pipeline.run_pipeline``): one section per stage.

``--run.*`` applies to the whole run, ``--sft.*``, ``--rm.*`` and ``--ppo.*`` / ``--grpo.*`` / ``--dpo.*``
to one stage each, ``--eval.*`` to the final evaluation and ``--feedback.*`` to training on human feedback.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from chatrlhf.config import (
    ConfigError,
    DataConfig,
    EngineConfig,
    GenerationConfig,
    ModelConfig,
    RunConfig,
    check_epochs,
    check_filter_flags,
)
from chatrlhf.stages.dpo_config import DPOConfig
from chatrlhf.stages.ppo_config import CriticFreeEstimator, GRPOConfig, PPOConfig
from chatrlhf.stages.reward_config import RMConfig
from chatrlhf.stages.sft_config import SFTConfig

AlgoName = Literal["ppo", "a2c", CriticFreeEstimator, "dpo"]


@dataclass
class PipelineRunConfig:
    """Where the run goes and how it treats earlier work; every stage's ``run`` section follows it."""

    output_dir: str = "outputs/pipeline"
    """Root of the run: sft/, rm/, the RL stage's dir and the run report go under it."""
    overwrite: bool = False
    """Replace finished models from an earlier run in ``output_dir``."""
    resume: bool = False
    """Skip stages whose model is complete and resume the interrupted one from its latest checkpoint."""
    save_every: int = 0
    """Checkpoint every N optimizer steps in each stage (0: only the final model)."""
    progress: bool = True
    """Show progress bars."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Every stage's precision: fp32 (exact), bf16 (mixed: fp32 master weights, bf16 forwards, bf16 rollouts)
    or auto (bf16 where the CPU has amx_bf16 / avx512_bf16 or the GPU supports bf16). See docs/rollout.md."""

    def validate(self, flag: str = "run") -> None:
        if self.save_every < 0:
            raise ConfigError(f"--{flag}.save_every must be >= 0 (0: only at the end), got {self.save_every}")


def _stage_engine() -> EngineConfig:
    return EngineConfig(learning_rate=2e-5, warmup_steps=2, micro_batch_size=4, gradient_accumulation_steps=2)


@dataclass
class SFTSection:
    """The SFT stage of the pipeline (its model, data and run follow the pipeline's)."""

    enabled: bool = True
    """Run the SFT stage (off: the stage after it starts from the base model; only with ``env``, whose RL
    needs no reward model trained on SFT outputs)."""
    engine: EngineConfig = field(default_factory=_stage_engine)
    """Optimisation settings of the SFT stage."""
    epochs: int = 2
    """SFT passes over its share of the data."""
    max_steps: int = -1
    """If > 0, exactly this many SFT steps."""


@dataclass
class RMSection:
    """The reward-model stage of the pipeline."""

    engine: EngineConfig = field(default_factory=_stage_engine)
    """Optimisation settings of the reward-model stage."""
    epochs: int = 1
    """Reward-model passes over its share of the data."""
    max_steps: int = -1
    """If > 0, exactly this many reward-model steps."""
    from_sft: bool = True
    """Initialise the reward model's trunk from the SFT model (InstructGPT; else from the base model)."""


@dataclass
class EvalSection:
    """The evaluation after training: base, SFT and RL models on held-out prompts, and the run report."""

    enabled: bool = True
    """Evaluate and write the run report (off: train only)."""
    prompts: str = "demo"
    """Held-out prompts: ``demo`` (the demo task's eval prompts) or a .jsonl file with a ``prompt`` field
    (optional ``harmful``)."""
    limit: int = 64
    """Evaluate on N held-out prompts spread through the file (0: all)."""
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=96))
    """Sampling for the evaluation answers (the same seed for every model)."""
    batch_size: int = 32
    """Prompts per generation batch."""
    env_k: int = 0
    """With ``env``: sampled episodes per held-out row for pass@k (below 2: greedy pass@1 only)."""

    def validate(self, flag: str = "eval") -> None:
        self.generation.validate(f"{flag}.generation")
        if self.limit < 0:
            raise ConfigError(f"--{flag}.limit must be >= 0 (0: all), got {self.limit}")
        if self.batch_size < 1:
            raise ConfigError(f"--{flag}.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class FeedbackSection:
    """Train the reward model (or DPO) on human feedback collected by ``chatrlhf serve``."""

    db: str | None = None
    """The feedback database (``chatrlhf serve --db``): the RM (or DPO with ``--algo dpo``) trains on the
    pairs exported from it instead of ``data``'s; SFT and the RL prompts still come from ``data.datasets``.
    The export goes to ``run.output_dir/feedback/`` (docs/feedback.md, "Export and training")."""
    min_margin: float = 1.0
    """Ratings: drop pairs of answers whose mean overall scores differ by less than this."""
    min_agreement: float = 1.0
    """The share of votes (comparisons) or of annotators (ratings) that must agree with a pair's direction
    for it to be kept (1.0: any dissent or tie vote drops it)."""

    def validate(self, flag: str = "feedback") -> None:
        if self.db is not None:
            path = Path(self.db)
            if not path.is_file():
                what = "is a directory" if path.is_dir() else "does not exist"
                raise ConfigError(f"--{flag}.db {self.db} {what}. Fix: name the database file `chatrlhf serve "
                                  f"--db` wrote, or leave --{flag}.db unset to train the reward model on data.datasets.")
        check_filter_flags(self.min_margin, self.min_agreement, f"--{flag}.")


def _ppo_defaults() -> PPOConfig:
    return PPOConfig(max_iterations=12, kl_coef=0.1, missing_eos_penalty=0.1,
                     generation=GenerationConfig(max_new_tokens=96),
                     actor_engine=EngineConfig(learning_rate=1.5e-5, micro_batch_size=8, lr_scheduler="constant"),
                     critic_engine=EngineConfig(learning_rate=5e-5, micro_batch_size=8, lr_scheduler="constant"))


def _grpo_defaults() -> GRPOConfig:
    return GRPOConfig(max_iterations=12, rollout_batch_size=8, samples_per_prompt=4, missing_eos_penalty=0.1,
                      generation=GenerationConfig(max_new_tokens=96),
                      actor_engine=EngineConfig(learning_rate=1e-5, micro_batch_size=8, lr_scheduler="constant"))


def _dpo_defaults() -> DPOConfig:
    return DPOConfig(epochs=2, engine=EngineConfig(learning_rate=1.5e-5, warmup_steps=2, micro_batch_size=4,
                                                   gradient_accumulation_steps=2))


@dataclass
class PipelineConfig:
    """One command, DeepSpeed-Chat's e2e: SFT -> reward model -> PPO on one base model, then evaluation.

    Each stage writes to ``run.output_dir/<stage>``; the reward model starts from the SFT model's weights
    (InstructGPT) unless ``rm.from_sft`` is false, in which case it starts from the base model.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model every stage starts from (SFT trains it; the later stages start from the SFT model)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data of every stage, split between them by ``data.data_split``."""
    run: PipelineRunConfig = field(default_factory=PipelineRunConfig)
    algo: AlgoName = "ppo"
    """What follows SFT. ``ppo`` and ``a2c`` run the ``ppo`` section (critic); ``grpo``, ``dr_grpo``, ``rloo``,
    ``reinforce``, ``reinforce_baseline`` and ``reinforce_pp`` run the ``grpo`` section with that advantage
    estimator; all of them train on the reward model of step 2. ``dpo`` runs the ``dpo`` section on
    preference pairs instead and trains no reward model (SFT -> DPO)."""
    sft: SFTSection = field(default_factory=SFTSection)
    rm: RMSection = field(default_factory=RMSection)
    ppo: PPOConfig = field(default_factory=_ppo_defaults)
    """The PPO / A2C stage. Its model, reward, run.output_dir/overwrite/resume/progress are set by the
    pipeline: the actor and reference start from the SFT model and the reward is the trained reward model.
    The defaults fit the CPU demo: 12 iterations of 16 prompts, answers up to 96 tokens (as in the
    evaluation), beta 0.1, learning rates 1.5e-5 / 5e-5, and a cut-off answer loses 0.1 of its score."""
    grpo: GRPOConfig = field(default_factory=_grpo_defaults)
    """The critic-free RL stage (set up by the pipeline as ``ppo``). CPU demo defaults: 12 iterations of 8
    prompts x 4 answers, answers up to 96 tokens, k3 KL in the loss with beta 0.04, learning rate 1e-5."""
    dpo: DPOConfig = field(default_factory=_dpo_defaults)
    """The DPO stage (``--algo dpo``). The policy and reference start from the SFT model; it trains on every
    pair of ``data`` the SFT stage did not use (phases 2 and 3 of ``data_split``: no RM, no RL phase). CPU
    demo defaults: 2 epochs over those pairs, 8 pairs per step, learning rate 1.5e-5, beta 0.1."""
    env: str | None = None
    """RL on an environment (docs/environments.md) instead of a reward model: SFT (on ``data``, e.g. the
    environment's demonstrations), then the RL stage playing the environment on its training rows (the RL
    section's ``data`` when set, else the environment's own), then each model plays its held-out rows. No
    reward model is trained. ``--preset math`` is this with the calculator environment."""
    eval: EvalSection = field(default_factory=EvalSection)
    feedback: FeedbackSection = field(default_factory=FeedbackSection)

    def validate(self) -> None:
        """Checks every section the run uses, naming each flag by its full path (``--sft.engine.*``, ...)."""
        if self.env and self.algo == "dpo":
            raise ConfigError(f"--env {self.env} needs an RL algorithm: --algo grpo (or ppo, rloo, ...), not dpo")
        if not self.sft.enabled and not self.env:
            raise ConfigError("--sft.enabled false is only for --env runs: the reward model and PPO start from SFT")
        self.model.validate("model")
        self.run.validate("run")
        for name in ("sft", "rm"):
            section = getattr(self, name)
            section.engine.validate(f"{name}.engine")
            check_epochs(section.epochs, section.max_steps, f"{name}.")
        # The RL stage's model, reward and run come from the sections checked above; the rest is its own.
        self.rl_config().validate(f"{self.rl_section()}.")
        self.eval.validate("eval")
        self.feedback.validate("feedback")

    def feedback_data(self) -> DataConfig | None:
        """The preference data of the RM (or DPO) stage under ``--feedback.db``: all of the exported
        pairs.jsonl (split ``0,1,0``, read as preference rows, eval held out from it by ``data.eval_fraction``);
        None without it. ``data``'s weights, format and eval sources describe the SFT data, not this file."""
        if self.feedback.db is None:
            return None
        return dataclasses.replace(self.data, datasets=[f"{self.root()}/feedback/pairs.jsonl"],
                                   data_split="0,1,0", weights=None, format="preference", eval_datasets=[])

    def root(self) -> str:
        return self.run.output_dir.rstrip("/")

    def stage_run(self, stage: str, base: RunConfig | None = None) -> RunConfig:
        """A stage's run section: ``base`` (its defaults) with the pipeline's run settings."""
        base = base or RunConfig()
        return dataclasses.replace(base, output_dir=f"{self.root()}/{stage}", overwrite=self.run.overwrite,
                                   resume=self.run.resume, progress=self.run.progress,
                                   precision=self.run.precision, save_every=self.run.save_every or base.save_every)

    def stage_configs(self) -> tuple[SFTConfig, RMConfig]:
        """The SFT and RM configs this pipeline runs (also written beside each stage's outputs)."""
        sft = SFTConfig(model=self.model, data=self.data, engine=self.sft.engine, run=self.stage_run("sft"),
                        epochs=self.sft.epochs, max_steps=self.sft.max_steps)
        rm_model = dataclasses.replace(self.model)
        if self.rm.from_sft:
            rm_model.name_or_path = f"{self.root()}/sft/model"
        rm = RMConfig(model=rm_model, data=self.feedback_data() or self.data, engine=self.rm.engine,
                      run=self.stage_run("rm"), epochs=self.rm.epochs, max_steps=self.rm.max_steps)
        return sft, rm

    def rl_section(self) -> str:
        """The section the stage after SFT reads: ``ppo`` (ppo, a2c), ``dpo``, else ``grpo``."""
        return {"dpo": "dpo", "ppo": "ppo", "a2c": "ppo"}.get(self.algo, "grpo")

    def rl_config(self) -> PPOConfig | DPOConfig:
        """The stage after SFT (``algo``), starting from the SFT model; RL stages use the trained RM."""
        from chatrlhf.algorithms.advantages import estimator_for_algo
        from chatrlhf.data.split import parse_split

        model = dataclasses.replace(self.model, name_or_path=f"{self.root()}/sft/model")
        if not self.sft.enabled:
            model = dataclasses.replace(self.model)
        base = getattr(self, self.rl_section())
        run = self.stage_run(self.algo, base.run)
        if self.algo == "dpo":
            # No reward model and no RL phase: DPO trains on every pair SFT did not use (phases 2 and 3 of
            # data_split; phase 1, and so the SFT stage's data, is unchanged).
            sft, rm, rl = parse_split(self.data.data_split)
            data = self.feedback_data() or dataclasses.replace(self.data, data_split=f"{sft},{rm + rl},0")
            return dataclasses.replace(self.dpo, model=model, data=data, run=run)
        if self.env:
            return dataclasses.replace(base, model=model, reward="", env=self.env, run=run, data=self._env_data(base),
                                       advantage_estimator=estimator_for_algo(self.algo))
        return dataclasses.replace(base, model=model, reward=f"{self.root()}/rm/model", run=run,
                                   advantage_estimator=estimator_for_algo(self.algo))

    def _env_data(self, base: PPOConfig) -> DataConfig:
        """The RL section's prompts; left at their default (the demo prompts), the environment's own rows."""
        from chatrlhf.environments import load_environment
        from chatrlhf.stages.ppo_config import _prompt_data

        own = getattr(load_environment(self.env), "train_data", None)
        if base.data != _prompt_data() or own is None:
            return base.data
        return dataclasses.replace(base.data, datasets=[own])
