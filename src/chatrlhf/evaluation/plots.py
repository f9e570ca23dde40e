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


def plot_ppo_reward(rows: list[dict], out: Path) -> Path | None:
    """Reward-model score (and the KL-penalised total) per PPO step; None when neither was logged."""
    score, total = series(rows, "train/reward/score"), series(rows, "train/reward/total")
    if not score[0] and not total[0]:
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    for s, label in ((score, "RM score"), (total, "total (score - beta * KL)")):
        if s[0]:
            _plot(ax, s, label)
    ax.set(xlabel="PPO step", ylabel="reward", title="PPO reward")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, out)


def plot_ppo_kl(rows: list[dict], out: Path) -> Path | None:
    """KL to the reference and the KL coefficient beta per PPO step, one panel each."""
    kl, beta = series(rows, "train/kl"), series(rows, "train/kl_coef")
    panels = [
        (s, t) for s, t in ((kl, "KL to reference (per answer)"), (beta, "KL coefficient beta")) if s[0]
    ]
    if not panels:
        return None
    fig = _new_figure(len(panels))
    for i, (s, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        _plot(ax, s, title)
        ax.set(xlabel="PPO step", title=title)
        ax.grid(alpha=0.3)
    return _save(fig, out)


def plot_gold_vs_proxy(rows: list[dict], out: Path) -> Path | None:
    """Gold-rater overall and RM score on twin axes; the proxy rising while gold falls is
    over-optimisation of the reward model (Gao et al. 2022, reward-model over-optimization)."""
    gold, proxy = series(rows, "train/gold/overall"), series(rows, "train/reward/score")
    if not gold[0] or not proxy[0]:
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    _plot(ax, proxy, "RM score (proxy)", color="tab:blue")
    ax.set(xlabel="PPO step", title="Gold rater vs reward model")
    ax.set_ylabel("RM score (proxy)", color="tab:blue")
    ax2 = ax.twinx()
    _plot(ax2, gold, "gold overall", color="tab:orange")
    ax2.set_ylabel("gold overall (0-1)", color="tab:orange")
    ax.grid(alpha=0.3)
    return _save(fig, out)


def _loss_panels(stage_rows: dict[str, list[dict]]) -> list[tuple[str, list[tuple[str, Series]]]]:
    """(title, curves) per panel: SFT and RM train + eval loss; PPO's policy, value (and ptx) losses apart,
    since their scales differ by orders of magnitude."""
    wanted = []
    for stage in stage_rows:
        if stage == "ppo":
            wanted += [
                ("ppo policy loss", stage, ("train/loss/policy",)),
                ("ppo value loss", stage, ("train/loss/value",)),
                ("ppo pretraining (ptx) loss", stage, ("train/ptx/loss",)),
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
    """One panel per loss: SFT and RM train (and eval) loss, PPO policy and value losses."""
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
