"""DeepSpeed-Chat's three-phase data split, train/eval holdout, weighted blending of several datasets.

Every permutation comes from ``numpy.random.RandomState`` (NumPy's legacy generator, whose stream is
frozen across NumPy versions), seeded explicitly: the same row count and seed give the same subsets in
every run and on every rank, which is what keeps the SFT, reward and PPO phases disjoint when each stage
is started separately.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from chatrlhf.data.convert import convert_records
from chatrlhf.data.formats import KINDS, DataError
from chatrlhf.data.sources import load_records, own_eval_source

log = logging.getLogger(__name__)

PHASES = (1, 2, 3)


def parse_split(spec: str | Sequence[float]) -> list[float]:
    """``"2,4,4"`` -> ``[0.2, 0.4, 0.4]`` (normalised); raises naming ``data.data_split``."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    fix = "give three non-negative numbers with a positive sum, e.g. data.data_split=2,4,4 (SFT,reward,PPO)."
    if len(parts) != 3:
        raise DataError(f"data.data_split={spec!r} has {len(parts)} parts, not 3.", fix)
    try:
        values = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise DataError(f"data.data_split={spec!r} is not a list of numbers.", fix) from None
    if any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise DataError(f"data.data_split={spec!r} has a negative or non-finite part, or sums to 0.", fix)
    total = sum(values)
    return [v / total for v in values]


def phase_bounds(n: int, fractions: Sequence[float]) -> list[int]:
    """Cumulative boundaries ``[0, b1, b2, n]`` with ``b_k = round(n * sum(fractions[:k]))``.

    Rounding the cumulative sums (not each share) makes the parts add up to exactly ``n``: for n=10 and
    0.2/0.4/0.4 the bounds are [0, 2, 6, 10].
    """
    cum = np.cumsum(fractions)
    bounds = [0] + [min(n, math.floor(n * c + 0.5)) for c in cum[:-1]] + [n]
    return bounds


def _check_seed(seed: int) -> int:
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise DataError(f"seed={seed!r} must be an integer in [0, 2**32).", "set data.seed to such a number.")
    return int(seed)


def phase_split(records: Sequence, spec: str | Sequence[float] = "2,4,4", phase: int = 1,
                seed: int = 1234) -> list:
    """The rows phase ``phase`` (1 SFT, 2 reward, 3 PPO) owns under ``spec``; disjoint across phases.

    The subset keeps the input order (the permutation only decides membership).
    """
    if phase not in PHASES:
        raise DataError(f"phase={phase!r} is not one of {PHASES}.", "use 1 (SFT), 2 (reward) or 3 (PPO).")
    bounds = phase_bounds(len(records), parse_split(spec))
    perm = np.random.RandomState(_check_seed(seed)).permutation(len(records))
    chosen = np.sort(perm[bounds[phase - 1]: bounds[phase]])
    return [records[i] for i in chosen]


def train_eval_split(records: Sequence, eval_fraction: float, seed: int = 1234) -> tuple[list, list]:
    """Holds out ``round(n * eval_fraction)`` rows (at least 1 if the fraction is > 0 and n >= 2).

    Uses its own stream (seeded with ``[seed, 1]``) so the holdout is not aligned with the phase split.
    """
    if not isinstance(eval_fraction, (int, float)) or not 0 <= eval_fraction < 1:
        raise DataError(f"data.eval_fraction={eval_fraction!r} must be in [0, 1).",
                        "use e.g. data.eval_fraction=0.05, or data.eval_datasets for a separate eval set.")
    n = len(records)
    n_eval = min(n - 1, max(1, math.floor(n * eval_fraction + 0.5))) if eval_fraction > 0 and n >= 2 else 0
    perm = np.random.RandomState([_check_seed(seed), 1]).permutation(n)
    is_eval = np.zeros(n, dtype=bool)
    is_eval[perm[:n_eval]] = True
    return [r for r, e in zip(records, is_eval) if not e], [r for r, e in zip(records, is_eval) if e]


def _largest_remainder(total: int, shares: Sequence[float]) -> list[int]:
    """Integer counts summing to ``total``, proportional to ``shares`` (Hamilton's method)."""
    raw = [total * s for s in shares]
    counts = [math.floor(r) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _check_weights(weights: Sequence[float], n: int) -> list[float]:
    if len(weights) != n:
        raise DataError(f"data.weights has {len(weights)} values for {n} datasets.", "give one weight per source.")
    if any(not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise DataError(f"data.weights={list(weights)} must be non-negative numbers with a positive sum.",
                        "e.g. data.weights=[1,1].")
    return [w / sum(weights) for w in weights]


def blend(datasets: Sequence[Sequence], weights: Sequence[float] | None = None, seed: int = 1234,
          total: int | None = None) -> list:
    """Mixes datasets so dataset ``i`` makes up ``weights[i] / sum(weights)`` of the result.

    ``weights=None`` is plain concatenation (what DeepSpeed-Chat does with several datasets).
    ``total`` defaults to the summed sizes. A dataset asked for ``c`` rows contributes
    ``c // len`` full copies plus a seeded sample without replacement of ``c % len`` rows, so it is
    only repeated when its share exceeds its size. The result is grouped by dataset, in input order
    (the loader shuffles).
    """
    sizes = [len(d) for d in datasets]
    if weights is None and total is None:
        return [r for d in datasets for r in d]
    shares = _check_weights(weights if weights is not None else sizes, len(datasets))
    total = sum(sizes) if total is None else total
    if not isinstance(total, int) or total < 0:
        raise DataError(f"blend total={total!r} must be a non-negative integer.", "pass a row count.")
    counts = _largest_remainder(total, shares)
    out: list = []
    for i, (data, count) in enumerate(zip(datasets, counts)):
        if count and not data:
            raise DataError(f"dataset {i} is empty but its weight asks for {count} rows.",
                            "set its weight to 0 in data.weights or give it data.")
        if not count:
            continue
        copies, rest = divmod(count, len(data))
        rng = np.random.RandomState([_check_seed(seed), 2, i])
        out.extend(r for _ in range(copies) for r in data)
        out.extend(data[j] for j in np.sort(rng.choice(len(data), rest, replace=False)))
        if count > len(data):
            log.warning("blend: dataset %d (%d rows) repeated %.2f times to reach its share", i, len(data),
                        count / len(data))
    return out


def _from_config(cfg) -> dict:
    """Reads a DataConfig-like object (fields datasets, weights, format, data_split, seed, eval_fraction,
    eval_datasets, optional bad_rows) into prepare_records' keyword arguments."""
    return {"sources": cfg.datasets, "weights": cfg.weights, "fmt": cfg.format, "data_split": cfg.data_split,
            "seed": cfg.seed, "eval_fraction": cfg.eval_fraction, "eval_sources": cfg.eval_datasets,
            "bad_rows": getattr(cfg, "bad_rows", "error")}


def _as_list(value, flag: str) -> list[str]:
    values = [value] if isinstance(value, str) else list(value or [])
    if not values and flag == "data.datasets":
        raise DataError("no data sources given.", "set data.datasets (e.g. demo, or a .jsonl path).")
    return values


def _load_part(source: str, fmt: str, kind: str, phase: int, data_split, seed: int, eval_fraction: float,
               bad_rows: str, use_own_eval: bool) -> tuple[list[dict], list[dict], int]:
    """One source's (train, eval, rows in this phase).

    A source that ships its own held-out split (the demo's ``pairs_eval``) is evaluated on that split
    in full, like DeepSpeed-Chat uses a dataset's test split, and nothing is carved out of its training rows.
    """
    records, native = load_records(source, fmt=fmt, bad_rows=bad_rows)
    if data_split is not None:
        records = phase_split(records, data_split, phase, seed)
    own_eval = own_eval_source(source) if use_own_eval else None
    if own_eval is not None:
        held, held_kind = load_records(own_eval, fmt=fmt, bad_rows=bad_rows)
        records = convert_records(records, native, kind)
        return records, convert_records(held, held_kind, kind), len(records)
    # Held out before conversion, so the two unpaired records of one pair land on the same side.
    train, held = train_eval_split(records, eval_fraction, seed) if eval_fraction else (records, [])
    train, held = convert_records(train, native, kind), convert_records(held, native, kind)
    return train, held, len(train) + len(held)


def prepare_records(sources, weights: Sequence[float] | None = None, fmt: str | Sequence[str] = "auto",
                    kind: str = "sft", phase: int = 1, data_split: str | Sequence[float] | None = None,
                    seed: int = 1234, eval_fraction: float = 0.0, eval_sources: str | Sequence[str] | None = None,
                    bad_rows: str = "error") -> tuple[list[dict], list[dict]]:
    """Everything a stage needs: load, phase-split, convert to ``kind``, hold out eval, blend.

    ``sources`` is a source string, a list of them, or a DataConfig (then its fields replace the other
    arguments except ``kind`` and ``phase``). Per source, in order: load + validate, take this phase's
    share (``data_split=None`` gives every row to every phase), convert to ``kind``, hold out
    ``eval_fraction`` (or, for a source with its own eval split such as ``demo``, evaluate on that). The phase split runs on the loaded rows before conversion, so stages needing
    different kinds see the same index space and stay disjoint. Train parts are blended by ``weights``;
    eval parts are concatenated. With ``eval_sources`` the eval set is those sources in full (no phase
    split) and nothing is held out (``eval_fraction`` is not used).
    """
    if hasattr(sources, "datasets"):
        return prepare_records(**_from_config(sources), kind=kind, phase=phase)
    if kind not in KINDS:
        raise DataError(f"unknown record kind {kind!r}.", f"use one of {', '.join(KINDS)}.")
    sources, eval_sources = _as_list(sources, "data.datasets"), _as_list(eval_sources, "data.eval_datasets")
    fmts = [fmt] * len(sources) if isinstance(fmt, str) else list(fmt)
    if len(fmts) != len(sources):
        raise DataError(f"data.format has {len(fmts)} values for {len(sources)} sources.",
                        "give one format, or one per source.")
    if eval_sources and eval_fraction:
        log.info("data.eval_datasets is set: data.eval_fraction=%s is not used", eval_fraction)
        eval_fraction = 0.0
    parts = [_load_part(s, f, kind, phase, data_split, seed, eval_fraction, bad_rows, not eval_sources)
             for s, f in zip(sources, fmts)]
    empty = [s for s, p, w in zip(sources, parts, weights or [1] * len(sources)) if not p[0] and w]
    if empty:
        sizes = "; ".join(f"{s}: {p[2]}" for s, p in zip(sources, parts))
        raise DataError(f"no training rows for phase {phase} from {', '.join(empty)} "
                        f"(rows in this phase after data.data_split={data_split!r}: {sizes}).",
                        "raise this phase's share in data.data_split, lower data.eval_fraction, "
                        "set the source's weight to 0 in data.weights, or add rows to data.datasets.")
    train = blend([p[0] for p in parts], weights, seed)
    eval_rows = [r for p in parts for r in p[1]]
    for source in eval_sources:
        records, native = load_records(source, bad_rows=bad_rows)
        eval_rows.extend(convert_records(records, native, kind))
    log.info("phase %d %s data: %d train, %d eval rows", phase, kind, len(train), len(eval_rows))
    return train, eval_rows
