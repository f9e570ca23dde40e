"""The config of ``chatrlhf ilql`` (``chatrlhf.stages.ilql.train_ilql``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from chatrlhf.config import (
    ConfigError,
    DataConfig,
    EngineConfig,
    GenerationConfig,
    ModelConfig,
    RunConfig,
    check_epochs,
)


@dataclass
class ILQLConfig:
    """ILQL (Implicit Language Q-Learning, Snell et al. 2022): offline RL from prompt/response/score rows.

    Q and V heads on the LM trunk learn from the scores alone (no sampling, no reward model during training);
    decoding shifts the LM's log-probs by beta (Q - V). Ratings the feedback app collected (``chatrlhf export``'s
    ratings.jsonl) are such data. See docs/ilql.md.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    """The trunk's starting point (usually the SFT model); it is trained too (the behaviour policy)."""
    data: DataConfig = field(default_factory=lambda: DataConfig(data_split="0,0,1"))
    """prompt/response/score rows (the *rating* format), e.g. chatrlhf export's ratings.jsonl (the demo's
    pairs hold no scores: name a rating file)."""
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(learning_rate=5e-5, warmup_steps=5,
                                                                      micro_batch_size=8))
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="outputs/ilql"))
    gamma: float = 0.99
    """Discount of the TD targets r + gamma V(s') (the ILQL paper and trlx: 0.99)."""
    tau: float = 0.7
    """Expectile of the V head's regression on Q (IQL's tau; the ILQL paper and trlx: 0.7). Above 0.5 V tracks
    the better actions of the data: an implicit, in-support max."""
    cql_scale: float = 0.1
    """Weight of the conservative (CQL) term that pushes Q down on tokens the data did not take (trlx: 0.1)."""
    bc_scale: float = 1.0
    """Weight of the LM's next-token loss on the answers, so the trunk stays the behaviour policy pi_beta the
    decoding shifts (trlx's ``awac_scale``: 1)."""
    polyak_alpha: float = 0.01
    """Target Q heads <- (1 - alpha) target + alpha online after each optimizer step (trlx: 0.001 every 5 steps,
    for runs of thousands of steps; 0.01 every step suits short runs)."""
    two_qs: bool = True
    """Two Q heads, with the minimum of their targets in the V loss and in decoding (clipped double Q)."""
    beta: float = 4.0
    """Decoding: log pi_beta(a|s) + beta (Q(s, a) - V(s)); 0 decodes the plain LM. Used by the evaluation."""
    reward: str | None = None
    """Evaluation only: a reward source (the specs of ``chatrlhf grpo --reward``, e.g. ``FILE.py:function``) that
    scores answers decoded from the eval prompts at beta 0 and at ``beta``, before and after training."""
    eval_prompts: int = 32
    """Distinct held-out prompts the reward evaluation decodes (0: none)."""
    eval_prompt_source: str | None = None
    """Where the reward evaluation's prompts come from (any data source; e.g. ``demo:prompts_eval``). None: the
    eval split's rows."""
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(temperature=0.0))
    """How the evaluation decodes (greedy by default)."""
    epochs: int = 1
    """Passes over the rows."""
    max_steps: int = -1
    """Run exactly this many optimizer steps, cycling through epochs as needed (-1: run ``epochs``)."""
    phase: int = 3
    """Which part of ``data.data_split`` this stage trains on (default split ``0,0,1``: all of it)."""
    disable_dropout: bool = True
    """Set dropout to 0 in the trunk."""

    def validate(self, prefix: str = "") -> None:
        p = prefix
        self.model.validate(f"{p}model")
        self.engine.validate(f"{p}engine")
        self.run.validate(f"{p}run")
        self.generation.validate(f"{p}generation")
        if self.model.lora_r or self.engine.zero_stage == 3:
            raise ConfigError(f"--{p}model.lora_r and --{p}engine.zero_stage 3 are not supported by ILQL (its Q heads "
                              "are full layers updated in place by Polyak averaging): use lora_r 0 and zero_stage <= 2")
        if not 0 <= self.gamma <= 1:
            raise ConfigError(f"--{p}gamma must be in [0, 1] (0.99 in the paper), got {self.gamma}")
        if not 0 < self.tau < 1:
            raise ConfigError(f"--{p}tau must be in (0, 1) (0.7 in the paper), got {self.tau}")
        if not 0 < self.polyak_alpha <= 1:
            raise ConfigError(f"--{p}polyak_alpha must be in (0, 1] (1: copy every step), got {self.polyak_alpha}")
        for name in ("cql_scale", "bc_scale", "beta"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"--{p}{name} must be a finite number >= 0, got {value}")
        if self.eval_prompts < 0:
            raise ConfigError(f"--{p}eval_prompts must be >= 0, got {self.eval_prompts}")
        check_epochs(self.epochs, self.max_steps, p)
