"""The one-command pipeline (DeepSpeed-Chat's e2e_rlhf.py): SFT -> reward model -> PPO on one base model,
then an evaluation of base, SFT and PPO models on held-out prompts and a run report."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

from chatrlhf.checkpoint import write_json_atomic
from chatrlhf.config import ConfigError
from chatrlhf.pipeline_config import PipelineConfig
from chatrlhf.training import MODEL_SUBDIR, lock_output_dir, write_resolved_config


def _finished(stage_dir: str) -> dict | None:
    """The eval summary of a stage whose model is complete, else None."""
    path = Path(stage_dir) / "eval.json"
    if (Path(stage_dir) / MODEL_SUBDIR / "config.json").exists() and path.exists():
        return json.loads(path.read_text())
    return None


def _refuse_finished(cfg: PipelineConfig, stages) -> None:
    """A finished stage model needs --run.resume or --run.overwrite; checked before anything is written
    (the stage's own check comes after config.yaml is rewritten)."""
    if cfg.run.overwrite or cfg.run.resume:
        return
    done = [s.run.output_dir for _, s, _ in stages if (Path(s.run.output_dir) / MODEL_SUBDIR / "config.json").exists()]
    if done:
        raise ConfigError(f"{', '.join(done)} already hold(s) a finished model. Pass --run.resume true to skip "
                          "finished stages and continue, --run.overwrite true to replace them, or choose another "
                          "--run.output_dir.")


def _stages(cfg: PipelineConfig):
    from chatrlhf.stages.ppo import train_ppo
    from chatrlhf.stages.reward import train_reward_model
    from chatrlhf.stages.sft import train_sft

    sft_cfg, rm_cfg = cfg.stage_configs()
    if cfg.env:  # the environment scores the episodes: no reward model
        sft = [("sft", sft_cfg, train_sft)] if cfg.sft.enabled else []
        return [*sft, (cfg.algo, cfg.rl_config(), train_ppo)]
    if cfg.algo == "dpo":  # preference pairs train the policy directly: no reward model
        from chatrlhf.stages.dpo import train_dpo

        return [("sft", sft_cfg, train_sft), ("dpo", cfg.rl_config(), train_dpo)]
    return [("sft", sft_cfg, train_sft), ("rm", rm_cfg, train_reward_model), (cfg.algo, cfg.rl_config(), train_ppo)]


def _export_feedback(cfg: PipelineConfig, root: Path) -> dict | None:
    """``--feedback.db``: the database -> ``root/feedback/`` (pairs.jsonl is the RM / DPO stage's data).

    Every process exports, before any stage starts: the files are derived data, written atomically, and
    identical on every rank for the same database, so no rank waits for another; ``run_pipeline`` then waits
    for every rank (a barrier), so no rank reads pairs.jsonl while another is still writing it. ``--run.resume`` reuses an earlier complete export
    (export.json present, same database and thresholds, pairs > 0), so an interrupted RM or DPO stage
    resumes on the pairs it started with even if feedback arrived since; otherwise it is exported again.
    """
    feedback = cfg.feedback
    if feedback.db is None:
        return None
    from chatrlhf.feedback.export import export_feedback

    out = root / "feedback"
    flags = {"db": "--feedback.db", "min_margin": "--feedback.min_margin", "min_agreement": "--feedback.min_agreement",
             "overwrite": "--run.overwrite", "output_dir": "--run.output_dir"}
    settings = {"min_margin": feedback.min_margin, "min_agreement": feedback.min_agreement}
    done = out / "export.json"
    if cfg.run.resume and done.is_file():
        earlier = json.loads(done.read_text(encoding="utf-8"))
        same = {k: earlier.get("settings", {}).get(k) for k in settings} == settings  # the pairs' thresholds
        if (earlier.get("db") == str(Path(feedback.db).resolve()) and same
                and earlier.get("counts", {}).get("pairs", 0) > 0):
            print(f"[chatrlhf] feedback: {out} exported before, reused (resume)")
            return earlier
    summary = export_feedback(feedback.db, out, feedback.min_margin, feedback.min_agreement,
                              overwrite=True, flags=flags)
    counts = summary["counts"]
    print(f"[chatrlhf] feedback: {counts['comparisons']} comparisons, {counts['ratings']} ratings -> "
          f"{counts['pairs']} pairs -> {out}")
    return summary


def run_pipeline(cfg: PipelineConfig) -> dict:
    cfg.validate()  # every stage's section: all config errors before the first hour of training, not after it
    stages = _stages(cfg)
    root = Path(cfg.run.output_dir)
    from chatrlhf.engine import init_distributed

    init_distributed()
    lock_output_dir(root)  # each stage locks its own dir as well; this one holds config.yaml and the report
    _refuse_finished(cfg, stages)
    feedback = _export_feedback(cfg, root)  # no surviving pair stops here, before any stage runs
    import torch.distributed as dist

    if dist.get_world_size() > 1:
        dist.barrier()  # every rank's export is complete before any stage reads it
    root.mkdir(parents=True, exist_ok=True)
    write_resolved_config(root, cfg)
    summary: dict = {"seconds": {}, "precision": _precision(cfg)}
    if feedback is not None:
        summary["feedback"] = feedback["counts"]
    for name, stage_cfg, fn in stages:
        done = _finished(stage_cfg.run.output_dir) if cfg.run.resume else None
        if done is not None:
            print(f"[chatrlhf] {name}: complete in {stage_cfg.run.output_dir}, skipped (resume)")
            summary[name] = done
            continue
        print(f"[chatrlhf] stage {name} -> {stage_cfg.run.output_dir}")
        t0 = time.time()
        try:
            summary[name] = fn(stage_cfg)
        except ConfigError as err:
            raise ConfigError(f"stage {name}: {_pipeline_flags(str(err), cfg, name)}") from err
        summary["seconds"][name] = round(time.time() - t0, 1)
    if cfg.eval.enabled and _is_rank_0():
        t0 = time.time()
        summary["evaluation" if not cfg.env else "environment"] = (_evaluate_env if cfg.env else _evaluate)(cfg, root)
        summary["seconds"]["evaluation"] = round(time.time() - t0, 1)
    if _is_rank_0():
        write_json_atomic(root / "summary.json", summary)
        if cfg.eval.enabled:
            from chatrlhf.evaluation import write_report

            report = write_report(root, summary.get("evaluation"), {n: root / n for n, _, _ in stages},
                                  summary.get("environment"))
            print(f"[chatrlhf] run report: {report}")
    return summary


_FROM_PIPELINE = {"model", "data", "run", "reward"}  # a stage's sections that the pipeline's own flags set


def _pipeline_flags(message: str, cfg: PipelineConfig, stage: str) -> str:
    """A stage names its flags as its own command does (``--engine.micro_batch_size``); under ``train`` they
    are the stage section's (``--sft.engine.micro_batch_size``, ``--ppo.actor_engine.learning_rate``)."""
    section = stage if stage in ("sft", "rm") else cfg.rl_section()
    names = {f.name for f in dataclasses.fields(getattr(cfg, section))} - _FROM_PIPELINE
    pattern = re.compile(rf"(?<![\w.-])(?:--)?({'|'.join(sorted(names, key=len, reverse=True))})(?=\.[\w*]|=)")
    return pattern.sub(lambda m: f"--{section}.{m.group(1)}", message)


def _is_rank_0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _precision(cfg) -> dict:
    """The precision every stage resolves (``--run.precision``), with its reason, for summary.json."""
    import torch

    from chatrlhf.precision import resolve_precision

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return resolve_precision(cfg.run.precision, device).summary()


def _evaluate(cfg: PipelineConfig, root: Path) -> dict:
    """Base, SFT and RL models answer the same held-out prompts (same seed); the gold rater judges."""
    from chatrlhf.evaluation import evaluate_models, load_eval_prompts

    # spread: a limit takes prompts from every category (the demo file is sorted by category)
    prompts = load_eval_prompts(cfg.eval.prompts, limit=cfg.eval.limit or None, spread=True)
    models = {"base": cfg.model.name_or_path, "sft": str(root / "sft" / MODEL_SUBDIR),
              cfg.algo: str(root / cfg.algo / MODEL_SUBDIR)}
    print(f"[chatrlhf] evaluating {', '.join(models)} on {len(prompts)} held-out prompts")
    rm = root / "rm" / MODEL_SUBDIR  # absent after SFT -> DPO, unless an earlier run here trained one
    return evaluate_models(models, reference=models["sft"], reward_model=str(rm) if (rm / "config.json").is_file() else None,
                           prompts=prompts, sampling=cfg.eval.generation.sampling(),
                           batch_size=cfg.eval.batch_size, seed=cfg.ppo.actor_engine.seed, out_dir=root,
                           progress=cfg.run.progress, backend=cfg.eval.generation.backend, dtype=cfg.model.dtype)


def _evaluate_env(cfg: PipelineConfig, root: Path) -> dict:
    """Base, SFT and RL models play the environment's held-out rows (``evaluation.environment``)."""
    from chatrlhf.evaluation.environment import env_table, evaluate_environment

    models = {"base": cfg.model.name_or_path, **({"sft": str(root / "sft" / MODEL_SUBDIR)} if cfg.sft.enabled else {}),
              cfg.algo: str(root / cfg.algo / MODEL_SUBDIR)}
    print(f"[chatrlhf] evaluating {', '.join(models)} on --env {cfg.env}'s held-out rows")
    results = evaluate_environment(models, cfg.env, None, limit=cfg.eval.limit or None, k=cfg.eval.env_k,
                                   generation=cfg.eval.generation.sampling(), seed=cfg.grpo.actor_engine.seed,
                                   batch_size=cfg.eval.batch_size, backend=cfg.eval.generation.backend,
                                   dtype=cfg.model.dtype, out_dir=root, progress=cfg.run.progress)
    print(env_table(results), flush=True)
    return results
