"""Feedback filtering: pointwise ratings -> clean preference pairs (``chatrlhf pairs``).

Human ratings are noisy: two answers scored 4 and 4 say nothing about which is better, the same answer
shows up several times with different scores, and annotators disagree. A reward model trained on every
pair that ratings imply learns that noise. ``ratings_to_pairs`` keeps only pairs the ratings support:

    group by prompt -> merge duplicate answers -> mean score per answer -> every pair of answers
        -> drop ties and near-ties (margin) -> drop pairs the annotators disagree on (agreement)

The rules, each with the line implementing it, are listed in docs/data.md ("Ratings to pairs").
The output rows are preference records (``prompt``, ``chosen``, ``rejected``) that ``chatrlhf rm`` and
``chatrlhf dpo`` read directly; the extra columns (``margin``, ``agreement``, counts) land in ``meta``.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Literal

from chatrlhf.config import ConfigError, check_filter_flags
from chatrlhf.data.formats import DataError
from chatrlhf.data.sources import load_records

# Scores are usually decimals (4.1, 3.1) whose float difference misses the margin by ~1e-16; a margin,
# a tie or an agreement share within this tolerance counts as met, so 4.1 vs 3.1 passes min_margin=1.
_EPS = 1e-9

STAT_KEYS = ("ratings", "prompts", "answers", "duplicates_merged", "single_answer_prompts", "candidate_pairs",
             "dropped_tie", "dropped_disagreement", "no_shared_annotator", "pairs")


@dataclass
class PairsConfig:
    """Turn pointwise ratings into preference pairs for ``chatrlhf rm`` / ``chatrlhf dpo``, filtering noisy
    feedback: duplicate answers are merged, ties, near-ties and pairs the annotators disagree on are dropped
    (rules: docs/data.md, "Ratings to pairs")."""

    input: list[str] = field(default_factory=list)
    """Rating sources (.jsonl/.json/.csv/.parquet rows with prompt, response, score and optionally
    ``annotator``, a name or number; empty means anonymous), same syntax as ``data.datasets``. Ratings of
    all sources are pooled."""
    output: str = "outputs/pairs.jsonl"
    """Where the pairs go (JSON lines: prompt, chosen, rejected, margin, agreement, and the counts behind
    them); ``chatrlhf rm`` / ``chatrlhf dpo`` read it as preference data."""
    overwrite: bool = False
    """Replace an existing output file. Off: stop instead of overwriting."""
    min_margin: float = 1.0
    """Drop ties and near-ties: pairs whose mean scores differ by less than this (exact ties are always
    dropped, even with 0)."""
    min_agreement: float = 1.0
    """Of the annotators who rated both answers, the share that must rank them like the means do
    (1.0: any dissent drops the pair; 0.5: a majority is enough). A pair no annotator rated both sides
    of is kept (nothing to disagree with); its ``agreement`` is null."""
    bad_rows: Literal["error", "skip"] = "error"
    """A malformed rating row stops the run naming file, row and field; ``skip`` drops it (logged)."""

    def validate(self, prefix: str = "") -> None:
        if not self.input:
            raise ConfigError("--input is empty: name one or more rating files (prompt, response, score rows)")
        if not self.output:
            raise ConfigError("--output is empty: name the JSONL file the pairs go to")
        check_filter_flags(self.min_margin, self.min_agreement)


@dataclass
class _Answer:
    """One distinct answer to one prompt, with every rating pooled into it."""

    text: str  # the first spelling seen; later whitespace variants merge into it
    scores: list[float] = field(default_factory=list)
    by_annotator: dict[str, list[float]] = field(default_factory=dict)  # annotator id -> their scores

    @property
    def mean(self) -> float:
        return math.fsum(self.scores) / len(self.scores)


def normalise_whitespace(text: str) -> str:
    """The identity of an answer: runs of whitespace become one space, ends are trimmed.

    >>> normalise_whitespace("  Paris\\n is  the capital. ")
    'Paris is the capital.'
    """
    return " ".join(text.split())


def _prompt_key(prompt: list[dict]) -> str:
    # Canonical JSON, so equal message lists from different files (or key orders) are one prompt.
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _annotator(record: dict) -> str | None:
    """The annotator id of a rating record (a top-level key, or the ``annotator`` column kept in ``meta``).

    Ids are compared as text, so ``7`` in a JSONL file and ``"7"`` in a CSV file are the same person.
    None or an empty string means anonymous: the rating counts in the means, not in the agreement.
    """
    value = record["annotator"] if "annotator" in record else record.get("meta", {}).get("annotator")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a Parquet/pandas integer column with gaps arrives as floats
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"annotator must be a name or an integer id, got {type(value).__name__} {value!r}.",
                        "store the annotator as text or an integer, or leave it empty.",
                        source=record.get("_source"), row=record.get("_row"), field="annotator")
    return str(value).strip()


def _group(records: Iterable[dict]) -> dict[str, tuple[list[dict], dict[str, _Answer]]]:
    """prompt key -> (prompt messages, normalised answer text -> _Answer), both in first-seen order."""
    groups: dict[str, tuple[list[dict], dict[str, _Answer]]] = {}
    for rec in records:
        prompt, answers = groups.setdefault(_prompt_key(rec["prompt"]), (rec["prompt"], {}))
        answer = answers.setdefault(normalise_whitespace(rec["response"]), _Answer(rec["response"]))
        score = float(rec["score"])
        answer.scores.append(score)
        who = _annotator(rec)
        if who is not None:
            answer.by_annotator.setdefault(who, []).append(score)
    return groups


def annotator_agreement(high: dict[str, list[float]], low: dict[str, list[float]]) -> tuple[float | None, int]:
    """(share of shared annotators who score ``high`` strictly above ``low``, number of shared annotators).

    ``high`` / ``low``: annotator id -> that annotator's scores of the answer with the higher / lower mean.
    Only annotators who rated both answers count; one who rated an answer twice counts with their mean.
    An annotator's tie counts as not agreeing. No shared annotator gives (None, 0).

    >>> annotator_agreement({"a": [5], "b": [4], "c": [3], "d": [5]}, {"a": [1], "b": [5], "c": [2, 4]})
    (0.3333333333333333, 3)

    (a: 5 > 1 agrees; b: 4 < 5 disagrees; c: 3 vs mean(2, 4) = 3 ties, not agreeing; d rated only ``high``,
    not counted: 1 of 3.)
    """
    shared = [a for a in high if a in low]
    if not shared:
        return None, 0

    def mean(xs: list[float]) -> float:
        return math.fsum(xs) / len(xs)

    agree = sum(1 for a in shared if mean(high[a]) - mean(low[a]) > _EPS)
    return agree / len(shared), len(shared)


def _judge(a: _Answer, b: _Answer, min_margin: float, min_agreement: float) -> tuple[str, dict | None]:
    """Decides one candidate pair: ("tie" | "disagreement" | "kept", the output row fields or None)."""
    margin = abs(a.mean - b.mean)
    if margin <= _EPS or margin < min_margin - _EPS:
        return "tie", None
    high, low = (a, b) if a.mean > b.mean else (b, a)  # chosen = the higher mean
    agreement, n_shared = annotator_agreement(high.by_annotator, low.by_annotator)
    if agreement is not None and agreement < min_agreement - _EPS:
        return "disagreement", None
    # Rounded so that 4.1 vs 3.1 is written as 1.0, not 0.9999999999999996 (the test above allowed for it).
    return "kept", {"chosen": high.text, "rejected": low.text, "margin": round(margin, 9), "agreement": agreement,
                    "n_chosen": len(high.scores), "n_rejected": len(low.scores), "n_shared": n_shared}


def ratings_to_pairs(records: Iterable[dict], min_margin: float,
                     min_agreement: float) -> tuple[list[dict], dict[str, int]]:
    """Turns normalised rating records into filtered preference pairs; returns (pairs, stats).

    ``records``: ``{"prompt": [messages], "response": str, "score": float}`` (what
    ``load_records(..., fmt="rating")`` gives), optionally with an annotator id (``annotator``, top level
    or in ``meta``) and ``_source``/``_row`` for error messages. Rules:

    1. ratings group by prompt (its messages' canonical JSON);
    2. within a prompt, answers equal after whitespace normalisation are one answer; their scores pool;
    3. every two distinct answers of a prompt form a candidate; each answer is scored by its mean;
    4. a candidate whose means differ by less than ``min_margin`` (or not at all) is dropped as a tie;
    5. among annotators who rated both answers, the share ranking them strictly like the means must be
       >= ``min_agreement``, else the candidate is dropped as a disagreement (no shared annotator: kept);
    6. chosen = the answer with the higher mean.

    Output order: prompts in first-seen order, then answer pairs (i, j), i < j, in first-seen order.
    Each pair is ``{"prompt", "chosen", "rejected", "margin", "agreement", "n_chosen", "n_rejected",
    "n_shared"}`` (``n_*``: ratings pooled into each answer; ``n_shared``: annotators who rated both).

    Worked example (min_margin=1, min_agreement=1), one prompt "2+2?":
        "4": a=5, b=4;  " 4 ": c=5 (merged into "4": mean 14/3, 3 ratings);  "5": a=1, b=5 (mean 3);
        "four": c=4.5 (mean 4.5)
        ("4", "5"):    margin 5/3 >= 1; shared a (5 > 1 agrees), b (4 < 5 disagrees): 1/2 < 1 -> disagreement
                       (kept with min_agreement=0.5: chosen "4", rejected "5", agreement 0.5)
        ("4", "four"): margin 14/3 - 4.5 = 1/6 < 1 -> tie
        ("5", "four"): margin 1.5; no shared annotator -> kept, chosen "four", rejected "5", agreement None
        stats: ratings 6, prompts 1, answers 3, duplicates_merged 3 (6 ratings - 3 answers),
               single_answer_prompts 0, candidate_pairs 3, dropped_tie 1, dropped_disagreement 1,
               no_shared_annotator 1, pairs 1
    """
    records = list(records)
    groups = _group(records)
    stats = dict.fromkeys(STAT_KEYS, 0)
    stats["ratings"], stats["prompts"] = len(records), len(groups)
    pairs = []
    for prompt, answers in groups.values():
        stats["answers"] += len(answers)
        stats["single_answer_prompts"] += len(answers) == 1
        for a, b in combinations(answers.values(), 2):
            stats["candidate_pairs"] += 1
            verdict, row = _judge(a, b, min_margin, min_agreement)
            if verdict == "tie":
                stats["dropped_tie"] += 1
            elif verdict == "disagreement":
                stats["dropped_disagreement"] += 1
            else:
                stats["no_shared_annotator"] += row["n_shared"] == 0
                pairs.append({"prompt": prompt, **row})
    stats["duplicates_merged"] = stats["ratings"] - stats["answers"]  # ratings pooled into an answer seen before
    stats["pairs"] = len(pairs)
    return pairs, stats


LABEL_STAT_KEYS = ("ratings", "answers", "desirable", "undesirable", "dropped_neutral")


def ratings_to_labels(records: Iterable[dict], desirable_min: float,
                      undesirable_max: float) -> tuple[list[dict], dict[str, int]]:
    """Turns rating records into unpaired labelled answers for KTO (``chatrlhf kto``); returns (rows, stats).

    Answers are pooled as in ``ratings_to_pairs`` (per prompt, equal after whitespace normalisation); an answer
    whose mean score is >= ``desirable_min`` is desirable, <= ``undesirable_max`` undesirable, and one between
    the two is dropped as neutral. Rows: ``{"prompt", "response", "label", "mean_score", "n_ratings"}``,
    prompts and answers in first-seen order.

    Worked example (desirable_min 4, undesirable_max 2), prompt "2+2?": "4" rated 5 and 4 (mean 4.5) ->
    desirable; "5" rated 1 -> undesirable; "four" rated 3 -> neutral, dropped.
    stats: ratings 4, answers 3, desirable 1, undesirable 1, dropped_neutral 1.
    """
    records = list(records)
    stats = dict.fromkeys(LABEL_STAT_KEYS, 0)
    stats["ratings"] = len(records)
    rows = []
    for prompt, answers in _group(records).values():
        for answer in answers.values():
            stats["answers"] += 1
            mean = answer.mean
            if undesirable_max < mean < desirable_min:
                stats["dropped_neutral"] += 1
                continue
            label = mean >= desirable_min
            stats["desirable" if label else "undesirable"] += 1
            rows.append({"prompt": prompt, "response": answer.text, "label": label, "mean_score": round(mean, 9),
                         "n_ratings": len(answer.scores)})
    return rows, stats


def summarise(stats: dict[str, int]) -> str:
    """One line for the log, the stats in ``STAT_KEYS`` order: ``ratings=6 prompts=1 ... pairs=1``."""
    return " ".join(f"{k}={stats[k]}" for k in STAT_KEYS)


def write_text_atomic(path: Path, text: str) -> None:
    """Temp sibling -> fsync -> rename: readers see the old file or the whole new one, never half of it.
    The temp name carries the pid and a random part: every process of a multi-node ``chatrlhf train
    --feedback`` run writes the same files, and two hosts can share a pid on a shared file system.
    (``chatrlhf.checkpoint.write_json_atomic`` does the same for one JSON object; importing it would load
    torch for a text file.)"""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def jsonl_text(rows: list[dict]) -> str:
    """One JSON object per line, non-ASCII kept as is."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def make_pairs(cfg: PairsConfig) -> dict[str, int]:
    """``chatrlhf pairs``: reads the rating sources, filters them into pairs, writes ``cfg.output``."""
    cfg.validate()
    out = Path(cfg.output)
    if out.is_dir():
        raise ConfigError(f"--output {out} is a directory; name a file such as {out / 'pairs.jsonl'}")
    if out.exists() and not cfg.overwrite:
        raise ConfigError(f"--output {out} already exists. Pass --overwrite true to replace it, "
                          "or choose another --output.")
    records = []
    for source in cfg.input:
        # fmt="rating" (not auto) so a file missing the score column fails naming that column and row.
        recs, _ = load_records(source, fmt="rating", bad_rows=cfg.bad_rows)
        records += recs
    pairs, stats = ratings_to_pairs(records, cfg.min_margin, cfg.min_agreement)
    if not pairs:
        # An empty file would only fail later, in `chatrlhf rm`, far from the cause.
        raise DataError(f"no pair survived the filters: {summarise(stats)}.",
                        "lower --min_margin or --min_agreement, or add ratings of several answers per prompt.",
                        source=", ".join(cfg.input))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, jsonl_text(pairs))
    print(f"[chatrlhf] pairs: {summarise(stats)} -> {out}")
    return stats
