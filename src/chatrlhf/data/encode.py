"""Tokenisation of canonical records with the tokenizer's chat template (conventions in docs/data.md).

    prompt ids  = apply_chat_template(prompt, add_generation_prompt=True)
    answer ids  = tokenizer(answer, add_special_tokens=False) + [eos]      (eos = end-of-turn token)
    sequence    = prompt ids + answer ids
    SFT labels  = -100 except assistant content tokens and each assistant turn's eos

The SFT masking never parses template text: it renders conversation prefixes with the template and
takes each assistant turn's tokens as the difference between "history + generation prompt" and
"history + this turn", so it works for any template whose renderings of prefixes are prefixes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from chatrlhf.algorithms.losses import IGNORE_INDEX
from chatrlhf.data.errors import LimitError, describe_location
from chatrlhf.data.formats import KINDS, DataError
from chatrlhf.limits import InputError, check_value

log = logging.getLogger(__name__)

LONG_PROMPT = ("error", "truncate_left", "drop")
_LONG_FIX = "set data.long_prompt=truncate_left or drop, or raise data.max_prompt_len."
_TEXT_FIELDS = ("prompt", "messages", "chosen", "rejected", "response")  # what reaches the tokenizer


def _chat_ids(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template.",
                        "use a chat/instruct tokenizer or set tokenizer.chat_template.")
    out = tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                        tokenize=True, return_dict=False)
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


def _chat_text(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                         tokenize=False)


def eos_id(tokenizer) -> int:
    """The end-of-turn token every answer ends with (for ChatML models ``<|im_end|>``, often also pad)."""
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer has no eos token, so answers cannot be terminated.",
                        "set tokenizer.eos_token to the template's end-of-turn token.")
    return int(tokenizer.eos_token_id)


def _is_prefix(a: Sequence[int], b: Sequence[int]) -> bool:
    return len(a) <= len(b) and list(b[: len(a)]) == list(a)


def _through_last_eos(ids: Sequence[int], start: int, end: int, eos: int) -> int:
    """End (exclusive) of the supervised part of ``ids[start:end]``: up to and including its last eos.

    Template text after the eos (ChatML's "\\n") is formatting the model never has to generate. A
    template that closes turns without the eos keeps the whole turn supervised.
    """
    for j in range(end - 1, start - 1, -1):
        if ids[j] == eos:
            return j + 1
    return end


def _sft_by_tokens(tokenizer, msgs: list[dict], eos: int, max_len: int) -> tuple[list[int], list[int]] | None:
    full = _chat_ids(tokenizer, msgs, False)
    labels = [IGNORE_INDEX] * len(full)
    for i, msg in enumerate(msgs):
        if msg["role"] != "assistant":
            continue
        start = _chat_ids(tokenizer, msgs[:i], True)
        if len(start) >= max_len and _is_prefix(start, full):  # this turn and later ones are cut off anyway
            break
        upto = full if i == len(msgs) - 1 else _chat_ids(tokenizer, msgs[: i + 1], False)
        if not (_is_prefix(start, upto) and _is_prefix(upto, full)):
            return None
        stop = _through_last_eos(full, len(start), len(upto), eos)
        labels[len(start): stop] = full[len(start): stop]
    return full, labels


def _sft_by_text(tokenizer, msgs: list[dict], max_len: int) -> tuple[list[int], list[int]]:
    """Fallback when token boundaries shift between prefixes (e.g. BPE merging across the turn start):
    the same prefix logic on the rendered text, mapped to tokens through character offsets."""
    full_text = _chat_text(tokenizer, msgs, False)
    try:
        enc = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # slow tokenizers have no offsets
        enc = None
    if enc is None or "offset_mapping" not in enc:
        raise DataError("the chat template renders conversation prefixes inconsistently and the tokenizer has "
                        "no character offsets, so assistant turns cannot be located.",
                        "use a fast tokenizer, or a template whose prefixes render as prefixes.", field="messages")
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    cut_at = offsets[max_len - 1][1] if len(ids) > max_len else len(full_text)  # character where the cut falls
    for i, msg in enumerate(msgs):
        if msg["role"] != "assistant":
            continue
        start_text = _chat_text(tokenizer, msgs[:i], True)
        if len(start_text) >= cut_at:  # this turn and later ones are cut off anyway
            break
        upto_text = _chat_text(tokenizer, msgs[: i + 1], False)
        if not (full_text.startswith(upto_text) and upto_text.startswith(start_text)):
            raise DataError(f"the chat template renders the conversation differently before turn {i}, so the "
                            "assistant tokens cannot be located by prefix.",
                            "use a template whose renderings of conversation prefixes are prefixes.",
                            field="messages")
        lo, hi = len(start_text), len(upto_text)
        eos_at = upto_text.rfind(tokenizer.eos_token, lo) if tokenizer.eos_token else -1
        hi = eos_at + len(tokenizer.eos_token) if eos_at >= 0 else hi
        for t, (a, b) in enumerate(offsets):
            if b > lo and a < hi:
                labels[t] = ids[t]
    return ids, labels


def _sft_ids(tokenizer, messages: Sequence[dict], max_len: int) -> tuple[list[int], list[int]]:
    """Full (untruncated) ids, and labels correct up to ``max_len``; trailing non-assistant turns are dropped
    (nothing to learn). Assistant turns that start past ``max_len`` are not located: each costs two renders
    of the conversation so far, quadratic in a 10,000-turn row (so a template that renders such a turn
    inconsistently no longer sends the kept turns to the text-offset fallback)."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DataError("the conversation has no assistant turn.", "add an assistant answer.", field="messages")
    msgs = msgs[: last + 1]
    return _sft_by_tokens(tokenizer, msgs, eos_id(tokenizer), max_len) or _sft_by_text(tokenizer, msgs, max_len)


def encode_sft(tokenizer, messages: Sequence[dict], max_len: int) -> dict:
    """``{"input_ids", "labels"}`` for a (multi-turn) conversation, cut on the right at ``max_len``."""
    ids, labels = _sft_ids(tokenizer, messages, max_len)
    return {"input_ids": ids[:max_len], "labels": labels[:max_len]}


def _prompt_ids(tokenizer, prompt_messages: Sequence[dict], max_prompt_len: int,
                long_prompt: str) -> tuple[list[int] | None, bool]:
    """(ids or None when dropped, whether ids were cut)."""
    if long_prompt not in LONG_PROMPT:
        raise DataError(f"data.long_prompt={long_prompt!r} is not one of {LONG_PROMPT}.", _LONG_FIX)
    ids = _chat_ids(tokenizer, prompt_messages, True)
    if len(ids) <= max_prompt_len:
        return ids, False
    if long_prompt == "drop":
        return None, False
    if long_prompt == "error":
        raise DataError(f"the prompt is {len(ids)} tokens, longer than max_prompt_len={max_prompt_len}.",
                        _LONG_FIX, field="prompt")
    bos = tokenizer.bos_token_id
    if bos is not None and ids[0] == bos and max_prompt_len > 1:
        return [bos] + ids[len(ids) - max_prompt_len + 1:], True
    return ids[len(ids) - max_prompt_len:], True


def encode_prompt(tokenizer, prompt_messages: Sequence[dict], max_prompt_len: int,
                  long_prompt: str = "error") -> list[int] | None:
    """Prompt ids ending in the generation prompt; ``None`` when ``long_prompt="drop"`` drops it.

    ``truncate_left`` keeps the last ``max_prompt_len`` tokens (the latest turns matter most), keeping a
    leading BOS token when the tokenizer has one.
    """
    return _prompt_ids(tokenizer, prompt_messages, max_prompt_len, long_prompt)[0]


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The answer's tokens plus the end-of-turn eos, exactly as a generated answer ends."""
    return list(tokenizer(answer, add_special_tokens=False)["input_ids"]) + [eos_id(tokenizer)]


def _prompt_and_answers(tokenizer, prompt: Sequence[dict], answers: Sequence[str], max_len: int,
                        max_prompt_len: int, long_prompt: str) -> tuple[list[int] | None, list[list[int]], bool]:
    """Prompt ids (None if dropped), each answer's ids cut to fit ``max_len``, and whether anything was cut."""
    # at least one answer token must fit after the prompt
    p, cut = _prompt_ids(tokenizer, prompt, min(max_prompt_len, max_len - 1), long_prompt)
    if p is None:
        return None, [], False
    full = [answer_ids(tokenizer, a) for a in answers]
    room = max_len - len(p)
    return p, [a[:room] for a in full], cut or any(len(a) > room for a in full)


def encode_pair(tokenizer, prompt: Sequence[dict], chosen: str, rejected: str, max_len: int,
                max_prompt_len: int, long_prompt: str = "error") -> dict | None:
    """``{"chosen_input_ids", "rejected_input_ids", "prompt_len"}``; ``None`` if the prompt is dropped.

    Answers are cut on the right so prompt + answer <= ``max_len``; a cut answer loses its eos (it is
    not a finished answer, and the reward is then read at its last kept token).
    """
    p, ans, _ = _prompt_and_answers(tokenizer, prompt, (chosen, rejected), max_len, max_prompt_len, long_prompt)
    return None if p is None else {"chosen_input_ids": p + ans[0], "rejected_input_ids": p + ans[1],
                                   "prompt_len": len(p)}


def encode_rating(tokenizer, prompt: Sequence[dict], response: str, score: float, max_len: int,
                  max_prompt_len: int, long_prompt: str = "error") -> dict | None:
    """``{"input_ids", "prompt_len", "score"}`` with the same truncation as :func:`encode_pair`."""
    p, answers, _ = _prompt_and_answers(tokenizer, prompt, (response,), max_len, max_prompt_len, long_prompt)
    return None if p is None else {"input_ids": p + answers[0], "prompt_len": len(p), "score": float(score)}


@dataclass
class EncodeStats:
    """What :func:`encode_records` kept, dropped and cut."""

    total: int = 0
    kept: int = 0
    dropped_long_prompt: int = 0  # long_prompt="drop"
    dropped_no_target: int = 0  # SFT rows whose assistant tokens were all cut by max_len
    dropped_identical: int = 0  # pairs whose chosen and rejected became equal after truncation
    truncated: int = 0  # kept rows that lost tokens (answer on the right, or prompt on the left)

    @property
    def dropped(self) -> int:
        return self.dropped_long_prompt + self.dropped_no_target + self.dropped_identical


def _encode_sft_record(rec: dict, tokenizer, max_len: int, stats: EncodeStats) -> dict | None:
    ids, labels = _sft_ids(tokenizer, rec["messages"], max_len)
    if all(t == IGNORE_INDEX for t in labels[:max_len]):
        stats.dropped_no_target += 1
        return None
    stats.truncated += len(ids) > max_len
    return {"input_ids": ids[:max_len], "labels": labels[:max_len]}


def _encode_one(rec: dict, kind: str, tokenizer, max_len: int, max_prompt_len: int, long_prompt: str,
                stats: EncodeStats) -> dict | None:
    if kind == "sft":
        return _encode_sft_record(rec, tokenizer, max_len, stats)
    if kind == "prompt":
        ids, cut = _prompt_ids(tokenizer, rec["prompt"], max_prompt_len, long_prompt)
        item = None if ids is None else {"input_ids": ids, "prompt": rec["prompt"], "meta": rec.get("meta", {})}
    else:
        answers = (rec["chosen"], rec["rejected"]) if kind == "preference" else (rec["response"],)
        p, ans, cut = _prompt_and_answers(tokenizer, rec["prompt"], answers, max_len, max_prompt_len, long_prompt)
        if p is not None and kind == "preference":
            if ans[0] == ans[1]:
                stats.dropped_identical += 1
                return None
            item = {"chosen_input_ids": p + ans[0], "rejected_input_ids": p + ans[1], "prompt_len": len(p)}
        elif p is not None:
            label = {"score": float(rec["score"])} if kind == "rating" else {"label": bool(rec["label"])}
            item = {"input_ids": p + ans[0], "prompt_len": len(p), **label}
        else:
            item = None
    if item is None:
        stats.dropped_long_prompt += 1
    else:
        stats.truncated += cut
    return item


def _check_text(rec: dict) -> None:
    """Refuses text a tokenizer cannot take (a lone surrogate ends in a TypeError inside ``tokenizers``) as a
    DataError naming the row. normalise_rows refuses it already; this covers records built elsewhere."""
    where = describe_location(rec.get("_source"), rec.get("_row"))
    try:
        check_value({k: rec[k] for k in _TEXT_FIELDS if k in rec}, where or "record")
    except InputError as err:
        raise LimitError(err, rec.get("_source"), rec.get("_row")) from None


class Encoded(list):
    """The encoded items (a plain list for loaders and samplers) plus ``.stats`` (:class:`EncodeStats`)."""

    stats: EncodeStats


def _limits(limits, max_len: int | None, max_prompt_len: int | None, long_prompt: str | None) -> tuple:
    """Explicit arguments win over the ``limits`` object's fields (a DataConfig), then the defaults."""
    def pick(value, name, default):
        return value if value is not None else getattr(limits, name, default)

    return (pick(max_len, "max_len", 512), pick(max_prompt_len, "max_prompt_len", 256),
            pick(long_prompt, "long_prompt", "error"))


def encode_records(records: Sequence[dict], kind: str, tokenizer, limits=None, *, max_len: int | None = None,
                   max_prompt_len: int | None = None, long_prompt: str | None = None,
                   progress: bool = True) -> Encoded:
    """Encodes records of one kind into a list of items with ``.stats``; errors name source and row.

    ``limits`` is any object with ``max_len``, ``max_prompt_len``, ``long_prompt`` (the stage's
    DataConfig); keyword arguments override it; defaults 512 / 256 / "error". Items:
    sft {"input_ids", "labels"}; preference {"chosen_input_ids", "rejected_input_ids", "prompt_len"};
    prompt {"input_ids", "prompt", "meta"}; rating {"input_ids", "prompt_len", "score", "_source", "_row"};
    unpaired {"input_ids", "prompt_len", "label"}.
    An empty input gives an empty result; a non-empty input that loses every row raises.
    """
    max_len, max_prompt_len, long_prompt = _limits(limits, max_len, max_prompt_len, long_prompt)
    if kind not in KINDS:
        raise DataError(f"unknown record kind {kind!r}.", f"use one of {', '.join(KINDS)}.")
    if long_prompt not in LONG_PROMPT:
        raise DataError(f"data.long_prompt={long_prompt!r} is not one of {LONG_PROMPT}.", _LONG_FIX)
    if max_len < 2 or max_prompt_len < 1 or (kind in ("preference", "rating", "unpaired") and max_prompt_len >= max_len):
        raise DataError(f"data.max_prompt_len={max_prompt_len} must be >= 1 and below data.max_len={max_len}.",
                        "leave room for the answer: e.g. data.max_len=512, data.max_prompt_len=256.")
    stats, items = EncodeStats(total=len(records)), Encoded()
    for rec in tqdm(records, desc=f"tokenise {kind}", disable=not progress, leave=False):
        try:
            _check_text(rec)
            item = _encode_one(rec, kind, tokenizer, max_len, max_prompt_len, long_prompt, stats)
        except DataError as err:
            raise err.located(rec.get("_source"), rec.get("_row")) from None
        if item is not None:
            if kind == "rating":  # the collator checks scores against num_levels and names the row
                item.update(_source=rec.get("_source"), _row=rec.get("_row"))
            items.append(item)
    stats.kept = len(items)
    items.stats = stats
    if not records:
        return items
    source = records[0].get("_source")
    log.info("%s: tokenised %d %s rows: kept %d, dropped %d, truncated %d", source, stats.total, kind,
             stats.kept, stats.dropped, stats.truncated)
    if not items:
        raise DataError(f"no {kind} rows left after tokenisation ({stats}).",
                        "raise data.max_len / data.max_prompt_len, or use data.long_prompt=truncate_left.",
                        source=source)
    return items
