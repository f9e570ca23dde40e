"""Conversions between canonical record kinds (see formats.py): what a stage needs from the data it is given."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from chatrlhf.data.errors import DataError

__all__ = ["convert_records", "to_prompt", "to_sft", "to_unpaired"]


def _keep(record: dict, **fields: Any) -> dict:
    out = {k: record[k] for k in ("meta", "_source", "_row") if k in record}
    return {**fields, **out}


def to_sft(record: dict) -> dict:
    """preference -> prompt + chosen answer (DeepSpeed-Chat step 1 trains on the chosen answers)."""
    return _keep(record, messages=[*record["prompt"], {"role": "assistant", "content": record["chosen"]}])


def to_prompt(record: dict) -> dict:
    """Any kind -> the prompt messages (for sft: the context before the last assistant turn)."""
    if "prompt" in record:
        out = _keep(record, prompt=record["prompt"])
        if "chosen" in record:  # kept as the reference answer of reward functions and the similarity reward
            out["meta"] = {**record.get("meta", {}), "chosen": record["chosen"]}
        return out
    msgs = record["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    if not msgs[:last] or msgs[last - 1]["role"] != "user":
        raise DataError("the turn before the last assistant answer is not a user turn, so it has no prompt.",
                        "use conversations whose last assistant turn replies to a user turn.",
                        source=record.get("_source"), row=record.get("_row"), field="messages")
    return _keep(record, prompt=msgs[:last])


def to_unpaired(record: dict) -> list[dict]:
    """preference -> two unpaired records: the chosen answer desirable, the rejected one undesirable (how TRL's
    ``unpair_preference_dataset`` feeds pairs to KTO)."""
    return [_keep(record, prompt=record["prompt"], response=record[side], label=side == "chosen")
            for side in ("chosen", "rejected")]


_CONVERSIONS: dict[tuple[str, str], Callable[[dict], dict | list[dict]]] = {
    ("preference", "sft"): to_sft,
    ("preference", "prompt"): to_prompt,
    ("sft", "prompt"): to_prompt,
    ("rating", "prompt"): to_prompt,
    ("unpaired", "prompt"): to_prompt,
    ("preference", "unpaired"): to_unpaired,
}
_WHY_NOT = {
    "preference": "the pairwise reward model needs a chosen and a rejected answer per prompt; "
                  "use a preference dataset (prompt/chosen/rejected or HH-RLHF).",
    "sft": "supervised fine-tuning needs demonstration answers; use prompt/response, messages or "
           "preference data (its chosen answers are used).",
    "rating": "this stage needs numeric scores per answer (prompt/response/score).",
    "unpaired": "KTO needs answers labelled desirable or undesirable (prompt/response/label) or preference pairs; "
                "`chatrlhf export` writes them from the feedback app's ratings.",
}


def convert_records(records: list[dict], from_kind: str, to_kind: str) -> list[dict]:
    """Converts records to the kind a stage needs, or raises a DataError saying why it cannot."""
    if from_kind == to_kind:
        return records
    fn = _CONVERSIONS.get((from_kind, to_kind))
    if fn is None:
        source = records[0].get("_source") if records else None
        raise DataError(f"holds {from_kind} records, which cannot be turned into {to_kind} records.",
                        _WHY_NOT.get(to_kind, "use data of the needed kind."), source=source)
    out: list[dict] = []
    for record in records:
        converted = fn(record)
        out += converted if isinstance(converted, list) else [converted]
    return out
