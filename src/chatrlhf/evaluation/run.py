"""``chatrlhf eval``: evaluate saved models on held-out prompts and write the report, outside the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from chatrlhf.config import ConfigError, GenerationConfig, ModelLoadConfig


@dataclass
class EvalConfig:
    """Held-out evaluation: gold-rater scores, win-rates, RM score and KL of saved models, and a report."""

    model: ModelLoadConfig = field(default_factory=ModelLoadConfig)
    """The model to evaluate (its ``dtype`` applies to every model loaded here)."""
    name: str = "model"
    """The model's name in the report and the win-rate table (e.g. ``ppo``)."""
    baselines: dict[str, str] = field(default_factory=dict)
    """Models to compare it with, in order, name -> HF dir or built-in name, e.g.
    ``{base: smollm2-135m-instruct, sft: out/sft/model}``. The model comes last; consecutive models are
    compared (sft vs base, model vs sft) and the last with the first."""
    reference: str | None = None
    """Reference model for the KL column (PPO's frozen reference: the SFT model). None: no KL."""
    reward_model: str | None = None
    """Reward-model dir for the RM-score column. None: no RM score."""
    prompts: str = "demo"
    """``demo`` (the 120 shipped held-out prompts) or a .jsonl file of {"id", "prompt", "harmful"} rows."""
    limit: int | None = None
    """Use only N prompts (None: all)."""
    spread: bool = True
    """With ``limit``: take the N prompts evenly spaced through the file rather than the first N, so a file
    sorted by category (the demo's is) keeps its mix of categories, harmful prompts included."""
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=96))
    """How answers are sampled. At temperature 1 (top_p 1, top_k 0) the KL column estimates
    KL(policy || reference); a cut answer is rated as truncated."""
    seed: int = 0
    """Sampling seed, the same for every model so the comparison is fair."""
    batch_size: int = 16
    """Prompts per generation batch (also rows per scoring forward)."""
    max_prompt_len: int = 256
    """Prompts longer than this keep their last tokens."""
    env: str | None = None
    """Also play an environment (docs/environments.md): ``math``, ``calculator``, ``dialog`` or a code spec;
    each model's accuracy (greedy pass@1, sampled pass@k), tool-call success, turns and tokens per episode
    and its win-rate over the model before it go to ``env_eval.json`` and the report."""
    env_data: str | None = None
    """The environment's held-out rows (None: its own, e.g. ``demo:math_eval``); ``limit`` applies."""
    env_k: int = 4
    """Sampled episodes per row for pass@k (at ``generation``'s temperature); below 2: greedy only."""
    gold: bool = True
    """Rate answers to ``prompts`` with the gold rater (off: only the environment, when one is given)."""
    output_dir: str = "outputs/eval"
    """Where eval_models.json, samples.jsonl, report.md and plots/ go."""
    progress: bool = True
    """Show progress."""

    def validate(self) -> None:
        self.model.validate("model")
        if not self.name or self.name in self.baselines:
            raise ConfigError(f"--name {self.name!r} must be non-empty and differ from the --baselines names "
                              f"({', '.join(self.baselines) or 'none'})")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be >= 1 (or null for all), got {self.limit}")
        self.generation.validate("generation")
        if self.batch_size < 1:
            raise ConfigError(f"--batch_size must be >= 1, got {self.batch_size}")
        if not self.gold and not self.env:
            raise ConfigError("--gold false leaves nothing to evaluate: give --env, or keep --gold true")

    def models(self) -> dict[str, str]:
        """Name -> model, in the order the report compares them: the baselines, then the model."""
        return {**self.baselines, self.name: self.model.name_or_path}


def run_eval(cfg: EvalConfig) -> dict:
    """Evaluates ``cfg.model`` beside ``cfg.baselines`` and writes ``output_dir/{eval_models.json, samples.jsonl, report.md}``."""
    from chatrlhf.evaluation.evaluate import evaluate_models
    from chatrlhf.evaluation.prompts import load_eval_prompts
    from chatrlhf.evaluation.report import write_report

    cfg.validate()
    out = Path(cfg.output_dir)
    results = None
    if cfg.gold:
        results = evaluate_models(
            cfg.models(),
            reference=cfg.reference,
            reward_model=cfg.reward_model,
            prompts=load_eval_prompts(cfg.prompts, cfg.limit, spread=cfg.spread),
            sampling=cfg.generation.sampling(),
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            out_dir=out,
            progress=cfg.progress,
            backend=cfg.generation.backend,
            dtype=cfg.model.dtype,
            max_prompt_len=cfg.max_prompt_len,
        )
    env_results = run_env_eval(cfg, out) if cfg.env else None
    report = write_report(out, results, {}, env_results)
    print(f"[chatrlhf] eval: report in {report}")
    return {**(results or {}), **({"environment": env_results} if env_results else {})}


def run_env_eval(cfg: EvalConfig, out: Path) -> dict:
    """The environment part of ``chatrlhf eval`` (``evaluation.environment``), printed as a table."""
    from chatrlhf.evaluation.environment import env_table, evaluate_environment

    results = evaluate_environment(cfg.models(), cfg.env, cfg.env_data, limit=cfg.limit, k=cfg.env_k,
                                   generation=cfg.generation.sampling(), seed=cfg.seed, batch_size=cfg.batch_size,
                                   backend=cfg.generation.backend, dtype=cfg.model.dtype, out_dir=out,
                                   progress=cfg.progress)
    print(env_table(results), flush=True)
    return results
