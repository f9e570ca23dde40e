"""Held-out evaluation of a run's models (base -> SFT -> PPO) on the same prompts.

For each model, in order and one at a time (only one policy is in memory): sample one answer per prompt
with the same seed. Then score every answer with

* the gold rater (``SimulatedRater``; a cut answer is rated as truncated) per dimension and overall,
* the reward model (the proxy PPO optimised) on the sampled token sequences,
* the k1 KL to the reference (PPO's frozen reference, the SFT model) on the model's own samples,

and compare consecutive models (and last vs first) by per-prompt gold win-rates. Results go to
``out_dir/eval_models.json`` and the per-prompt answers and scores to ``out_dir/samples.jsonl``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from chatrlhf.checkpoint import write_json_atomic
from chatrlhf.evaluation.answers import Answers, answer_kl, response_log_probs, reward_scores, sample_answers
from chatrlhf.evaluation.metrics import mean, win_rate
from chatrlhf.evaluation.prompts import EvalPrompt

if TYPE_CHECKING:
    from chatrlhf.rollout import SamplingConfig

logger = logging.getLogger(__name__)

DIMENSIONS = ("overall", "consistency", "engagingness", "safety", "relevance")
RESULTS_FILE = "eval_models.json"
SAMPLES_FILE = "samples.jsonl"


@dataclass
class _ModelRun:
    path: str
    tokenizer: object
    answers: Answers
    log_probs: list[torch.Tensor] | None  # (b, R) per batch, the policy's own, when a reference is given


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _say(progress: bool, message: str) -> None:
    logger.info(message)
    if progress:
        print(f"[chatrlhf] eval: {message}", flush=True)


def _check_vocab(tok_a, name_a: str, tok_b, name_b: str, what: str) -> None:
    """Scores on token ids are meaningless across different vocabularies: stop and say so."""
    if tok_a.get_vocab() != tok_b.get_vocab():
        raise ValueError(
            f"{what}: the tokenizer of {name_a} differs from that of {name_b}, and scores are computed "
            "on the sampled token ids. Use models trained from the same base model."
        )


def _sample_all(
    models: dict[str, str],
    prompts,
    sampling,
    *,
    batch_size,
    seed,
    max_prompt_len,
    backend,
    dtype,
    device,
    with_log_probs: bool,
    progress: bool,
) -> dict[str, _ModelRun]:
    from chatrlhf.models import load_causal_lm, load_tokenizer, resolve_model
    from chatrlhf.rollout.inference import InferenceEngine

    runs: dict[str, _ModelRun] = {}
    for name, path in models.items():
        _say(progress, f"sampling {len(prompts)} answers from {name} ({path})")
        tokenizer = load_tokenizer(path, padding_side="left")
        model = load_causal_lm(path, dtype=dtype).to(device).eval()
        # One engine per model, built once for all its batches (a vLLM one from the model's directory).
        with InferenceEngine(backend, model=model, model_dir=resolve_model(path), dtype=dtype, seed=seed,
                             max_model_len=max_prompt_len + sampling.max_new_tokens) as engine:
            answers = sample_answers(model, tokenizer, prompts, sampling, batch_size=batch_size, seed=seed,
                                     max_prompt_len=max_prompt_len, progress=progress, engine=engine)
        log_probs = None
        if with_log_probs:
            log_probs = [response_log_probs(model, r, batch_size) for r in answers.rollouts]
        runs[name] = _ModelRun(str(path), tokenizer, answers, log_probs)
        del model
        _release(device)
    return runs


def _kl_per_answer(
    runs: dict[str, _ModelRun], reference: str, *, batch_size, dtype, device, progress: bool
) -> dict[str, list[float]]:
    from chatrlhf.models import load_causal_lm, load_tokenizer

    _say(progress, f"reference log-probs ({reference})")
    ref_tok = load_tokenizer(reference, require_chat_template=False)
    ref = load_causal_lm(reference, dtype=dtype).to(device).eval()
    out = {}
    for name, run in runs.items():
        _check_vocab(run.tokenizer, run.path, ref_tok, reference, "KL to the reference")
        per_batch = [
            answer_kl(own, response_log_probs(ref, rollout, batch_size), rollout.response_mask)
            for own, rollout in zip(run.log_probs, run.answers.rollouts)
        ]
        out[name] = run.answers.scatter(per_batch)
    del ref
    _release(device)
    return out


def _rm_per_answer(
    runs: dict[str, _ModelRun], reward_model: str, *, batch_size, dtype, device, progress: bool
) -> dict[str, list[float]]:
    from chatrlhf.models import load_reward_model, load_tokenizer, resolve_model

    _say(progress, f"reward-model scores ({reward_model})")
    rm = load_reward_model(reward_model, dtype=dtype).to(device).eval()
    rm_tok = None
    if (Path(resolve_model(reward_model)) / "tokenizer_config.json").is_file():
        rm_tok = load_tokenizer(reward_model, require_chat_template=False)
    out = {}
    for name, run in runs.items():
        if rm_tok is not None:
            _check_vocab(run.tokenizer, run.path, rm_tok, reward_model, "Reward-model scores")
        out[name] = run.answers.scatter([reward_scores(rm, r, batch_size) for r in run.answers.rollouts])
    del rm
    _release(device)
    return out


def _gold_per_answer(runs: dict[str, _ModelRun], prompts: list[EvalPrompt], rater) -> dict[str, list[dict]]:
    from chatrlhf.rewards import SimulatedRater, classify_harmful

    rater = rater if rater is not None else SimulatedRater()
    texts = [p.text for p in prompts]
    harmful = [p.harmful if p.harmful is not None else classify_harmful(p.text) for p in prompts]
    return {
        name: [
            s.as_dict()
            for s in rater.score(
                texts,
                [a.text for a in run.answers],
                harmful=harmful,
                truncated=[not a.finished for a in run.answers],
            )
        ]
        for name, run in runs.items()
    }


def _comparisons(names: list[str]) -> list[tuple[str, str]]:
    """(a, b) pairs judged as "a vs b": each model against the one before it, then last vs first."""
    pairs = [(names[i], names[i - 1]) for i in range(1, len(names))]
    if len(names) > 2:
        pairs.append((names[-1], names[0]))
    return pairs


def _example_indices(prompts: list[EvalPrompt], k: int) -> list[int]:
    """The first prompt of each category, in file order, up to k (then the next prompts to fill k)."""
    picked, seen = [], set()
    for i, p in enumerate(prompts):
        if p.category not in seen and len(picked) < k:
            picked.append(i)
            seen.add(p.category)
    picked += [i for i in range(len(prompts)) if i not in picked][: max(0, k - len(picked))]
    return sorted(picked)


def _summary(run: _ModelRun, gold: list[dict], rm: list[float] | None, kl: list[float] | None) -> dict:
    answers = run.answers
    return {
        "path": run.path,
        "gold": {d: mean([g[d] for g in gold]) for d in DIMENSIONS},
        "rm_score": mean(rm) if rm is not None else None,
        "kl_to_ref": mean(kl) if kl is not None else None,
        "length": mean([a.num_tokens for a in answers]),
        "finished": mean([float(a.finished) for a in answers]),
    }


def _per_prompt_rows(prompts, runs, gold, rm, kl) -> list[dict]:
    rows = []
    for i, p in enumerate(prompts):
        answers = {}
        for name, run in runs.items():
            a = run.answers[i]
            answers[name] = {
                "text": a.text,
                "finished": a.finished,
                "num_tokens": a.num_tokens,
                "gold": gold[name][i],
                "rm_score": rm[name][i] if rm else None,
                "kl": kl[name][i] if kl else None,
            }
        rows.append(
            {"id": p.id, "category": p.category, "prompt": p.text, "harmful": p.harmful, "answers": answers}
        )
    return rows


def evaluate_models(
    models: dict[str, str],
    *,
    reference: str | None,
    reward_model: str | None,
    prompts: list[EvalPrompt],
    sampling: SamplingConfig,
    batch_size: int,
    seed: int,
    rater=None,
    out_dir: Path | None,
    progress: bool = True,
    backend: str = "native",
    dtype: str = "float32",
    device: str | None = None,
    max_prompt_len: int = 256,
    num_examples: int = 4,
) -> dict:
    """Samples, scores and compares ``models`` (ordered name -> HF dir or built-in name); see the module doc.

    ``reference`` / ``reward_model``: dirs, or None to skip the KL / reward-model columns. ``rater``: the
    gold judge (default ``SimulatedRater()``). Returns the results dict also written to
    ``out_dir/eval_models.json``: ``models[name]`` = {path, gold{overall, 4 dimensions}, rm_score,
    kl_to_ref, length (tokens), finished (fraction)}, ``win_rates["a_vs_b"]`` (gold overall per prompt),
    ``examples`` (a few prompts with every model's answer) and the settings used.
    """
    if not models:
        raise ValueError("evaluate_models needs at least one model")
    if not prompts:
        raise ValueError("evaluate_models needs at least one prompt")
    dev = _device(device)
    common = dict(batch_size=batch_size, dtype=dtype, device=dev, progress=progress)
    runs = _sample_all(models, prompts, sampling, seed=seed, max_prompt_len=max_prompt_len, backend=backend,
                       with_log_probs=reference is not None, **common)
    kl = _kl_per_answer(runs, reference, **common) if reference is not None else None
    rm = _rm_per_answer(runs, reward_model, **common) if reward_model is not None else None
    _say(progress, "gold-rater scores")
    gold = _gold_per_answer(runs, prompts, rater)
    rows = _per_prompt_rows(prompts, runs, gold, rm, kl)
    results = {
        "order": list(models),
        "num_prompts": len(prompts),
        "seed": seed,
        "sampling": dataclasses.asdict(sampling),
        "backend": backend,
        "reference": None if reference is None else str(reference),
        "reward_model": None if reward_model is None else str(reward_model),
        "kl_is_estimate": _kl_is_estimate(sampling),
        **_comparison(list(models), runs, gold, rm, kl),
        "examples": [rows[i] for i in _example_indices(prompts, num_examples)],
    }
    if out_dir is not None:
        _write_results(Path(out_dir), rows, results, progress)
    return results


def _kl_is_estimate(sampling: SamplingConfig) -> bool:
    """k1 on the policy's own samples estimates KL(pi || ref) only for plain temperature-1 sampling."""
    return bool(sampling.do_sample and sampling.temperature == 1.0 and sampling.top_p >= 1.0 and not sampling.top_k)


def _comparison(names: list[str], runs: dict, gold: dict, rm: dict | None, kl: dict | None) -> dict:
    """``models`` (each model's summary) and ``win_rates`` (gold overall per prompt, each pair of models)."""
    return {
        "models": {
            n: _summary(runs[n], gold[n], rm[n] if rm else None, kl[n] if kl else None) for n in names
        },
        "win_rates": {
            f"{a}_vs_{b}": {
                "a": a,
                "b": b,
                "judge": "gold overall",
                **win_rate([g["overall"] for g in gold[a]], [g["overall"] for g in gold[b]]),
            }
            for a, b in _comparisons(names)
        },
    }


def _write_results(out: Path, rows: list[dict], results: dict, progress: bool) -> None:
    """Every answer to ``SAMPLES_FILE`` (JSON lines) and the results to ``RESULTS_FILE``."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / SAMPLES_FILE).open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_json_atomic(out / RESULTS_FILE, results)
    _say(progress, f"results in {out / RESULTS_FILE}, answers in {out / SAMPLES_FILE}")
