"""The config of ``chatrlhf ppo`` and ``chatrlhf grpo`` (``chatrlhf.stages.ppo.train_ppo`` runs both)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from chatrlhf.config import ConfigError, DataConfig, EngineConfig, GenerationConfig, ModelConfig, RunConfig

CriticFreeEstimator = Literal["reinforce", "reinforce_baseline", "rloo", "grpo", "dr_grpo", "reinforce_pp"]
"""The advantage estimators that need no critic (``chatrlhf.algorithms.advantages.ADVANTAGE_ESTIMATORS``)."""
EstimatorName = Literal["gae", "a2c", CriticFreeEstimator]
"""Every advantage estimator; ``gae`` (PPO) and ``a2c`` train a critic."""


def _prompt_data() -> DataConfig:
    return DataConfig(datasets=["demo:prompts_train"], data_split="0,0,1", eval_fraction=0.0)


@dataclass
class PPOConfig:
    """RLHF with PPO (DeepSpeed-Chat step 3): actor, critic, frozen reference and a reward source.

    Defaults marked DSC are DeepSpeed-Chat's; the rest are chosen for a short CPU run and say why.
    See docs/ppo.md for every implementation detail.
    """

    # --- Models and reward -------------------------------------------------------------------------------
    model: ModelConfig = field(default_factory=ModelConfig)
    """The actor's starting point (the SFT model); it is also the frozen reference unless ``reference`` is set."""
    reference: str | None = None
    """Reference model for the KL penalty (None: the actor's starting model)."""
    critic: str | None = None
    """Critic initialisation. None: the reward model when ``reward`` is one sharing the actor's tokenizer
    (DSC), else the actor's trunk with a fresh value head."""
    reward: str = ""
    """Reward source: a reward-model dir, ``encoder:DIR``, ``rater``, ``similarity`` (MiniLM cosine to the
    row's reference answer), ``FILE.py:function`` / ``package.module:function`` (rewards as code),
    ``http://HOST:PORT/PATH`` (a remote scorer, e.g. ``chatrlhf serve-reward``), or a weighted ensemble of these
    joined by ``+`` (``0.7*outputs/rm/model + 0.3*rater``). See docs/rewards.md."""
    env: str | None = None
    """An environment to play instead of answering once (docs/environments.md): ``math``, ``calculator``,
    ``dialog``, ``FILE.py:Name`` or ``package.module:Name``. Each prompt row starts an episode; the
    environment's rewards replace ``reward``, which must then be unset."""
    env_max_turns: int | None = None
    """Policy turns per episode (None: the environment's own ``max_turns``)."""
    env_max_tokens: int | None = None
    """Tokens per episode, prompt and every turn included (None: the environment's own ``max_total_tokens``)."""
    normalize_sources: bool = True
    """In an ensemble, normalise each source by its own running mean/std before weighting (so weights
    mean shares, whatever each source's scale)."""
    reference_placement: Literal["device", "cpu", "zero3"] = "device"
    """Where the frozen reference lives: ``device`` (a copy on each process's device), ``cpu`` (CPU memory,
    brought to the device once per scoring pass: DeepSpeed-Chat's ``--offload_reference_model``) or ``zero3``
    (sharded over the processes, 1/N each, gathered layer by layer)."""
    reward_placement: Literal["device", "cpu", "zero3"] = "device"
    """The same for a reward-model reward source (``reward`` a model dir)."""
    # --- Prompts and rollouts ----------------------------------------------------------------------------
    data: DataConfig = field(default_factory=_prompt_data)
    """Prompts; the demo default is the shipped prompt set, all of it for this phase."""
    phase: int = 3
    """Which part of ``data.data_split`` this stage uses (DSC: 3 = RLHF)."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """How rollouts are sampled; the log-probs use the same temperature."""
    rollout_batch_size: int = 16
    """Prompts per PPO iteration over all processes (each gets ``samples_per_prompt`` answers)."""
    samples_per_prompt: int = 1
    """Answers sampled per prompt."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling (Yu et al. 2025; verl's ``filter_groups``), for the group estimators (rloo,
    grpo, dr_grpo): a group of answers to one prompt whose rewards are all equal (zero advantage) is dropped
    and other prompts are sampled in further rounds until each process holds its share of
    ``rollout_batch_size`` groups that differ, or ``max_sampling_rounds`` have run (docs/rl.md)."""
    max_sampling_rounds: int = 3
    """With ``dynamic_sampling``: the most generation rounds per iteration, the first included (verl's
    ``max_num_gen_batches``). When they run out, all-equal groups fill the missing places (``sampling/filled``)."""
    epochs: int = 1
    """Passes over the prompts."""
    max_iterations: int = -1
    """If > 0, exactly this many PPO iterations (rollout + update), cycling over the prompts."""
    # --- Reward shaping and KL ---------------------------------------------------------------------------
    kl_in: Literal["reward", "loss"] = "reward"
    """Where the KL to the reference goes: per-token ``-kl_coef * KL`` in the reward (DSC, InstructGPT) or
    ``+kl_coef * KL`` added to the policy loss (GRPO)."""
    kl_coef: float = 0.1
    """Initial beta of the KL penalty (DSC: 0.1, fixed): with ``kl_in=reward`` each answer token's reward
    gets -beta * KL(pi || pi_ref); with ``kl_in=loss`` +beta * KL is added to the policy loss instead."""
    kl_estimator: Literal["k1", "k2", "k3", "k3+"] = "k1"
    """Per-token KL estimate, in the reward or the loss as ``kl_in`` says: k1 = log pi - log pi_ref (DSC),
    k2 = half its square, k3 = the non-negative one (Schulman's blog, "Approximating KL divergence"), k3+ =
    k3's value with k2's unbiased gradient (verl's ``k3+``; in the loss)."""
    kl_clamp: float | None = None
    """Clamp each token's KL estimate to +-this (verl: 10) in the reward and the loss; None: no clamp."""
    kl_target: float | None = None
    """With a target, beta adapts toward this KL (Ziegler et al. 2019; ``kl_target_of`` says which); None:
    fixed beta."""
    kl_target_of: Literal["answer", "token"] = "answer"
    """The KL ``kl_target`` refers to: the mean per-answer sum (Ziegler et al. 2019) or the per-token mean over
    all answer tokens (what OpenRLHF's and verl's adaptive controllers are fed: copy their targets with this)."""
    kl_horizon: int = 10000
    """Adaptive-KL horizon in samples (Ziegler et al.: 10000)."""
    reward_clip: float | None = 5.0
    """Clip the sequence score to +-this before it enters the reward (DSC: 5)."""
    normalize_reward: bool = False
    """Normalise scores by running mean/std over all rollouts so far."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of an answer cut off at ``max_new_tokens`` without EOS (0 = off)."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment (0 = off): an answer longer than ``max_new_tokens`` minus this many tokens
    loses up to ``overlong_penalty``, linearly in the tokens past that point (verl's ``overlong_buffer.len``)."""
    overlong_penalty: float = 1.0
    """The most ``overlong_buffer`` takes off a score (at ``max_new_tokens`` tokens)."""
    # --- Advantages --------------------------------------------------------------------------------------
    advantage_estimator: EstimatorName = "gae"
    """How advantages are computed (docs/rl.md): ``gae`` (PPO) and ``a2c`` train a critic; ``reinforce``
    (return-to-go), ``reinforce_baseline`` (minus the batch-mean return), ``rloo`` (leave-one-out group
    mean), ``grpo`` (group-normalised), ``dr_grpo`` (group mean only, constant loss normaliser) and
    ``reinforce_pp`` (REINFORCE++: return-to-go, whitened over the batch) need no critic. The group
    estimators need ``samples_per_prompt`` >= 2."""
    gamma: float = 1.0
    """GAE discount (DSC: 1.0)."""
    lam: float = 0.95
    """GAE lambda (DSC: 0.95)."""
    whiten_advantages: bool | None = None
    """Normalise advantages over the rollout batch (mean 0, std 1 over answer tokens of all processes).
    None: the estimator's own choice (on for gae, a2c and reinforce_pp; off for the others, whose
    advantages are already centred or must stay unbiased)."""
    # --- Update ------------------------------------------------------------------------------------------
    actor_engine: EngineConfig = field(
        default_factory=lambda: EngineConfig(learning_rate=5e-6, micro_batch_size=8, lr_scheduler="constant")
    )
    """Actor optimisation. One mini-batch = micro_batch_size x gradient_accumulation_steps x processes."""
    critic_engine: EngineConfig = field(
        default_factory=lambda: EngineConfig(learning_rate=2e-5, micro_batch_size=8, lr_scheduler="constant")
    )
    """Critic optimisation; its micro-batch and accumulation must equal the actor's (same mini-batches)."""
    ppo_epochs: int = 1
    """Optimisation passes over each rollout batch (DSC: 1)."""
    clip_eps: float = 0.2
    """PPO ratio clip (DSC: 0.2): the ratio is clipped to [1 - clip_eps, 1 + clip_eps_high]."""
    clip_eps_high: float | None = None
    """Upper clip range when it differs from the lower (DAPO's clip-higher: 0.28 with clip_eps 0.2; verl's
    ``clip_ratio_high``, TRL's ``epsilon_high``); None: clip_eps."""
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = (
        "token-mean")
    """How the per-token policy, entropy and KL-in-loss terms become one loss (verl's ``loss_agg_mode``): the
    mean over the mini-batch's answer tokens (DSC, OpenRLHF); the mean over answers of each answer's token mean
    (TRL's ``grpo`` loss type, the GRPO paper); of each answer's token sum; of each answer's token sum over
    ``max_new_tokens`` (Dr. GRPO). Counted over the whole mini-batch on all processes."""
    ratio_level: Literal["token", "sequence"] = "token"
    """The importance ratio per token (PPO) or per answer, the geometric mean of its tokens' ratios (GSPO,
    Zheng et al. 2025: with ``--loss_agg seq-mean-token-mean --clip_eps 3e-4 --clip_eps_high 4e-4``)."""
    dual_clip: float | None = None
    """Dual-clip PPO's C > 1 (Ye et al. 2020; verl's ``clip_ratio_c``, 3 there by default): where the advantage
    is negative the per-token loss is capped at -A * C; None: off (DSC, OpenRLHF's default)."""
    value_clip: float | None = 0.2
    """Value clip around the rollout's values (DSC: 0.2; OpenRLHF 0.5); None: unclipped."""
    entropy_coef: float = 0.0
    """Entropy bonus on the actor loss (0 = off, as in DSC)."""
    kl_stop: float | None = None
    """Stop an iteration's PPO epochs early once the mean approximate KL(old || new) exceeds this."""
    disable_dropout: bool = True
    """Set the actor's and critic's dropout to 0, so the first PPO ratio is exactly 1 (as OpenRLHF/TRL)."""
    tis_cap: float = 2.0
    """Truncated importance sampling: when the rollout engine's numeric form differs from the trainer's (bf16
    copy or vLLM), each token's policy loss is weighted by min(p_train / p_rollout, tis_cap) (Yao et al. 2025;
    2 as there). 0 = off. Exact fp32 rollouts from the live weights need no correction and get none."""
    # --- Extras ------------------------------------------------------------------------------------------
    ptx_coef: float = 0.0
    """PPO-ptx (InstructGPT): add ptx_coef x LM loss on ``ptx_data`` to the actor loss (0 = off)."""
    ptx_data: list[str] = field(default_factory=list)
    """SFT/pretraining text sources for PPO-ptx (same syntax as ``data.datasets``); empty: the SFT phase of
    ``data`` is not used, so set this when ptx_coef > 0."""
    ema_beta: float = 0.0
    """Keep an EMA of the actor's weights with this decay, saved to ``model_ema`` (DSC: 0.992; 0 = off)."""
    gold_every: int = 1
    """Also score rollouts with the simulated rater every N iterations (0 = never): the gold reward of the
    over-optimisation plot. Not used for training."""

    # --- Outputs -----------------------------------------------------------------------------------------
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="outputs/ppo", eval_at_start=False))

    def validate(self, prefix: str = "") -> None:
        """Raises ConfigError naming the flag (``prefix`` is where this config sits, e.g. ``ppo.``)."""
        self.model.validate(f"{prefix}model")
        self.actor_engine.validate(f"{prefix}actor_engine")
        self.critic_engine.validate(f"{prefix}critic_engine")
        self.run.validate(f"{prefix}run")
        self.generation.validate(f"{prefix}generation")
        self._validate_sampling(prefix)
        self._validate_rollouts(prefix)
        self._validate_shaping(prefix)
        self._validate_loss(prefix)

    def _validate_loss(self, p: str) -> None:
        from chatrlhf.algorithms.advantages import ADVANTAGE_ESTIMATORS

        if self.env and self.overlong_buffer:
            raise ConfigError(f"--{p}overlong_buffer counts one answer's tokens against max_new_tokens: an "
                              f"environment's episodes take several turns (--{p}env {self.env}); leave it 0")
        if ADVANTAGE_ESTIMATORS[self.advantage_estimator].constant_normalizer and self.loss_agg != "token-mean":
            raise ConfigError(f"--{p}advantage_estimator {self.advantage_estimator} fixes the loss's normaliser "
                              f"(answers x max_new_tokens): leave --{p}loss_agg at token-mean, not {self.loss_agg}")

    def _validate_rollouts(self, p: str) -> None:
        from chatrlhf.algorithms.advantages import ADVANTAGE_ESTIMATORS

        if not self.reward and not self.env:
            raise ConfigError(f"--{p}reward is required: a reward-model dir (from `chatrlhf rm`), 'rater', "
                              "'encoder:DIR', 'FILE.py:function' or 'http://HOST:PORT/PATH' "
                              "(or play an environment: --env)")
        if self.reward and self.env:
            raise ConfigError(f"--{p}env {self.env} gives the rewards: unset --{p}reward ({self.reward!r}), or score "
                              "with it inside the environment's step")
        for name in ("env_max_turns", "env_max_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{p}{name} must be >= 1 (or null for the environment's own), "
                                  f"got {getattr(self, name)}")
        estimator = ADVANTAGE_ESTIMATORS[self.advantage_estimator]
        a, c = self.actor_engine, self.critic_engine
        batching = ("micro_batch_size", "gradient_accumulation_steps", "max_tokens_per_micro_batch")
        if estimator.critic and any(getattr(a, k) != getattr(c, k) for k in batching):
            raise ConfigError(
                f"--{p}critic_engine.micro_batch_size / gradient_accumulation_steps / max_tokens_per_micro_batch "
                f"({'/'.join(str(getattr(c, k)) for k in batching)}) must equal the actor's "
                f"({'/'.join(str(getattr(a, k)) for k in batching)}): both train on the same micro-batches"
            )
        for name in ("rollout_batch_size", "samples_per_prompt", "ppo_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{p}{name} must be >= 1, got {getattr(self, name)}")
        if estimator.grouped and self.samples_per_prompt < 2:
            raise ConfigError(
                f"--{p}advantage_estimator {self.advantage_estimator} compares answers to the same prompt: set "
                f"--{p}samples_per_prompt >= 2 (got {self.samples_per_prompt}; GRPO uses 4-64)"
            )
        if self.epochs < 1 and self.max_iterations < 1:
            raise ConfigError(f"set --{p}epochs >= 1 or --{p}max_iterations >= 1 "
                              f"(got {self.epochs} and {self.max_iterations})")

    def _validate_sampling(self, p: str) -> None:
        from chatrlhf.algorithms.advantages import ADVANTAGE_ESTIMATORS

        if self.max_sampling_rounds < 1:
            raise ConfigError(f"--{p}max_sampling_rounds must be >= 1 (1: no extra rounds), got "
                              f"{self.max_sampling_rounds}")
        if not self.dynamic_sampling:
            return
        if not ADVANTAGE_ESTIMATORS[self.advantage_estimator].grouped:
            grouped = ", ".join(n for n, e in ADVANTAGE_ESTIMATORS.items() if e.grouped)
            raise ConfigError(f"--{p}dynamic_sampling drops groups whose rewards are all equal, which only the group "
                              f"estimators ({grouped}) give zero advantage: set --{p}advantage_estimator to one "
                              f"of them (got {self.advantage_estimator}) or --{p}dynamic_sampling false")
        if self.samples_per_prompt < 2:
            raise ConfigError(f"--{p}dynamic_sampling drops groups of answers to one prompt whose rewards are all "
                              f"equal: set --{p}samples_per_prompt >= 2 (got {self.samples_per_prompt})")

    def _validate_shaping(self, p: str) -> None:
        if self.kl_target is not None and self.kl_target <= 0:
            raise ConfigError(f"--{p}kl_target must be > 0 (or null for a fixed kl_coef), got {self.kl_target}")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ConfigError(f"--{p}ptx_coef > 0 needs --{p}ptx_data: the SFT or pretraining sources to mix in")
        if not self.tis_cap >= 0:
            raise ConfigError(f"--{p}tis_cap must be >= 0 (0 = off), got {self.tis_cap}")
        if not 0 <= self.ema_beta < 1:
            raise ConfigError(f"--{p}ema_beta must be in [0, 1), got {self.ema_beta}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"--{p}{name} must be in [0, 1], got {getattr(self, name)}")
        rules = {  # name -> (holds, rule); None means off for the optional ones
            "kl_coef": (self.kl_coef >= 0, ">= 0 (0: no KL term)"),
            "clip_eps": (self.clip_eps > 0, "> 0 (e.g. 0.2)"),
            "clip_eps_high": (self.clip_eps_high is None or self.clip_eps_high > 0, "> 0 (e.g. 0.28), or null"),
            "kl_clamp": (self.kl_clamp is None or self.kl_clamp > 0, "> 0 (e.g. 10), or null for no clamp"),
            "dual_clip": (self.dual_clip is None or self.dual_clip > 1, "> 1 (e.g. 3), or null for no dual clip"),
            "value_clip": (self.value_clip is None or self.value_clip > 0, "> 0, or null for no value clipping"),
            "reward_clip": (self.reward_clip is None or self.reward_clip > 0, "> 0, or null for no clipping"),
            "kl_stop": (self.kl_stop is None or self.kl_stop > 0, "> 0, or null for no early stop"),
            "ptx_coef": (self.ptx_coef >= 0, ">= 0 (0: no pretraining loss)"),
            "missing_eos_penalty": (self.missing_eos_penalty >= 0, ">= 0 (subtracted from a cut-off answer's score)"),
            "overlong_buffer": (0 <= self.overlong_buffer <= self.generation.max_new_tokens,
                                f"in [0, --{p}generation.max_new_tokens = {self.generation.max_new_tokens}] (0: off)"),
            "overlong_penalty": (self.overlong_penalty >= 0, ">= 0"),
        }
        for name, (holds, rule) in rules.items():
            if not holds:
                raise ConfigError(f"--{p}{name} must be {rule}, got {getattr(self, name)}")


@dataclass
class GRPOConfig(PPOConfig):
    """On-policy RL without a critic, with GRPO's defaults (DeepSeekMath; Shao et al. 2024): several answers
    per prompt, group-normalised advantages, the k3 KL to the reference in the loss. Every advantage
    estimator of ``chatrlhf ppo`` is available here too (``--advantage_estimator rloo`` ...)."""

    advantage_estimator: EstimatorName = "grpo"
    """See ``chatrlhf ppo``; ``grpo`` here."""
    samples_per_prompt: int = 4
    """Answers per prompt: the group each answer is compared with."""
    rollout_batch_size: int = 8
    """Prompts per iteration over all processes (x samples_per_prompt answers)."""
    kl_in: Literal["reward", "loss"] = "loss"
    """GRPO puts the KL in the loss, not the reward."""
    kl_estimator: Literal["k1", "k2", "k3", "k3+"] = "k3"
    """GRPO's unbiased, non-negative estimator (Schulman's k3)."""
    kl_coef: float = 0.04
    """GRPO's beta (DeepSeekMath: 0.04), on the KL term of the loss."""
    reward_clip: float | None = None
    """No clip by default (TRL, verl): the group normalisation already sets the advantages' scale, and a clip
    at DSC's 5 would flatten differences between large scores within a group. Set it to clip as ``ppo`` does."""
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="outputs/grpo", eval_at_start=False))
