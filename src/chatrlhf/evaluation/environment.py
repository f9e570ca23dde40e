"""Models playing an environment on held-out rows: accuracy (greedy pass@1, sampled pass@k), tool-call
success, turns and tokens per episode, the mean episode score, and per-row win-rates between models (what
``chatrlhf eval --env`` and ``chatrlhf train --recipe`` report beside the gold-rater table)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from chatrlhf.checkpoint import write_json_atomic
from chatrlhf.environments.episodes import Episode, run_episodes
from chatrlhf.evaluation.metrics import win_rate
from chatrlhf.rollout import SamplingConfig

RESULTS_FILE = "env_eval.json"


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of Chen et al. 2021 (eq. 1) from n samples of which c are correct:
    1 - C(n - c, k) / C(n, k). Example: n 4, c 1, k 2 -> 1 - C(3, 2) / C(4, 2) = 1 - 3 / 6 = 0.5."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def load_rows(data: str, limit: int | None) -> list[dict]:
    """The environment's rows (``{"prompt": messages, **columns}``) from a data source, the first ``limit``."""
    from chatrlhf.data import prepare_records

    records, _ = prepare_records(data, kind="prompt", phase=3, data_split="0,0,1")
    rows = [{"prompt": r["prompt"], **r.get("meta", {})} for r in records]
    return rows[:limit] if limit else rows


def play(path: str, env, rows: list[dict], sampling: SamplingConfig, samples: int, *, batch_size: int, seed: int,
         backend: str, dtype: str, progress: bool) -> list[list[Episode]]:
    """``samples`` episodes per row played by the model at ``path``: [row][sample]."""
    from chatrlhf.data.encode import eos_id
    from chatrlhf.models import load_causal_lm, load_tokenizer, resolve_model
    from chatrlhf.rollout.inference import InferenceEngine

    tokenizer = load_tokenizer(path, padding_side="left")
    model = load_causal_lm(path, dtype=dtype).eval()
    jobs = [row for row in rows for _ in range(samples)]
    episodes: list[Episode] = []
    gen = torch.Generator().manual_seed(seed)
    with InferenceEngine(backend, model=model, model_dir=resolve_model(path), dtype=dtype, seed=seed,
                         max_model_len=env.max_total_tokens) as engine:
        def generate(ids, mask, s):
            return engine.generate(ids, mask, s, eos_token_ids=[eos_id(tokenizer)],
                                   pad_token_id=tokenizer.pad_token_id, generator=gen)

        for start in tqdm(range(0, len(jobs), batch_size), desc=f"episodes of {Path(path).name}", disable=not progress):
            episodes += run_episodes(env, jobs[start : start + batch_size], tokenizer, generate, sampling,
                                     eos_id(tokenizer))
    return [episodes[i * samples : (i + 1) * samples] for i in range(len(rows))]


def summarise(greedy: list[Episode], sampled: list[list[Episode]] | None, k: int, judged: bool) -> dict:
    """One model's figures: greedy ``accuracy`` (pass@1) and ``score``, ``pass@k`` over the sampled
    episodes, ``turns`` and ``tokens`` per greedy episode, ``tool_calls`` per episode and ``tool_success``.
    judged: the environment judges answers (sets ``info["correct"]``); an episode it never judged (cut at a
    limit first) counts as wrong."""
    n = len(greedy)
    calls = sum(e.info.get("tool_calls", 0) for e in greedy)
    errors = sum(e.info.get("tool_errors", 0) for e in greedy)
    out = {"episodes": n, "score": sum(e.score for e in greedy) / n, "turns": sum(e.turns for e in greedy) / n,
           "tokens": sum(len(e.ids) for e in greedy) / n, "tool_calls": calls / n,
           "tool_success": (calls - errors) / calls if calls else None}
    if judged:
        out["accuracy"] = sum(bool(e.info.get("correct")) for e in greedy) / n
    if judged and sampled:
        out[f"pass@{k}"] = sum(pass_at_k(len(row), sum(bool(e.info.get("correct")) for e in row), k)
                               for row in sampled) / len(sampled)
        out["sampled_accuracy"] = sum(pass_at_k(len(row), sum(bool(e.info.get("correct")) for e in row), 1)
                                      for row in sampled) / len(sampled)
    return out


def evaluate_environment(models: dict[str, str], env_spec: str, data: str | None, *, limit: int | None, k: int,
                         generation: SamplingConfig, seed: int, batch_size: int, backend: str, dtype: str,
                         out_dir: Path, progress: bool = True) -> dict:
    """Every model plays the environment greedily once per row (and ``k`` sampled times when k >= 2);
    returns and writes ``out_dir/env_eval.json``: per model its ``summarise`` figures, and the win-rate of
    each model over the one before it on the greedy episode scores."""
    from chatrlhf.environments import load_environment

    env = load_environment(env_spec)
    data = data or getattr(env, "eval_data", None)
    if not data:
        raise ValueError(f"--env {env_spec} names no held-out data of its own: pass --env_data")
    rows = load_rows(data, limit)
    greedy_sampling = SamplingConfig(generation.max_new_tokens, do_sample=False)
    results: dict = {"env": env_spec, "data": data, "rows": len(rows), "k": k, "models": {}, "win_rates": {}}
    played = {}
    for name, path in models.items():
        greedy = [row[0] for row in play(path, env, rows, greedy_sampling, 1, batch_size=batch_size, seed=seed,
                                         backend=backend, dtype=dtype, progress=progress)]
        sampled = (play(path, env, rows, generation, k, batch_size=batch_size, seed=seed, backend=backend,
                        dtype=dtype, progress=progress) if k >= 2 else [])
        played[name] = greedy, sampled
    judged = any("correct" in e.info for greedy, sampled in played.values() for e in greedy + sum(sampled, []))
    scores = {}
    for name, (greedy, sampled) in played.items():
        results["models"][name] = summarise(greedy, sampled, k, judged)
        scores[name] = [e.score for e in greedy]
        results.setdefault("samples", {})[name] = [e.messages for e in greedy[:3]]
    names = list(models)
    for a, b in zip(names[1:], names[:-1]):
        results["win_rates"][f"{a} vs {b}"] = win_rate(scores[a], scores[b])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / RESULTS_FILE, results)
    return results


def env_table(results: dict) -> str:
    """The results as a markdown section for the run report."""
    k = results["k"]
    cols = ["accuracy", *([f"pass@{k}"] if k else []), "score", "tool_success", "tool_calls", "turns", "tokens"]
    lines = [f"## Environment `{results['env']}` on {results['data']} ({results['rows']} rows)", "",
             "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in results["models"].items():
        cells = ["" if m.get(c) is None else f"{m[c]:.3f}" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for pair, w in results["win_rates"].items():
        if w.get("win_rate") is not None:
            lines.append(f"\nWin-rate {pair} (greedy episode score, ties half): {w['win_rate']:.3f} "
                         f"± {w['stderr']:.3f}")
    return "\n".join(lines) + "\n"
