"""The one-command pipeline (DeepSpeed-Chat's e2e_rlhf.py): SFT -> reward model on one base model."""

from __future__ import annotations

import json
from pathlib import Path

from chatrlhf.checkpoint import write_json_atomic
from chatrlhf.config import PipelineConfig
from chatrlhf.stages.reward import train_reward_model
from chatrlhf.stages.sft import train_sft
from chatrlhf.training import MODEL_SUBDIR, write_resolved_config


def _finished(stage_dir: str) -> dict | None:
    """The eval summary of a stage whose model is complete, else None."""
    path = Path(stage_dir) / "eval.json"
    if (Path(stage_dir) / MODEL_SUBDIR / "config.json").exists() and path.exists():
        return json.loads(path.read_text())
    return None


def run_pipeline(cfg: PipelineConfig) -> dict:
    sft_cfg, rm_cfg = cfg.stage_configs()
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    write_resolved_config(root, cfg)
    summary: dict = {}
    for name, stage_cfg, fn in (("sft", sft_cfg, train_sft), ("rm", rm_cfg, train_reward_model)):
        done = _finished(stage_cfg.run.output_dir) if cfg.resume else None
        if done is not None:
            print(f"[chatrlhf] {name}: complete in {stage_cfg.run.output_dir}, skipped (resume)")
            summary[name] = done
            continue
        print(f"[chatrlhf] stage {name} -> {stage_cfg.run.output_dir}")
        summary[name] = fn(stage_cfg)
    write_json_atomic(root / "summary.json", summary)
    return summary
