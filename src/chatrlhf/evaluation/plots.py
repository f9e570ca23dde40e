"""Training-curve plots for the run report, from the stages' ``metrics.jsonl`` files.

matplotlib's object API with the Agg canvas only (``Figure`` + ``FigureCanvasAgg``): no pyplot, no global
backend switch, no display needed, safe on headless machines and inside other programs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

Series = tuple[list[float], list[float]]  # (steps, values)


def read_metrics(path: Path) -> tuple[list[dict], list[str]]:
    """Rows of a ``metrics.jsonl`` plus notes about what could not be read (never raises).

    A missing file gives no rows and a note; a line that is not a JSON object (e.g. the half-written last
    line of a killed run) is skipped and counted in a note.
    """
    if not path.is_file():
        return [], [f"`{path}` not found: its plots are skipped."]
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
        else:
            bad += 1
    notes = [f"`{path}`: {bad} unreadable line(s) skipped."] if bad else []
    return rows, notes


def series(rows: list[dict], key: str) -> Series:
    """(steps, values) of ``key`` sorted by step, finite numbers only.

    A resumed run appends to metrics.jsonl, so a step can appear twice; the last row for a step wins
    (it is the one the run continued from). Example: rows with (step, key) (1, 0.5), (2, 0.7), (1, 0.4)
    -> ([1, 2], [0.4, 0.7]).
    """
    by_step: dict[float, float] = {}
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            by_step[row["step"]] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _new_figure(n_panels: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(
        figsize=(6.4 * min(n_panels, 2), 3.6 * math.ceil(n_panels / 2)), dpi=100, layout="constrained"
    )
    FigureCanvasAgg(fig)
    return fig


def _plot(ax, s: Series, label: str, **kw) -> None:
    ax.plot(s[0], s[1], label=label, linewidth=1.2, marker="." if len(s[0]) < 30 else None, **kw)


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


RL_STAGES = ("ppo", "a2c", "grpo", "dr_grpo", "rloo", "reinforce", "reinforce_baseline", "reinforce_pp")
"""Stage names of the on-policy RL loop (stages/ppo.py): every advantage estimator logs the same metric names."""
PREFERENCE_STAGES = ("dpo",)
"""Stage names of the offline preference loop (stages/dpo.py)."""
STAGE_TITLES = {"ppo": "PPO", "a2c": "A2C", "grpo": "GRPO", "dr_grpo": "Dr. GRPO", "rloo": "RLOO",
                "reinforce": "REINFORCE", "reinforce_baseline": "REINFORCE with baseline",
                "reinforce_pp": "REINFORCE++", "dpo": "DPO", "sft": "SFT", "rm": "RM"}


def stage_title(stage: str) -> str:
    """The name a stage goes by in titles: ``grpo`` -> ``GRPO``; an unknown name is shown as it is."""
    return STAGE_TITLES.get(stage, stage)


def plot_rl_reward(rows: list[dict], out: Path, stage: str = "ppo") -> Path | None:
    """Reward score (and the KL-penalised total) per step of an RL stage; None when neither was logged."""
    score, total = series(rows, "train/reward/score"), series(rows, "train/reward/total")
    if not score[0] and not total[0]:
        return None
    name = stage_title(stage)
    fig = _new_figure()
    ax = fig.add_subplot()
    for s, label in ((score, "reward score"), (total, "total (score - beta * KL)")):
        if s[0]:
            _plot(ax, s, label)
    ax.set(xlabel=f"{name} step", ylabel="reward", title=f"{name} reward")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, out)


def plot_rl_kl(rows: list[dict], out: Path, stage: str = "ppo") -> Path | None:
    """KL to the reference and the KL coefficient beta per step of an RL stage, one panel each."""
    kl, beta = series(rows, "train/kl"), series(rows, "train/kl_coef")
    name = stage_title(stage)
    panels = [
        (s, t) for s, t in ((kl, f"{name}: KL to reference (per answer)"), (beta, f"{name}: KL coefficient beta"))
        if s[0]
    ]
    return _step_panels(panels, name, out)


def _step_panels(panels: list[tuple[Series, str]], name: str, out: Path) -> Path | None:
    """One panel per (series, title) against the stage's step, side by side; None when there are none."""
    if not panels:
        return None
    fig = _new_figure(len(panels))
    for i, (s, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        _plot(ax, s, title)
        ax.set(xlabel=f"{name} step", title=title)
        ax.grid(alpha=0.3)
    return _save(fig, out)


def plot_gold_vs_proxy(rows: list[dict], out: Path, stage: str = "ppo") -> Path | None:
    """Gold-rater overall and reward score on twin axes; the proxy rising while gold falls is
    over-optimisation of the reward model (Gao et al. 2022, reward-model over-optimization)."""
    gold, proxy = series(rows, "train/gold/overall"), series(rows, "train/reward/score")
    if not gold[0] or not proxy[0]:
        return None
    name = stage_title(stage)
    fig = _new_figure()
    ax = fig.add_subplot()
    _plot(ax, proxy, "reward score (proxy)", color="tab:blue")
    ax.set(xlabel=f"{name} step", title=f"{name}: gold rater vs reward")
    ax.set_ylabel("reward score (proxy)", color="tab:blue")
    ax2 = ax.twinx()
    _plot(ax2, gold, "gold overall", color="tab:orange")
    ax2.set_ylabel("gold overall (0-1)", color="tab:orange")
    ax.grid(alpha=0.3)
    return _save(fig, out)


def plot_env(rows: list[dict], out: Path, stage: str = "grpo") -> Path | None:
    """An RL stage playing an environment: accuracy (when the environment judges answers), turns and tool
    calls per episode, one panel each; None when no environment was played."""
    name = stage_title(stage)
    wanted = [(f"{name}: accuracy", "train/env/accuracy"), (f"{name}: turns per episode", "train/env/turns"),
              (f"{name}: tool calls per episode", "train/env/tool_calls")]
    panels = [(s, title) for s, title in ((series(rows, key), title) for title, key in wanted) if s[0]]
    return _step_panels(panels, name, out)


def plot_preference(rows: list[dict], out: Path, stage: str = "dpo") -> Path | None:
    """A preference stage's train and eval curves: loss, implicit-reward margin and reward accuracy (the share
    of pairs whose chosen answer gets the higher implicit reward), one panel each; None when none was logged."""
    name = stage_title(stage)
    wanted = [
        (f"{name} loss", "loss", "loss"),
        (f"{name} reward margin (chosen - rejected)", "rewards/margin", "beta * h"),
        (f"{name} reward accuracy", "rewards/accuracy", "share of pairs"),
    ]
    panels = []
    for title, key, ylabel in wanted:
        curves = [(f"{split}/{key}", series(rows, f"{split}/{key}")) for split in ("train", "eval")]
        curves = [(k, s) for k, s in curves if s[0]]
        if curves:
            panels.append((title, ylabel, curves))
    if not panels:
        return None
    fig = _new_figure(len(panels))
    cols = min(len(panels), 2)
    for i, (title, ylabel, curves) in enumerate(panels):
        ax = fig.add_subplot(math.ceil(len(panels) / cols), cols, i + 1)
        for key, s in curves:
            _plot(ax, s, key)
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        ax.legend()
        ax.grid(alpha=0.3)
    return _save(fig, out)


def _loss_panels(stage_rows: dict[str, list[dict]]) -> list[tuple[str, list[tuple[str, Series]]]]:
    """(title, curves) per panel: each stage's train + eval loss; an RL stage's policy, value (and ptx) losses
    apart, since their scales differ by orders of magnitude."""
    wanted = []
    for stage in stage_rows:
        if stage in RL_STAGES:
            wanted += [
                (f"{stage} policy loss", stage, ("train/loss/policy",)),
                (f"{stage} value loss", stage, ("train/loss/value",)),
                (f"{stage} pretraining (ptx) loss", stage, ("train/ptx/loss",)),
            ]
        else:
            wanted.append((f"{stage} loss", stage, ("train/loss", "eval/loss")))
    panels = []
    for title, stage, keys in wanted:
        curves = [(k, series(stage_rows[stage], k)) for k in keys]
        curves = [(k, s) for k, s in curves if s[0]]
        if curves:
            panels.append((title, curves))
    return panels


def plot_losses(stage_rows: dict[str, list[dict]], out: Path) -> Path | None:
    """One panel per loss: each stage's train (and eval) loss; an RL stage's policy and value losses apart."""
    panels = _loss_panels(stage_rows)
    if not panels:
        return None
    fig = _new_figure(len(panels))
    cols = min(len(panels), 2)
    for i, (title, curves) in enumerate(panels):
        ax = fig.add_subplot(math.ceil(len(panels) / cols), cols, i + 1)
        for key, s in curves:
            _plot(ax, s, key)
        ax.set(xlabel="step", ylabel="loss", title=title)
        ax.legend()
        ax.grid(alpha=0.3)
    return _save(fig, out)
