"""Held-out evaluation prompts: the shipped demo split or a user's .jsonl file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from chatrlhf.data.formats import DataError
from chatrlhf.data.readers import read_json_lines

DEMO = "demo"
_ROW_FIX = (
    'each line must be a JSON object like {"id": "q1", "prompt": "How do I boil an egg?", "harmful": false}.'
)


@dataclass
class EvalPrompt:
    """One single-turn evaluation prompt."""

    id: str
    """Stable identifier (the row's ``id``, else ``line-<n>``), used to join answers across models."""
    messages: list[dict]
    """The prompt as chat messages (one user turn), fed through the model's chat template."""
    text: str
    """The user's text, what the gold rater reads."""
    harmful: bool | None
    """Whether a good assistant declines it; None: the rater's keyword classifier decides."""
    category: str | None = field(default=None)
    """The row's ``category`` when given (the demo has facts, how-to, advice, ... and harmful)."""


def demo_prompts_path() -> Path:
    """The shipped held-out prompts, ``chatrlhf/demo_data/prompts_eval.jsonl`` (120 rows)."""
    return Path(str(resources.files("chatrlhf") / "demo_data" / "prompts_eval.jsonl"))


def _parse_row(obj: dict, source: str, row: int) -> EvalPrompt:
    text = obj.get("prompt")
    if not isinstance(text, str) or not text.strip():
        problem = (
            "is missing." if text is None else f"must be a non-empty string, got {json.dumps(text)[:60]}."
        )
        raise DataError(problem, _ROW_FIX, source=source, row=row, field="prompt")
    harmful = obj.get("harmful")
    if harmful is not None and not isinstance(harmful, bool):
        raise DataError(
            f"must be true, false or null, got {json.dumps(harmful)[:60]}.",
            "use a JSON boolean, or leave the field out to let the rater's classifier decide.",
            source=source,
            row=row,
            field="harmful",
        )
    ident = obj.get("id", f"line-{row}")
    category = obj.get("category")
    return EvalPrompt(
        id=str(ident),
        messages=[{"role": "user", "content": text}],
        text=text,
        harmful=harmful,
        category=None if category is None else str(category),
    )


def spread_indices(n: int, k: int) -> list[int]:
    """k of n positions evenly spaced from the first, floor(i * n / k) for i < k (all n when k >= n).

    Example: n=10, k=4 -> [0, 2, 5, 7]. A file sorted by category keeps its mix: the first 64 of the
    demo's 120 prompts hold no harmful or how-to prompt at all, 64 spread ones hold both.
    """
    return list(range(n)) if k >= n else [i * n // k for i in range(k)]


def load_eval_prompts(source: str = DEMO, limit: int | None = None, spread: bool = False) -> list[EvalPrompt]:
    """The first ``limit`` prompts (all when None) of ``source``: ``"demo"`` or a .jsonl path.

    ``spread``: take ``limit`` prompts evenly spaced through the file instead of the first ones (see
    :func:`spread_indices`). Rows: ``{"id", "category", "prompt", "harmful"}``; only ``prompt`` (a string)
    is required. Blank lines are skipped. A bad row raises :class:`DataError` naming the file, line and
    field; ids must be unique.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for every prompt), got {limit}")
    path = demo_prompts_path() if source == DEMO else Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Evaluation prompts file {source} does not exist. Pass 'demo' (the shipped held-out prompts) or "
            'a .jsonl file with one {"id", "prompt", "harmful"} object per line.'
        )
    # The data layer's reader: JSON syntax, UTF-8, duplicate keys, depth, surrogates, each named by line.
    lines = read_json_lines(path, str(path), fix=_ROW_FIX)
    if not lines:
        raise DataError("holds no prompts.", _ROW_FIX, source=str(path))
    if limit is not None:
        lines = [lines[i] for i in spread_indices(len(lines), limit)] if spread else lines[:limit]
    prompts: list[EvalPrompt] = []
    seen: dict[str, int] = {}
    for row, obj in lines:
        prompt = _parse_row(obj, str(path), row)
        if prompt.id in seen:
            raise DataError(
                f"repeats id {prompt.id!r} of line {seen[prompt.id]}.",
                "give every prompt its own id.",
                source=str(path),
                row=row,
                field="id",
            )
        seen[prompt.id] = row
        prompts.append(prompt)
    return prompts
