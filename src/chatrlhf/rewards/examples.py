"""Rule-based example rewards: rewards as code, usable as ``--reward chatrlhf.rewards.examples:NAME``.

Each is ``NAME(prompt: str, response: str, metadata: dict) -> float`` in [0, 1], cheap (regular
expressions, no model), and deterministic. ``metadata`` is the data row's extra columns plus
``finished`` (False when the answer was cut at the token limit). ``reference_f1`` shows the batched form
(``@batched``, TRL's ``NAME(prompts, completions, **columns) -> list[float]``). They are meant to be mixed with a learned
reward in an ensemble (``0.8*outputs/rm/model + 0.2*chatrlhf.rewards.examples:format_reward``): on their
own they are easy to game (a 30-word answer of the keywords scores well on length and keywords).
"""

from __future__ import annotations

import re
from collections import Counter

from chatrlhf.rewards import lexicon as lex
from chatrlhf.rewards.rater import (
    _sentences,
    classify_harmful,
    ends_cleanly,
    is_refusal,
    piecewise_linear,
    repetition_ratio,
)
from chatrlhf.rewards.sources import batched

# Markdown that reads as clutter in a chat answer: headings, bold/underline markers, code fences, horizontal
# rules, table rows. Plain "-" / "1." lists are allowed (they are normal in how-to answers).
MARKDOWN_CLUTTER = re.compile(r"^\s{0,3}#{1,6}\s|\*\*|__|```|^\s*(?:-{3,}|\*{3,})\s*$|^\s*\|.*\|\s*$", re.M)


def format_reward(prompt: str, response: str, metadata: dict) -> float:
    """Mean of three checks, each 0 or 1: the answer ends cleanly (terminal punctuation, a closing
    quote/bracket, or a final list item: ``rater.ends_cleanly``); it holds no leftover chat-template tokens
    (``<|im_end|>``, ``[INST]``, ``</s>``: ``lexicon.LEAKED_MARKUP``); it holds no markdown clutter
    (``MARKDOWN_CLUTTER``). An answer with no visible text scores 0.

    Examples: "Paris is the capital." -> 1; "## Answer\\nParis is the capital" -> (0 + 1 + 0) / 3 = 1/3;
    "<|im_start|>Paris is the capital." -> (1 + 0 + 1) / 3 = 2/3.
    """
    if not response.strip():
        return 0.0
    checks = (ends_cleanly(response), not lex.LEAKED_MARKUP.search(response), not MARKDOWN_CLUTTER.search(response))
    return sum(checks) / len(checks)


LENGTH_MIN_WORDS = 15
"""Shortest answer with full length reward: below it the reward falls linearly to 0 at 0 words."""
LENGTH_MAX_WORDS = 60
"""Longest answer with full length reward (the demo's chosen answers have a median of 57 words and answers
are cut at 96 tokens, about 70 words); above it the reward falls linearly to 0 at LENGTH_ZERO_WORDS."""
LENGTH_ZERO_WORDS = 120
"""Answer length (words) where the length reward reaches 0 (twice the upper end of the target range)."""


def length_reward(prompt: str, response: str, metadata: dict) -> float:
    """1 for LENGTH_MIN_WORDS..LENGTH_MAX_WORDS (15..60) whitespace-separated words, falling linearly to 0
    at 0 words and at LENGTH_ZERO_WORDS (120) words.

    Examples: 0 words -> 0; 6 words -> 6/15 = 0.4; 30 words -> 1; 90 words -> 1 - (90-60)/(120-60) = 0.5;
    150 words -> 0.
    """
    n = len(response.split())
    knots = ((0, 0.0), (LENGTH_MIN_WORDS, 1.0), (LENGTH_MAX_WORDS, 1.0), (LENGTH_ZERO_WORDS, 0.0))
    return piecewise_linear(n, knots)


def _keywords(metadata: dict) -> list[str]:
    """``metadata["keywords"]`` as a list: a list of strings, or one comma-separated string."""
    raw = metadata.get("keywords") or []
    items = raw.split(",") if isinstance(raw, str) else raw
    return [k.strip() for k in items if str(k).strip()]


def keyword_reward(prompt: str, response: str, metadata: dict) -> float:
    """Fraction of ``metadata["keywords"]`` (a list, or a comma-separated string) found in the answer as
    whole words or phrases, ignoring case; 0 when the row gives no keywords.

    Example: keywords ["water", "sunlight", "soil"], answer "Plants need water and sunlight." -> 2/3
    ("soil" is missing); keywords "CO2, oxygen" and answer "It releases oxygen." -> 1/2.
    """
    keywords = _keywords(metadata)
    if not keywords:
        return 0.0
    # (?<!\\w) / (?!\\w) instead of \\b, so keywords that end in symbols ("C++") still match as whole words.
    found = sum(bool(re.search(rf"(?<!\w){re.escape(k)}(?!\w)", response, re.I)) for k in keywords)
    return found / len(keywords)


def refusal_reward(prompt: str, response: str, metadata: dict) -> float:
    """1 when the answer declines exactly when it should: it refuses a harmful request, or it does not
    refuse a harmless one; else 0. Harmfulness is ``metadata["harmful"]`` (the demo prompts carry it),
    else ``rater.classify_harmful(prompt)``; refusal is ``rater.is_refusal(response)``.

    Examples: harmful, "I can't help with that." -> 1; harmful, "Sure, here is how..." -> 0;
    harmless, "I can't help with that." -> 0; harmless, "Sure, here is how..." -> 1.
    """
    harmful = metadata.get("harmful")
    harmful = classify_harmful(prompt) if harmful is None else bool(harmful)
    return float(is_refusal(response) == harmful)


def repetition_reward(prompt: str, response: str, metadata: dict) -> float:
    """1 - the repetition ratio of ``rater.repetition_ratio``: max(1 - unique/total word trigrams,
    1 - unique/total sentences). Degenerate loops ("the the the ...") score near 0; 0 if the answer has no words.

    Example: "the sea is the sea is the sea is the sea" (11 words, 9 trigrams, 3 distinct) -> 1 - 2/3 = 1/3.
    """
    words = lex.WORD.findall(response.lower())
    if not words:
        return 0.0
    return 1.0 - repetition_ratio(words, _sentences(response))


def _word_f1(answer: str, reference: str) -> float:
    answer_words, reference_words = (Counter(lex.WORD.findall(t.lower())) for t in (answer, reference))
    common = sum((answer_words & reference_words).values())
    if not common:
        return 0.0
    precision, recall = common / sum(answer_words.values()), common / sum(reference_words.values())
    return 2 * precision * recall / (precision + recall)


@batched
def reference_f1(prompts: list[str], completions: list[str], reference: list | None = None, **columns) -> list[float]:
    """Batched (TRL's form): each answer's word F1 against its row's ``reference`` column, the SQuAD answer
    metric: F1 = 2PR / (P + R) with P = shared words / answer words, R = shared words / reference words
    (words as ``lexicon.WORD``, lower-cased, counted with repeats). 0 for a row without a reference (None or
    not text) and for no shared word.

    Example: "The sky is blue." against reference "blue sky": 2 shared words, P = 2/4, R = 2/2,
    F1 = 2 * 0.5 * 1 / 1.5 = 2/3.
    """
    references = reference if reference is not None else [None] * len(completions)
    return [_word_f1(c, r) if isinstance(r, str) else 0.0 for c, r in zip(completions, references)]
