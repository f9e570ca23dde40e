"""The run report: ``run_dir/report.md`` with a results table, win-rates, training plots and answers.

Everything the report reads is optional: a missing metrics file, stage or results dict becomes a note
in the report, never an error, so a report can be written for a run that stopped half way. Text that
came from a model (answers) or a user (prompts) is escaped, so it shows literally and cannot break the
tables or inject HTML.
"""

from __future__ import annotations

import html
import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path

from chatrlhf.evaluation import plots

REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
DIMENSIONS = ("overall", "consistency", "engagingness", "safety", "relevance")
MAX_ANSWER_CHARS = 600  # answers longer than this are cut in the report; samples.jsonl has them in full
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~#])")


def md_escape(text: object, max_chars: int | None = None, newline: str = "<br>") -> str:
    """Text shown literally in Markdown, including inside a table cell.

    Markdown specials (``\\ ` * _ [ ] | ~ #``) get a backslash; ``& < >`` become HTML entities (so
    ``<script>`` shows as text); line breaks become ``newline``. Example: ``a|b <i>`` -> ``a\\|b &lt;i&gt;``.
    """
    text = str(text)
    if max_chars is not None and len(text) > max_chars:
        text = text[:max_chars].rstrip() + " …"
    text = html.escape(_MD_SPECIAL.sub(r"\\\1", text), quote=False)
    return re.sub(r"\r\n|\r|\n", newline, text)


def _num(x, digits: int = 3, percent: bool = False) -> str:
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x):
        return "–"
    return f"{100 * x:.1f} %" if percent else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _model_order(results: dict) -> list[str]:
    # eval_models.json is written with sorted keys; "order" keeps the pipeline's base -> sft -> ppo order.
    order = [n for n in results.get("order", []) if n in results.get("models", {})]
    return order + [n for n in results.get("models", {}) if n not in order]


def _results_section(results: dict) -> list[str]:
    s = results.get("sampling", {})
    rm, ref = results.get("reward_model"), results.get("reference")
    settings = ", ".join(f"{k} {s[k]}" for k in ("max_new_tokens", "temperature", "top_p", "top_k") if k in s)
    lines = [
        "## Held-out evaluation",
        "",
        f"{results.get('num_prompts', '?')} held-out prompts, one answer per model, sampled with seed "
        f"{results.get('seed', '?')} ({settings}). Gold scores are the simulated rater's (0-1, higher is "
        "better; a cut answer is rated as truncated). "
        + (f"RM score: the reward model {md_escape(rm)}. " if rm else "No reward model was given. ")
        + (
            f"KL: the summed per-token k1 log-ratio to the reference {md_escape(ref)}, averaged over answers."
            if ref
            else "No reference model was given, so no KL."
        ),
        "",
    ]
    header = [
        "model",
        "gold overall",
        *(d for d in DIMENSIONS[1:]),
        "RM score",
        "KL to ref",
        "length (tokens)",
        "finished",
    ]
    rows = []
    for name in _model_order(results):
        m = results["models"][name]
        gold = m.get("gold", {})
        rows.append(
            [
                f"**{md_escape(name)}**",
                *(_num(gold.get(d)) for d in DIMENSIONS),
                _num(m.get("rm_score")),
                _num(m.get("kl_to_ref")),
                _num(m.get("length"), 1),
                _num(m.get("finished"), percent=True),
            ]
        )
    lines += _table(header, rows)
    if results.get("kl_is_estimate") is False:
        lines += [
            "",
            "KL caveat: answers were not sampled at plain temperature 1, so the KL column is the mean "
            "log-ratio on those answers, not an estimate of KL(policy || reference).",
        ]
    return lines + [""] + _win_rate_section(results.get("win_rates", {}))


def _win_rate_section(win_rates: dict) -> list[str]:
    if not win_rates:
        return []
    rows = []
    for key, w in win_rates.items():
        a, b = w.get("a"), w.get("b")
        label = f"{md_escape(a)} vs {md_escape(b)}" if a and b else md_escape(key)
        rows.append(
            [
                label,
                _num(w.get("win_rate"), percent=True),
                _num(w.get("stderr"), percent=True),
                str(w.get("wins", "–")),
                str(w.get("ties", "–")),
                str(w.get("losses", "–")),
                str(w.get("n", "–")),
            ]
        )
    return [
        "### Win-rates",
        "",
        "Per prompt, the gold rater's overall score of the first model against the second's; a tie counts "
        "half. 50 % means no difference.",
        "",
        *_table(["comparison", "win rate", "± s.e.", "wins", "ties", "losses", "n"], rows),
        "",
    ]


def _examples_section(results: dict) -> list[str]:
    examples = results.get("examples") or []
    if not examples:
        return []
    lines = [
        "## Answers side by side",
        "",
        f"A few held-out prompts (the first of each category); answers cut at {MAX_ANSWER_CHARS} characters "
        "here, in full in `samples.jsonl`.",
        "",
    ]
    order = _model_order(results)
    for ex in examples:
        tags = [t for t in (ex.get("category"), "harmful" if ex.get("harmful") else None) if t]
        suffix = f" ({md_escape(', '.join(tags))})" if tags else ""
        lines += [f"**Prompt{suffix}:** {md_escape(ex.get('prompt', ''), newline=' ')}", ""]
        rows = []
        for name in [n for n in order if n in ex.get("answers", {})]:
            a = ex["answers"][name]
            gold = a.get("gold", {}).get("overall") if isinstance(a.get("gold"), dict) else a.get("gold")
            rows.append(
                [
                    md_escape(name),
                    md_escape(a.get("text", ""), MAX_ANSWER_CHARS),
                    _num(gold),
                    "yes" if a.get("finished") else "no (cut)",
                ]
            )
        lines += _table(["model", "answer", "gold overall", "finished"], rows) + [""]
    return lines


def _metrics_path(stage_path: Path) -> Path:
    return stage_path if stage_path.suffix == ".jsonl" else stage_path / "metrics.jsonl"


def _stage_evals(stages: dict[str, Path]) -> list[str]:
    """Each stage's final eval.json, top-level numbers only (e.g. SFT perplexity, RM accuracy)."""
    rows = []
    for name, path in stages.items():
        path = Path(path)
        file = (path.parent if path.suffix == ".jsonl" else path) / "eval.json"
        try:
            data = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        numbers = {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers:
            rows.append(
                [md_escape(name), ", ".join(f"{md_escape(k)} {_num(v, 4)}" for k, v in numbers.items())]
            )
    return ["## Stage evaluations", "", *_table(["stage", "final eval"], rows), ""] if rows else []


def _plot_file(stage: str, kind: str) -> str:
    # PPO's gold plot predates the other RL stages and keeps its file name, so earlier reports' links hold.
    return "gold_vs_proxy.png" if (stage, kind) == ("ppo", "gold_vs_proxy") else f"{stage}_{kind}.png"


def _stage_plots(stage: str, rows: list[dict]) -> list[tuple[str, str, Callable, str]]:
    """(file, title, plot function, caption) of each plot the stage named ``stage`` gets (``rows``: its
    metrics; an RL stage that played an environment gets the environment's curves instead of gold vs proxy)."""
    name = plots.stage_title(stage)
    if stage in plots.RL_STAGES:
        played = bool(plots.series(rows, "train/env/turns")[0])
        return [
            (_plot_file(stage, "reward"), f"{name} reward", plots.plot_rl_reward,
             f"Reward score per {name} step (and the KL-penalised total)."),
            (_plot_file(stage, "kl"), f"{name} KL and beta", plots.plot_rl_kl,
             f"KL to the reference per answer and the KL coefficient beta per {name} step."),
            (_plot_file(stage, "env"), f"{name} environment", plots.plot_env,
             f"Per {name} step over the sampled episodes: accuracy (when the environment judges answers), turns "
             "and tool calls per episode.") if played else
            (_plot_file(stage, "gold_vs_proxy"), f"{name} Gold vs proxy", plots.plot_gold_vs_proxy,
             f"The gold rater against the reward over {name} steps: the proxy rising while gold falls is "
             "over-optimisation of the reward model."),
        ]
    if stage in plots.PREFERENCE_STAGES:
        return [
            (_plot_file(stage, "curves"), f"{name} loss and implicit reward", plots.plot_preference,
             f"{name} loss, implicit-reward margin beta * h (chosen minus rejected) and reward accuracy (the share "
             "of pairs whose chosen answer gets the higher implicit reward), on the training batches and on "
             "the held-out pairs."),
        ]
    return []


def _plots_section(run_dir: Path, stages: dict[str, Path], notes: list[str]) -> list[str]:
    rows: dict[str, list[dict]] = {}
    for name, path in stages.items():
        rows[name], read_notes = plots.read_metrics(_metrics_path(Path(path)))
        notes += [f"{md_escape(name)}: {n}" for n in read_notes]
    lines = ["## Training curves", ""]
    out_dir = run_dir / PLOTS_DIR
    for stage in stages:
        for file, title, fn, caption in _stage_plots(stage, rows[stage]):
            made = fn(rows[stage], out_dir / file, stage=stage)
            if made is None:
                (out_dir / file).unlink(missing_ok=True)  # a stale plot of an earlier report would mislead
                notes.append(
                    f"{title}: no `{stage}` metrics for it (stage missing, or the metric was not logged)."
                )
                continue
            lines += [f"### {title}", "", caption, "", f"![{title}]({PLOTS_DIR}/{file})", ""]
    if plots.plot_losses(rows, out_dir / "losses.png") is not None:
        lines += [
            "### Losses",
            "",
            "Each stage's train (and eval) loss; an RL stage's policy, value and ptx losses in panels of their own.",
            "",
            f"![Losses]({PLOTS_DIR}/losses.png)",
            "",
        ]
    else:
        (out_dir / "losses.png").unlink(missing_ok=True)
        notes.append("Losses: no stage logged a loss.")
    return lines if len(lines) > 2 else []


def write_report(run_dir: Path, results: dict | None, stages: dict[str, Path], env_results: dict | None = None) -> Path:
    """Writes ``run_dir/report.md`` and ``run_dir/plots/*.png``; returns the report's path.

    ``results``: the dict of :func:`chatrlhf.evaluation.evaluate_models` (or None to leave the
    evaluation out). ``stages``: stage name -> its output dir holding ``metrics.jsonl`` (or the file),
    e.g. ``{"sft": run/"sft", "rm": run/"rm", "ppo": run/"ppo"}``. A stage named after an RL estimator
    (``plots.RL_STAGES``: ``ppo``, ``grpo``, ``rloo`` ...) gets the reward, KL and gold-vs-proxy plots under its
    name; a ``dpo`` stage gets its loss and implicit-reward plot. ``env_results``: the dict of
    :func:`chatrlhf.evaluation.environment.evaluate_environment`, shown after the gold-rater table.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    lines = [
        "# chatrlhf run report",
        "",
        f"Run {md_escape(run_dir)}, written {time.strftime('%Y-%m-%d %H:%M:%S')}.",
        "",
    ]
    if results:
        lines += _results_section(results)
    elif not env_results:
        notes.append("No held-out evaluation results: the evaluation table and win-rates are skipped.")
    if env_results:
        from chatrlhf.evaluation.environment import env_table

        lines += [env_table(env_results)]
    lines += _stage_evals(stages)
    if stages:  # an evaluation of saved models alone has no training curves to show
        lines += _plots_section(run_dir, stages, notes)
    if results:
        lines += _examples_section(results)
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    path = run_dir / REPORT_FILE
    tmp = path.with_name(f".{REPORT_FILE}.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(path)
    return path
