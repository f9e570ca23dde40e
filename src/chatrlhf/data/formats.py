"""Dataset row formats: detection, normalisation to canonical records, validation and conversions.

Canonical records (plain dicts, see docs/data.md):

    preference  {"prompt": [messages ending with user], "chosen": str, "rejected": str}
    sft         {"messages": [messages with >= 1 assistant turn]}
    prompt      {"prompt": [messages ending with user]}
    rating      {"prompt": [messages], "response": str, "score": float}
    unpaired    {"prompt": [messages ending with user], "response": str, "label": bool}

Every record also carries ``"meta"`` (the row's columns the format does not use, e.g. a prompt's
``category``), ``"_source"`` and ``"_row"`` (where it came from, for error messages).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from chatrlhf.data.errors import DataError, LimitError, describe_location
from chatrlhf.limits import InputError, check_value

__all__ = ["FORMATS", "KINDS", "DataError", "LimitError", "describe_location", "detect_format", "normalise_rows",
           "parse_hh", "prompt_messages"]

log = logging.getLogger(__name__)

KINDS = ("preference", "sft", "prompt", "rating", "unpaired")
FORMATS = ("auto", "preference", "hh", "messages", "sft", "prompt", "rating", "unpaired")
ROLES = ("system", "user", "assistant", "tool")
"""Message roles; "tool" holds a tool's result (an environment's turn, docs/environments.md)."""
BAD_ROWS = ("error", "skip")
# ShareGPT-style "conversations" use {"from": "human"|"gpt", "value": ...}; map them onto our roles.
_ROLE_ALIASES = {"human": "user", "gpt": "assistant"}
_RESPONSE_COLUMNS = ("response", "completion")
_MESSAGE_COLUMNS = ("messages", "conversations")
_FORMAT_FLAG = "data.format"
_EXPECTED = (
    "prompt+chosen+rejected (preference), chosen+rejected (hh, or message lists), "
    "messages|conversations (messages), prompt+response|completion (sft), "
    "prompt+response+score (rating), prompt+response+label (unpaired), prompt (prompt)"
)


# ----------------------------------------------------------------------------- field validators
def _text(row: dict, field: str) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}.", f"store '{field}' as text.", field=field)
    if not value.strip():
        raise DataError("is empty or whitespace only.", "remove the row or fill in the text.", field=field)
    return value


def _content(value: Any, field: str) -> str:
    # OpenAI-style content parts: keep the text parts, in order.
    # (a part whose "text" is not a string is left as a list, so it fails below instead of becoming its repr)
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text", ""), str) for p in value):
        value = "".join(p.get("text", "") for p in value)
    if not isinstance(value, str):
        raise DataError(f"message content must be a string, got {type(value).__name__}.",
                        "store each message as {\"role\": ..., \"content\": \"text\"}.", field=field)
    return value


def _messages(value: Any, field: str) -> list[dict]:
    """Validates a role/content list (ShareGPT from/value accepted) and returns clean copies."""
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"expected a non-empty list of messages, got {type(value).__name__}.",
                        'use [{"role": "user", "content": "..."}, ...].', field=field)
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise DataError(f"message {i} is a {type(msg).__name__}, not an object.",
                            'use {"role": ..., "content": ...}.', field=field)
        role = msg.get("role", msg.get("from"))
        role = _ROLE_ALIASES.get(role, role) if isinstance(role, str) else role  # a list role is unhashable
        if role not in ROLES:
            raise DataError(f"message {i} has unknown role {role!r}.",
                            f"use one of {', '.join(ROLES)} (ShareGPT 'human'/'gpt' are accepted).", field=field)
        content = _content(msg.get("content", msg.get("value")), field)
        if role != "system" and not content.strip():
            raise DataError(f"message {i} ({role}) is empty.", "remove the row or fill in the text.", field=field)
        out.append({"role": role, "content": content})
    return out


def _prompt(row: dict, field: str = "prompt") -> list[dict]:
    """A prompt is a string (one user turn) or a message list; either way it must end with a user turn."""
    value = row.get(field)
    msgs = [{"role": "user", "content": _text(row, field)}] if isinstance(value, str) else _messages(value, field)
    if msgs[-1]["role"] != "user":
        raise DataError(f"the prompt's last message is from {msgs[-1]['role']!r}, not 'user'.",
                        "end the prompt with the user turn the answer replies to.", field=field)
    return msgs


def prompt_messages(value: Any, field: str = "prompt") -> list[dict]:
    """One prompt value (text, or a message list ending with a user turn) -> clean messages, as a data
    file's ``prompt`` column is read; a DataError names ``field``."""
    return _prompt({field: value}, field)


def _score(row: dict, field: str = "score") -> float:
    value = row.get(field)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataError(f"score must be a number, got {type(value).__name__}.", "store a number such as 4.",
                        field=field)
    try:
        score = float(value)  # CSV cells arrive as text
    except (ValueError, OverflowError):  # OverflowError: an integer too large for a float
        raise DataError(f"score {value!r} is not numeric.", "store a number such as 4.", field=field) from None
    if not math.isfinite(score):
        raise DataError(f"score is {score}.", "store a finite number.", field=field)
    return score


_LABELS = {"true": True, "1": True, "desirable": True, "false": False, "0": False, "undesirable": False}


def _label(row: dict, field: str = "label") -> bool:
    """An unpaired answer's label: true (desirable) or false (undesirable); also 1/0 and their text (CSV)."""
    value = row.get(field)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _LABELS:
        return _LABELS[value.strip().lower()]
    raise DataError(f"label must be true (a desirable answer) or false (an undesirable one), got {value!r}.",
                    "store true/false (or 1/0).", field=field)


def _check_distinct(chosen: str, rejected: str) -> None:
    if chosen.strip() == rejected.strip():
        raise DataError("chosen and rejected are identical, so the pair carries no preference.",
                        "remove the row (or set data.bad_rows=skip to drop such rows).", field="rejected")


# ----------------------------------------------------------------------------- HH-RLHF parsing
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def parse_hh(text: str, field: str) -> tuple[list[dict], str]:
    """Splits ``"\\n\\nHuman: q\\n\\nAssistant: a ..."`` into (prompt messages, final assistant answer)."""
    # Some copies of the data drop the leading blank line; the turn markers are otherwise exact.
    parts = _HH_TURN.split(text if text.startswith("\n\n") else "\n\n" + text.lstrip())
    if parts[0].strip():
        raise DataError("has text before the first 'Human:' turn (chosen/rejected without a prompt column are "
                        "read as HH-RLHF dialogues).",
                        "use the HH-RLHF layout '\\n\\nHuman: ...\\n\\nAssistant: ...', or add a 'prompt' "
                        "column for prompt/chosen/rejected data.", field=field)
    turns = [("user" if r == "Human" else "assistant", c.strip()) for r, c in zip(parts[1::2], parts[2::2])]
    if len(turns) < 2 or turns[-1][0] != "assistant":
        raise DataError("does not end with an 'Assistant:' turn after a 'Human:' turn.",
                        "use the HH-RLHF layout '\\n\\nHuman: ...\\n\\nAssistant: ...'.", field=field)
    prompt = [{"role": r, "content": c} for r, c in turns[:-1]]
    if prompt[-1]["role"] != "user" or any(not m["content"] for m in prompt):
        raise DataError("the conversation before the final answer is malformed (empty turn or no user turn).",
                        "remove the row.", field=field)
    if not turns[-1][1]:
        raise DataError("the final 'Assistant:' answer is empty.", "remove the row.", field=field)
    return prompt, turns[-1][1]


# ----------------------------------------------------------------------------- row normalisers
def _pref_from_lists(row: dict) -> dict:
    """chosen/rejected as message lists: the shared prefix is the prompt, the final turns are the answers."""
    chosen, rejected = _messages(row.get("chosen"), "chosen"), _messages(row.get("rejected"), "rejected")
    for field, msgs in (("chosen", chosen), ("rejected", rejected)):
        if msgs[-1]["role"] != "assistant":
            raise DataError("the last message is not from the assistant.",
                            "end each list with the assistant answer being compared.", field=field)
    if chosen[:-1] != rejected[:-1]:
        raise DataError("chosen and rejected differ before their final assistant turn.",
                        "both lists must share the same conversation and differ only in the last answer.",
                        field="rejected")
    if chosen[:-1]:
        prompt = chosen[:-1]
        if prompt[-1]["role"] != "user":
            raise DataError("the turn before the final answer is not from the user.",
                            "end the shared conversation with a user turn.", field="chosen")
    else:  # answers-only lists (UltraFeedback-like) take the prompt from its own column
        prompt = _prompt(row)
    _check_distinct(chosen[-1]["content"], rejected[-1]["content"])
    return {"prompt": prompt, "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}


def _norm_preference(row: dict) -> dict:
    if isinstance(row.get("chosen"), (list, tuple)):
        return _pref_from_lists(row)
    prompt, chosen, rejected = _prompt(row), _text(row, "chosen"), _text(row, "rejected")
    _check_distinct(chosen, rejected)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _norm_hh(row: dict) -> dict:
    chosen_prompt, chosen = parse_hh(_text(row, "chosen"), "chosen")
    rejected_prompt, rejected = parse_hh(_text(row, "rejected"), "rejected")
    if chosen_prompt != rejected_prompt:
        raise DataError("chosen and rejected do not share the conversation before the last '\\n\\nAssistant:'.",
                        "both texts must be the same dialogue with different final answers.", field="rejected")
    _check_distinct(chosen, rejected)
    return {"prompt": chosen_prompt, "chosen": chosen, "rejected": rejected}


def _norm_messages(row: dict) -> dict:
    column = next((c for c in _MESSAGE_COLUMNS if c in row), _MESSAGE_COLUMNS[0])
    msgs = _messages(row[column], column)
    roles = [m["role"] for m in msgs]
    if "assistant" not in roles:
        raise DataError("has no assistant turn to learn from.", "add the assistant answer(s).", field=column)
    if "user" not in roles[: roles.index("assistant")]:
        raise DataError("the first assistant turn does not follow a user turn.",
                        "start the conversation with a user turn (after an optional system turn).", field=column)
    return {"messages": msgs}


def _norm_sft(row: dict) -> dict:
    column = next((c for c in _RESPONSE_COLUMNS if c in row), "response")
    return {"messages": _prompt(row) + [{"role": "assistant", "content": _text(row, column)}]}


def _norm_prompt(row: dict) -> dict:
    return {"prompt": _prompt(row)}


def _norm_rating(row: dict) -> dict:
    column = next((c for c in _RESPONSE_COLUMNS if c in row), "response")
    return {"prompt": _prompt(row), "response": _text(row, column), "score": _score(row)}


def _norm_unpaired(row: dict) -> dict:
    column = next((c for c in _RESPONSE_COLUMNS if c in row), "response")
    return {"prompt": _prompt(row), "response": _text(row, column), "label": _label(row)}


# format name -> (normaliser, kind it produces, columns it reads)
_NORMALISERS: dict[str, tuple[Callable[[dict], dict], str, tuple[str, ...]]] = {
    "preference": (_norm_preference, "preference", ("prompt", "chosen", "rejected")),
    "hh": (_norm_hh, "preference", ("chosen", "rejected")),
    "messages": (_norm_messages, "sft", _MESSAGE_COLUMNS),
    # chosen/rejected as message lists; picked by normalise_rows when fmt is "messages" (not a user format)
    "messages-preference": (_pref_from_lists, "preference", ("prompt", "chosen", "rejected")),
    "sft": (_norm_sft, "sft", ("prompt", *_RESPONSE_COLUMNS)),
    "prompt": (_norm_prompt, "prompt", ("prompt",)),
    "rating": (_norm_rating, "rating", ("prompt", *_RESPONSE_COLUMNS, "score")),
    "unpaired": (_norm_unpaired, "unpaired", ("prompt", *_RESPONSE_COLUMNS, "label")),
}
# format name -> required columns, each a tuple of accepted alternatives
_REQUIRED = {
    "preference": [("prompt",), ("chosen",), ("rejected",)],
    "hh": [("chosen",), ("rejected",)],
    "messages": [_MESSAGE_COLUMNS],
    "messages-preference": [("chosen",), ("rejected",)],
    "sft": [("prompt",), _RESPONSE_COLUMNS],
    "prompt": [("prompt",)],
    "rating": [("prompt",), _RESPONSE_COLUMNS, ("score",)],
    "unpaired": [("prompt",), _RESPONSE_COLUMNS, ("label",)],
}


def detect_format(columns: Iterable[str], first_row: dict | None = None) -> str:
    """Picks the format from column names (rules in docs/data.md); the first row breaks the hh tie."""
    cols = set(columns)
    if cols & set(_MESSAGE_COLUMNS):
        return "messages"
    if {"chosen", "rejected"} <= cols:
        if first_row is not None and isinstance(first_row.get("chosen"), (list, tuple)):
            return "messages"
        return "preference" if "prompt" in cols else "hh"
    if "prompt" in cols and cols & set(_RESPONSE_COLUMNS):
        return "rating" if "score" in cols else "unpaired" if "label" in cols else "sft"
    if "prompt" in cols:
        return "prompt"
    raise DataError(f"cannot tell the format from the columns {sorted(cols)}; expected {_EXPECTED}.",
                    f"rename the columns, or name the format with {_FORMAT_FLAG}=<{'|'.join(FORMATS[1:])}>.")


def _check_columns(fmt: str, row: dict) -> None:
    missing = [" or ".join(alts) for alts in _REQUIRED[fmt] if not any(a in row for a in alts)]
    if missing:
        raise DataError(f"missing column {', '.join(repr(m) for m in missing)} for format '{fmt}'; "
                        f"columns found: {sorted(map(str, row))}; formats expected: {_EXPECTED}.",
                        f"add the column, or pick another format with {_FORMAT_FLAG}.", field=missing[0])


def _resolve_format(rows: Sequence[tuple[int, dict]], source: str, fmt: str) -> str:
    """``fmt``, or the first row's format for ``auto``; ``messages`` with chosen/rejected is messages-preference."""
    if fmt == "auto":
        try:
            fmt = detect_format(rows[0][1], rows[0][1])
        except DataError as err:
            raise err.located(source, rows[0][0]) from None
    first = rows[0][1]
    if fmt == "messages" and not set(first) & set(_MESSAGE_COLUMNS) and {"chosen", "rejected"} <= set(first):
        fmt = "messages-preference"
    return fmt


def _check_limits(row: dict, source: str, row_no: int) -> None:
    """Every row, whichever reader (or caller) made it, meets chatrlhf.limits before a normaliser reads it:
    JSON rows were checked as they were parsed, but CSV cells, Parquet and ``datasets`` values were not, and
    a lone surrogate would reach the tokenizer (a TypeError there) and a 100-deep value the JSON writers."""
    try:
        check_value(row, describe_location(source, row_no))
    except InputError as err:
        raise LimitError(err, source, row_no) from None


def _normalise_each(rows: Sequence[tuple[int, dict]], source: str, fmt: str,
                    bad_rows: str) -> tuple[list[dict], list[str]]:
    """(canonical records, reasons of the skipped rows); raises on the first bad row unless ``skip``."""
    norm, _, used = _NORMALISERS[fmt]
    records, skipped = [], []
    for row_no, row in rows:
        try:
            _check_limits(row, source, row_no)
            _check_columns(fmt, row)
            rec = norm(row)
        except DataError as err:
            err.located(source, row_no)
            if bad_rows == "error":
                raise
            skipped.append(str(err))
            continue
        rec["meta"] = {k: v for k, v in row.items() if k not in used}
        rec["_source"], rec["_row"] = source, row_no
        records.append(rec)
    return records, skipped


def normalise_rows(rows: Sequence[tuple[int, dict]], source: str, fmt: str = "auto", bad_rows: str = "error",
                   unread: Sequence[str] = ()) -> tuple[list[dict], str]:
    """Turns raw ``(row_number, row)`` pairs into canonical records of one kind; returns (records, kind).

    ``bad_rows="skip"`` drops invalid rows (logging the first few reasons) instead of raising; an empty
    result raises either way. ``unread``: the reasons of rows the reader already dropped under ``skip``
    (a line that is not JSON or not UTF-8), counted and logged with the rest.
    """
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}.", f"use {_FORMAT_FLAG}=<{'|'.join(FORMATS)}>.", source=source)
    if bad_rows not in BAD_ROWS:
        raise DataError(f"unknown bad-row policy {bad_rows!r}.", "use data.bad_rows=error or skip.")
    if not rows and not unread:
        raise DataError("has no rows.", "point the source at a non-empty file or dataset.", source=source)
    fmt = _resolve_format(rows, source, fmt) if rows else fmt
    records, skipped = _normalise_each(rows, source, fmt, bad_rows) if rows else ([], [])
    skipped = [*unread, *skipped]
    total = len(rows) + len(unread)
    if skipped:
        log.warning("%s: skipped %d of %d rows as invalid; first: %s", source, len(skipped), total,
                    " | ".join(skipped[:3]))
    if not records:
        raise DataError(f"no usable rows left ({total} read, {len(skipped)} invalid; first problem: "
                        f"{skipped[0] if skipped else 'none'}).", "fix the rows or check the format.", source=source)
    return records, _NORMALISERS[fmt][1]  # the kind
