"""Feedback database -> training data (``chatrlhf export``, and ``chatrlhf train --feedback``).

The feedback app stores two kinds of judgement: comparisons (answer a vs answer b: a, b or tie) and
ratings (one answer, overall 1-5 plus four dimensions). Both become preference pairs:

    comparisons -> group by (prompt, unordered answer pair) -> latest vote per annotator -> majority
        -> drop identical answers, ties and disagreements                      (comparisons_to_pairs)
    ratings     -> ``ratings_to_pairs`` with ``overall`` as the score           (chatrlhf.data.feedback)
    both        -> one row per pair; a pair the two sources order oppositely is dropped  (feedback_to_pairs)

Undone (retracted) judgements are not read at all: ``FeedbackStore.comparison_rows`` / ``rating_rows`` leave
them out, so they are in no file and no count. ``comparison_agreement`` is the Export page's per-prompt
agreement table, decided by the same rules.

``export_feedback`` writes the pairs (``pairs.jsonl``, read by ``chatrlhf rm`` / ``dpo`` / ``sft``), every
rating (``ratings.jsonl``, read by ``chatrlhf pairs``), every comparison (``comparisons.jsonl``), the rated
answers labelled desirable or undesirable (``kto.jsonl``, read by ``chatrlhf kto``; ``ratings_to_labels``) and
the counts (``export.json``). Rules and files: docs/feedback.md, "Export and training".

Nothing here imports torch: ``chatrlhf.data`` (whose package init loads the collators, hence torch) is
imported inside the functions that need it, so the feedback app can import this module cheaply.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from chatrlhf.config import ConfigError, check_filter_flags
from chatrlhf.feedback.schema import DIMENSIONS
from chatrlhf.feedback.store import FeedbackStore

COMPARISON_STAT_KEYS = ("comparisons", "superseded", "candidate_pairs", "dropped_identical", "dropped_tie",
                        "dropped_disagreement", "pairs")
"""Always ``candidate_pairs = dropped_identical + dropped_tie + dropped_disagreement + pairs``."""
MERGE_STAT_KEYS = ("comparison_pairs", "rating_pairs", "merged", "dropped_conflict", "pairs")
"""Always ``pairs = comparison_pairs + rating_pairs - merged - 2 * dropped_conflict``."""
FILES = ("pairs.jsonl", "ratings.jsonl", "comparisons.jsonl", "kto.jsonl", "export.json")
"""What an export writes, in this order: ``export.json`` last, so its presence means the others are complete."""
EXPORT_FLAGS = {"db": "--db", "min_margin": "--min_margin", "min_agreement": "--min_agreement",
                "overwrite": "--overwrite", "output_dir": "--output_dir"}
"""Flag names used in error messages (``chatrlhf train --feedback`` passes its own)."""
AGREEMENT_ROWS = 50
"""The Export page's agreement table shows at most this many pairs (lowest agreement first)."""
HEADLINE_CHARS = 80
"""The agreement table names a prompt by the first this many characters of its last message."""


@dataclass
class ExportConfig:
    """Export the feedback collected by ``chatrlhf serve`` (its SQLite file) as training data: filtered
    preference pairs for ``chatrlhf rm`` / ``chatrlhf dpo``, and every rating and comparison as JSON lines."""

    db: str = "feedback.db"
    """The feedback database ``chatrlhf serve --db`` wrote."""
    output_dir: str = "outputs/feedback"
    """Where pairs.jsonl, ratings.jsonl, comparisons.jsonl and export.json (the filter counts) go."""
    overwrite: bool = False
    """Replace files of an earlier export in ``output_dir``. Off: stop instead of overwriting."""
    min_margin: float = 1.0
    """Ratings: drop pairs of answers whose mean overall scores differ by less than this (as ``chatrlhf pairs``)."""
    min_agreement: float = 1.0
    """Comparisons: the share of a pair's votes that must go to the winning answer (a tie vote counts
    against); ratings: the share of annotators who rated both answers that must order them like the means
    (as ``chatrlhf pairs``). 1.0: any dissent or tie vote drops the pair."""
    kto_desirable_min: float = 4.0
    """kto.jsonl: an answer whose mean overall rating is at least this is desirable."""
    kto_undesirable_max: float = 2.0
    """kto.jsonl: an answer whose mean overall rating is at most this is undesirable (between: left out)."""

    def validate(self, prefix: str = "") -> None:
        if not self.db:
            raise ConfigError("--db is empty: name the feedback database chatrlhf serve wrote")
        check_filter_flags(self.min_margin, self.min_agreement)
        if not self.kto_undesirable_max < self.kto_desirable_min:  # also catches NaN
            raise ConfigError(f"--kto_undesirable_max ({self.kto_undesirable_max}) must be below --kto_desirable_min "
                              f"({self.kto_desirable_min}), or an answer would be both (defaults 2 and 4)")


@dataclass
class _Pair:
    """One prompt's unordered answer pair, with every annotator's vote on it."""

    prompt: list[dict]
    texts: dict[str, str] = field(default_factory=dict)  # normalised text -> first spelling seen (1 or 2 entries)
    votes: dict[str, str | None] = field(default_factory=dict)  # voter -> normalised winner, None for a tie


def _voter(row: dict, index: int) -> str:
    """The annotator's name; a row without one (not written by the store) is its own voter, never merged."""
    name = row.get("annotator")
    return f"name:{name}" if isinstance(name, str) and name.strip() else f"row:{index}"


def _group_comparisons(rows: list[dict]) -> tuple[dict[tuple, _Pair], int]:
    """(prompt key, frozenset of normalised texts) -> _Pair in first-seen order; and how many votes a later
    vote of the same annotator on the same pair replaced."""
    from chatrlhf.data.feedback import _prompt_key, normalise_whitespace
    from chatrlhf.data.formats import DataError

    groups: dict[tuple, _Pair] = {}
    superseded = 0
    for i, row in enumerate(rows):
        if row.get("choice") not in ("a", "b", "tie"):
            raise DataError(f"comparison {row.get('id', i + 1)} has choice {row.get('choice')!r}.",
                            "store 'a', 'b' or 'tie' (the feedback app only writes these).", field="choice")
        a, b = normalise_whitespace(row["answer_a"]), normalise_whitespace(row["answer_b"])
        pair = groups.setdefault((_prompt_key(row["prompt"]), frozenset((a, b))), _Pair(row["prompt"]))
        pair.texts.setdefault(a, row["answer_a"])
        pair.texts.setdefault(b, row["answer_b"])
        voter = _voter(row, i)
        superseded += voter in pair.votes
        # Rows come in the order saved (comparison_rows orders by id), so a later row is the later vote.
        pair.votes[voter] = {"a": a, "b": b, "tie": None}[row["choice"]]
    return groups, superseded


def _tally(pair: _Pair) -> tuple[int, int, int]:
    """(votes for A, votes for B, tie votes), A and B being the pair's texts in first-seen order (the first
    row's answer_a, then its answer_b); a pair of identical texts has no B."""
    first, *_ = pair.texts
    winners = list(pair.votes.values())
    ties = winners.count(None)
    return winners.count(first), len(winners) - ties - winners.count(first), ties


def _judge_comparison(pair: _Pair, min_agreement: float) -> tuple[str, dict | None]:
    """Decides one pair: ("identical" | "tie" | "disagreement" | "kept", the output row or None)."""
    from chatrlhf.data.feedback import _EPS

    if len(pair.texts) == 1:
        return "identical", None
    x, y = pair.texts  # normalised texts, in first-seen order
    wins_x, wins_y, _ = _tally(pair)
    if wins_x == wins_y:
        return "tie", None
    high, low = (x, y) if wins_x > wins_y else (y, x)
    # A tie vote is in the denominator but not the numerator: it does not agree (as in annotator_agreement).
    agreement = max(wins_x, wins_y) / len(pair.votes)
    if agreement < min_agreement - _EPS:
        return "disagreement", None
    return "kept", {"prompt": pair.prompt, "chosen": pair.texts[high], "rejected": pair.texts[low],
                    "votes": len(pair.votes), "agreement": agreement, "source": "comparisons"}


def comparisons_to_pairs(rows: Iterable[dict], min_agreement: float) -> tuple[list[dict], dict[str, int]]:
    """Turns pairwise votes into filtered preference pairs; returns (pairs, stats).

    ``rows``: ``{"prompt": [messages], "answer_a": str, "answer_b": str, "choice": "a" | "b" | "tie",
    "annotator": str}`` in the order saved (what ``FeedbackStore.comparison_rows`` gives). Rules:

    1. votes group by prompt (canonical JSON of its messages) and the *unordered* pair of answer texts
       after whitespace normalisation, so (x, y) shown to one annotator and (y, x) to another are one pair;
    2. an annotator who voted on a pair more than once counts with their latest vote only (the later row;
       the earlier ones are counted as ``superseded``);
    3. a pair whose two answers are equal after normalisation is dropped (``dropped_identical``);
    4. chosen = the answer with more wins; equal wins (all ties included) -> dropped as a tie;
    5. agreement = the chosen answer's wins / all votes (a tie vote does not agree); below
       ``min_agreement`` (1e-9 tolerance) -> dropped as a disagreement.

    Output order: pairs in first-seen order. Each pair is ``{"prompt", "chosen", "rejected", "votes",
    "agreement", "source": "comparisons"}`` (``votes``: annotators counted; a text is written in the first
    spelling seen for the pair).

    Worked example (min_agreement=1), one prompt, annotators ann, bob, cy; rows in saved order:
        1 ann "4" vs "5": b        2 bob "5" vs " 4": b       3 cy "4" vs "four": tie
        4 ann "4" vs "four": a     5 bob "four" vs "4": a     6 ann "4" vs "4 ": a
        7 ann "5" vs "4": b        8 ann "5" vs "four": b     9 bob "four" vs "5": a     10 cy "5" vs "four": a
        {"4", "5"}:    ann's row 7 ("4") replaces row 1 ("5"); bob "4" -> 2-0 of 2 votes, agreement 1 -> kept,
                       chosen "4", rejected "5", votes 2
        {"4", "four"}: cy tie, ann "4", bob "four" -> 1-1 -> tie
        {"4"}:         row 6, "4" vs "4 " -> identical
        {"5", "four"}: ann "four", bob "four", cy "5" -> 2-1, agreement 2/3 < 1 -> disagreement
                       (kept with min_agreement=0.5: chosen "four", rejected "5", votes 3, agreement 2/3)
        stats: comparisons 10, superseded 1, candidate_pairs 4, dropped_identical 1, dropped_tie 1,
               dropped_disagreement 1, pairs 1
    """
    rows = list(rows)
    groups, superseded = _group_comparisons(rows)
    stats = dict.fromkeys(COMPARISON_STAT_KEYS, 0)
    stats.update(comparisons=len(rows), superseded=superseded, candidate_pairs=len(groups))
    pairs = []
    for pair in groups.values():
        verdict, row = _judge_comparison(pair, min_agreement)
        if row is None:
            stats[f"dropped_{verdict}"] += 1
        else:
            pairs.append(row)
    stats["pairs"] = len(pairs)
    return pairs, stats


def comparison_agreement(rows: Iterable[dict], pairs: Iterable[dict], min_agreement: float,
                         limit: int = AGREEMENT_ROWS) -> tuple[list[dict], int]:
    """The Export page's agreement table: every answer pair that 2+ annotators compared, lowest agreement
    first (first-seen order among equals), cut to ``limit`` rows; returns (rows, how many there are in all).

    ``rows``: comparison rows as for ``comparisons_to_pairs``; ``pairs``: what ``feedback_to_pairs`` made of
    them (and the ratings) with the same filters, to tell a pair the merge dropped. Each row: ``prompt`` (its
    last message, at most ``HEADLINE_CHARS`` characters), ``annotators``, ``a`` / ``b`` / ``tie`` (each
    annotator's latest vote, ``_tally``; A and B as first shown), ``agreement`` (the leading answer's votes /
    all votes, a tie vote agreeing with neither: the ``agreement`` a kept pair is written with), ``verdict``
    (``kept``; or why it is dropped: ``identical``, ``tie`` (equal votes for A and B), ``disagreement``
    (agreement below ``min_agreement``), ``conflict`` (the ratings order it the other way)) and ``chosen``
    (``"a"`` | ``"b"`` for a kept pair, else None).

    Worked example: ``comparisons_to_pairs``' example rows, min_agreement=1, pairs = its output:
        {"4", "four"}: cy tie, ann "4", bob "four" -> a 1, b 1, tie 1, agreement 1/3, tie
        {"5", "four"}: ann "four", bob "four", cy "5" -> a 1 ("5" shown first), b 2, agreement 2/3, disagreement
        {"4", "5"}:    ann "4" (latest), bob "4" -> a 2, b 0, agreement 1, kept, chosen "a"
        {"4"}:         one annotator -> not in the table; 3 rows in all
    """
    exported = {_pair_key(p) for p in pairs}
    groups, _ = _group_comparisons(list(rows))
    table = []
    for key, pair in groups.items():
        if len(pair.votes) < 2:
            continue
        verdict, kept = _judge_comparison(pair, min_agreement)
        a, b, tie = _tally(pair)
        if kept is not None and key not in exported:
            verdict = "conflict"  # kept by the votes, dropped by the merge with the ratings
        table.append({"prompt": _headline(pair.prompt), "annotators": len(pair.votes), "a": a, "b": b, "tie": tie,
                      "agreement": max(a, b) / len(pair.votes), "verdict": verdict,
                      "chosen": None if kept is None else "a" if a > b else "b"})
    table.sort(key=lambda row: row["agreement"])  # stable: first-seen order among equals
    return table[:limit], len(table)


def _headline(prompt: list[dict]) -> str:
    text = " ".join(str(prompt[-1].get("content", "")).split()) if prompt else ""
    return text if len(text) <= HEADLINE_CHARS else text[:HEADLINE_CHARS - 1] + "\u2026"


def rating_record(row: dict) -> dict:
    """A ``FeedbackStore.rating_rows`` row -> a *rating* row (``ratings.jsonl``, ``chatrlhf pairs``):
    ``overall`` is the score; the four dimensions, annotator, model, finished and comment ride along."""
    return {"prompt": row["prompt"], "response": row["response"], "score": row["overall"],
            "annotator": row["annotator"], **{d: row[d] for d in DIMENSIONS}, "model": row["model"],
            "finished": bool(row["finished"]), "comment": row["comment"]}


def _pair_key(pair: dict) -> tuple[str, frozenset[str]]:
    from chatrlhf.data.feedback import _prompt_key, normalise_whitespace

    return _prompt_key(pair["prompt"]), frozenset(normalise_whitespace(pair[k]) for k in ("chosen", "rejected"))


def feedback_to_pairs(comparison_rows: Iterable[dict], rating_rows: Iterable[dict], min_margin: float,
                      min_agreement: float) -> tuple[list[dict], dict]:
    """Comparison pairs and rating pairs, merged; returns (pairs, stats).

    ``comparison_rows`` / ``rating_rows``: what ``FeedbackStore.comparison_rows`` / ``rating_rows`` give.
    Comparisons go through ``comparisons_to_pairs(rows, min_agreement)``; ratings, with ``overall`` as the
    score, through ``ratings_to_pairs(records, min_margin, min_agreement)``. Then, per unordered pair
    (prompt, whitespace-normalised answers) that both sources kept:

    - same direction -> one row: the comparison row, with ``"source": "comparisons+ratings"`` and the
      ratings' ``margin`` added (counted as ``merged``);
    - opposite directions -> both rows are dropped (counted once as ``dropped_conflict``).

    Rating-only rows keep ``ratings_to_pairs``' columns plus ``"source": "ratings"``. Output order: the
    comparison pairs in their order, then the rating-only pairs in theirs.

    ``stats``: ``{"comparisons": <comparisons_to_pairs stats>, "ratings": <ratings_to_pairs stats>,
    "comparison_pairs", "rating_pairs", "merged", "dropped_conflict", "pairs"}``.

    Example: comparisons keep ("4" over "5") and ("four" over "5"); ratings keep ("4" over "5") and
    ("5" over "four") and ("4" over "four") -> ("4", "5") merged; ("four", "5") conflict, both dropped;
    ("4", "four") from ratings alone -> 2 pairs = 2 + 3 - 1 merged - 2 x 1 conflict.
    """
    from chatrlhf.data.feedback import normalise_whitespace, ratings_to_pairs

    comparison_pairs, comparison_stats = comparisons_to_pairs(comparison_rows, min_agreement)
    rating_pairs, rating_stats = ratings_to_pairs([rating_record(r) for r in rating_rows], min_margin, min_agreement)
    by_key = {_pair_key(p): p for p in rating_pairs}
    out, used, conflicts = [], set(), set()
    merged = 0
    for pair in comparison_pairs:
        key = _pair_key(pair)
        other = by_key.get(key)
        if other is None:
            out.append(pair)
        elif normalise_whitespace(other["chosen"]) == normalise_whitespace(pair["chosen"]):  # same direction
            out.append({**pair, "source": "comparisons+ratings", "margin": other["margin"]})
            used.add(key)
            merged += 1
        else:
            conflicts.add(key)
    out += [{**p, "source": "ratings"} for p in rating_pairs if _pair_key(p) not in used | conflicts]
    stats = {"comparisons": comparison_stats, "ratings": rating_stats, "comparison_pairs": len(comparison_pairs),
             "rating_pairs": len(rating_pairs), "merged": merged, "dropped_conflict": len(conflicts), "pairs": len(out)}
    return out, stats


def summarise_export(stats: dict) -> str:
    """One log line: ``comparisons(comparisons=10 ... pairs=1) ratings(ratings=6 ... pairs=1) merged=0 ...``."""
    from chatrlhf.data.feedback import summarise

    comparisons = " ".join(f"{k}={stats['comparisons'][k]}" for k in COMPARISON_STAT_KEYS)
    merge = " ".join(f"{k}={stats[k]}" for k in MERGE_STAT_KEYS)
    return f"comparisons({comparisons}) ratings({summarise(stats['ratings'])}) {merge}"


def _check_paths(db: Path, out: Path, overwrite: bool, flags: Mapping[str, str]) -> dict[str, Path]:
    """Refuses, before anything is read or written, a missing database and an earlier export in the way.
    The database must already exist: ``FeedbackStore`` would create an empty one at a mistyped path."""
    if not db.is_file():
        what = "is a directory" if db.is_dir() else "does not exist"
        raise ConfigError(f"{flags['db']} {db} {what}. Fix: name the database file `chatrlhf serve --db` wrote "
                          "(relative paths start at the working directory).")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flags['output_dir']} {out} is a file. Fix: name a directory for the exported files.")
    paths = {name: out / name for name in FILES}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{', '.join(existing)} already exist(s) from an earlier export. Fix: pass "
                          f"{flags['overwrite']} true to replace them, or choose another {flags['output_dir']}.")
    return paths


def export_rows(store: FeedbackStore, min_margin: float, min_agreement: float, kto_desirable_min: float = 4.0,
                kto_undesirable_max: float = 2.0) -> tuple[dict[str, list[dict]], dict]:
    """The rows of the exported files (``pairs``, ``ratings``, ``comparisons``, ``kto``) and the filter stats
    (``kto``'s under ``stats["kto"]``); the web app's downloads and ``export_feedback`` both come from here."""
    from chatrlhf.data.feedback import ratings_to_labels

    comparisons, ratings = store.comparison_rows(), store.rating_rows()
    pairs, stats = feedback_to_pairs(comparisons, ratings, min_margin, min_agreement)
    records = [rating_record(r) for r in ratings]
    labelled, stats["kto"] = ratings_to_labels(records, kto_desirable_min, kto_undesirable_max)
    return {"pairs": pairs, "ratings": records, "comparisons": comparisons, "kto": labelled}, stats


def export_feedback(db: str | Path, output_dir: str | Path, min_margin: float, min_agreement: float,
                    overwrite: bool, flags: Mapping[str, str] = EXPORT_FLAGS, kto_desirable_min: float = 4.0,
                    kto_undesirable_max: float = 2.0) -> dict:
    """Writes pairs.jsonl, ratings.jsonl, comparisons.jsonl, kto.jsonl and export.json (each atomically,
    export.json last) into ``output_dir``; returns what export.json holds: settings, counts and the stats of
    ``feedback_to_pairs`` (and of ``ratings_to_labels`` under ``kto``).

    When no pair survives the filters, every file is still written (pairs.jsonl empty, so the directory
    describes this export, not an earlier one) and a DataError then names the counts and the flags to
    lower: a training run on an empty pairs.jsonl would only fail later, further from the cause.
    ``flags``: the flag names errors mention (``EXPORT_FLAGS`` for ``chatrlhf export``).
    """
    db, out = Path(db), Path(output_dir)
    paths = _check_paths(db, out, overwrite, flags)
    rows, stats = export_rows(FeedbackStore(db), min_margin, min_agreement, kto_desirable_min, kto_undesirable_max)
    pairs, ratings, comparisons = rows["pairs"], rows["ratings"], rows["comparisons"]
    settings = {"min_margin": min_margin, "min_agreement": min_agreement, "kto_desirable_min": kto_desirable_min,
                "kto_undesirable_max": kto_undesirable_max}
    summary = {"db": str(db.resolve()), "settings": settings,
               "counts": {"comparisons": len(comparisons), "ratings": len(ratings), "pairs": len(pairs),
                          "kto": len(rows["kto"])},
               "stats": stats, "files": {name: str(p) for name, p in paths.items()}}
    from chatrlhf.data.feedback import jsonl_text, write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(paths["pairs.jsonl"], jsonl_text(pairs))
    write_text_atomic(paths["ratings.jsonl"], jsonl_text(ratings))
    write_text_atomic(paths["comparisons.jsonl"], jsonl_text(comparisons))
    write_text_atomic(paths["kto.jsonl"], jsonl_text(rows["kto"]))
    write_text_atomic(paths["export.json"], json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    if not pairs:
        from chatrlhf.data.formats import DataError

        why = "the database holds no comparisons or ratings yet: " if not comparisons and not ratings else ""
        raise DataError(f"{why}no preference pair survived the filters ({summarise_export(stats)}); "
                        f"{paths['ratings.jsonl']} and {paths['comparisons.jsonl']} were written, "
                        f"{paths['pairs.jsonl']} is empty.",
                        f"lower {flags['min_margin']} or {flags['min_agreement']}, or collect more comparisons and "
                        "ratings (several annotators per pair).", source=str(db))
    return summary


def run_export(cfg: ExportConfig) -> dict:
    """``chatrlhf export``: the database's feedback -> ``cfg.output_dir``; prints one summary line."""
    cfg.validate()
    summary = export_feedback(cfg.db, cfg.output_dir, cfg.min_margin, cfg.min_agreement, cfg.overwrite,
                              kto_desirable_min=cfg.kto_desirable_min, kto_undesirable_max=cfg.kto_undesirable_max)
    counts = summary["counts"]
    print(f"[chatrlhf] export: {counts['comparisons']} comparisons, {counts['ratings']} ratings -> "
          f"{counts['pairs']} pairs ({summarise_export(summary['stats'])}), {counts['kto']} labelled answers "
          f"-> {cfg.output_dir}")
    return summary
