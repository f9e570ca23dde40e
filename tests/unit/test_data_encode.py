"""Tokenisation with the chat template (SFT masking, prompts, pairs, ratings) and the collators.

The tiny tokenizer has pad == eos == <|im_end|> (id 2), the configuration where pad-based masking
loses the end-of-turn token.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from chatrlhf.data.collate import (  # noqa: E402
    PairCollator,
    PromptCollator,
    RatingCollator,
    SFTCollator,
    check_rating_levels,
    pad_sequences,
)
from chatrlhf.data.encode import (  # noqa: E402
    IGNORE_INDEX,
    answer_ids,
    encode_pair,
    encode_prompt,
    encode_rating,
    encode_records,
    encode_sft,
)
from chatrlhf.data.formats import DataError  # noqa: E402
from chatrlhf.models.tiny import build_tiny_tokenizer  # noqa: E402

TWO_TURNS = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello world"},
    {"role": "assistant", "content": "yes good"},
    {"role": "user", "content": "thanks"},
    {"role": "assistant", "content": "no problem"},
]
Q = [{"role": "user", "content": "what is the capital of france"}]


@pytest.fixture(scope="module")
def tok():
    t = build_tiny_tokenizer()
    assert t.pad_token_id == t.eos_token_id == t.convert_tokens_to_ids("<|im_end|>")
    return t


def label_spans(labels):
    """Runs of supervised tokens, as lists of ids."""
    spans, cur = [], []
    for t in [*labels, IGNORE_INDEX]:
        if t == IGNORE_INDEX:
            if cur:
                spans.append(cur)
            cur = []
        else:
            cur.append(t)
    return spans


def test_sft_labels_are_exactly_assistant_contents_and_their_eos(tok):
    item = encode_sft(tok, TWO_TURNS, max_len=512)
    ids, labels = item["input_ids"], item["labels"]
    assert ids == tok.apply_chat_template(TWO_TURNS, tokenize=True, return_dict=False)
    assert len(labels) == len(ids)
    assert [tok.decode(s) for s in label_spans(labels)] == ["yes good<|im_end|>", "no problem<|im_end|>"]
    # supervised tokens are the sequence's own tokens at the same positions
    assert all(lab in (IGNORE_INDEX, tid) for lab, tid in zip(labels, ids))
    # hand count: each answer's tokens + its eos
    n_answer = len(answer_ids(tok, "yes good")) + len(answer_ids(tok, "no problem"))
    assert sum(lab != IGNORE_INDEX for lab in labels) == n_answer
    # 5 <|im_end|> tokens in the text (system, user, assistant, user, assistant): only the 2 assistant ones count
    eos = tok.eos_token_id
    eos_positions = [i for i, t in enumerate(ids) if t == eos]
    assert len(eos_positions) == 5
    assert [labels[i] == eos for i in eos_positions] == [False, False, True, False, True]
    # ChatML's "\n" after each assistant eos is template formatting, never generated
    assert labels[eos_positions[2] + 1] == IGNORE_INDEX and labels[-1] == IGNORE_INDEX


def test_sft_eos_survives_collation_although_it_equals_pad(tok):
    short = encode_sft(tok, TWO_TURNS[1:3], 512)
    long = encode_sft(tok, TWO_TURNS, 512)
    batch = SFTCollator(pad_id=tok.pad_token_id)([short, long])
    n = len(short["input_ids"])
    labels, mask = batch["labels"], batch["attention_mask"]
    assert labels.shape == batch["input_ids"].shape == (2, len(long["input_ids"]))
    # the real eos of the short row is supervised, its padding (same id!) is not
    assert labels[0, n - 2].item() == tok.eos_token_id
    assert (labels[0, n:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, n:] == tok.pad_token_id).all()
    assert mask[0].tolist() == [1] * n + [0] * (mask.shape[1] - n)
    assert mask[1].all()


def merging_tokenizer():
    # "assistant: " + "yes" tokenises as ":" + " yes", not ": " + "yes": token prefixes no longer match
    tok2 = build_tiny_tokenizer()
    tok2.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    return tok2


def test_sft_masking_falls_back_to_text_offsets_when_tokens_merge(tok):
    tok2 = merging_tokenizer()
    gen = tok2.apply_chat_template(TWO_TURNS[:2], add_generation_prompt=True, tokenize=True, return_dict=False)
    full = tok2.apply_chat_template(TWO_TURNS[:3], tokenize=True, return_dict=False)
    assert full[: len(gen)] != gen  # the situation the fallback exists for
    item = encode_sft(tok2, TWO_TURNS, 512)
    assert [tok2.decode(s) for s in label_spans(item["labels"])] == [" yes good<|im_end|>", " no problem<|im_end|>"]


def test_sft_truncates_on_the_right(tok):
    full = encode_sft(tok, TWO_TURNS, 512)
    cut = encode_sft(tok, TWO_TURNS, 20)
    assert cut["input_ids"] == full["input_ids"][:20] and cut["labels"] == full["labels"][:20]


@pytest.mark.parametrize("path", ["tokens", "text offsets"])
def test_sft_cut_at_every_max_len_equals_the_full_encoding_cut(tok, path):
    # the turns starting past max_len are not located at all; what is kept must not notice
    tokenizer = tok if path == "tokens" else merging_tokenizer()
    conversation = TWO_TURNS + TWO_TURNS[1:] * 3
    full = encode_sft(tokenizer, conversation, 10_000)
    assert len(label_spans(full["labels"])) == 8
    for max_len in range(2, len(full["input_ids"]) + 2):
        cut = encode_sft(tokenizer, conversation, max_len)
        assert cut == {"input_ids": full["input_ids"][:max_len], "labels": full["labels"][:max_len]}, max_len


def test_a_1000_turn_conversation_renders_only_the_turns_before_the_cut(tok, monkeypatch):
    # locating every turn renders each prefix: 1,000 renders of up to 1,000 messages (10,000 turns: minutes)
    renders = []
    real = tok.apply_chat_template
    monkeypatch.setattr(tok, "apply_chat_template", lambda *a, **k: renders.append(1) or real(*a, **k))
    conversation = [{"role": r, "content": f"{r[0]} {i}"} for i in range(500) for r in ("user", "assistant")]
    item = encode_sft(tok, conversation, 64)
    assert len(item["input_ids"]) == 64 and any(t != IGNORE_INDEX for t in item["labels"])
    assert len(renders) < 30, len(renders)


def test_encode_prompt_and_long_prompt_policies(tok):
    ids = tok.apply_chat_template(Q, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert encode_prompt(tok, Q, 512) == ids
    assert encode_prompt(tok, Q, 5, long_prompt="truncate_left") == ids[-5:]
    assert encode_prompt(tok, Q, 5, long_prompt="drop") is None
    with pytest.raises(DataError, match=rf"prompt is {len(ids)} tokens, longer than max_prompt_len=5"):
        encode_prompt(tok, Q, 5)


def test_encode_pair_is_prompt_plus_answer_plus_eos(tok):
    p = encode_prompt(tok, Q, 512)
    item = encode_pair(tok, Q, "paris", "rome", max_len=512, max_prompt_len=256)
    chosen = tok("paris", add_special_tokens=False)["input_ids"]
    assert item["chosen_input_ids"] == p + chosen + [tok.eos_token_id]
    assert item["rejected_input_ids"][: len(p)] == p and item["prompt_len"] == len(p)
    # answers are cut on the right to max_len (and lose their eos)
    cut = encode_pair(tok, Q, "paris is the capital", "rome", max_len=len(p) + 2, max_prompt_len=256)
    assert cut["chosen_input_ids"] == p + tok("paris is the capital", add_special_tokens=False)["input_ids"][:2]
    assert cut["rejected_input_ids"] == p + answer_ids(tok, "rome")[:2]


def test_encode_rating(tok):
    item = encode_rating(tok, Q, "paris", 4, max_len=512, max_prompt_len=256)
    assert item["input_ids"] == encode_prompt(tok, Q, 512) + answer_ids(tok, "paris")
    assert item["score"] == 4.0


def rec(**fields):
    return {**fields, "meta": {}, "_source": "my_pairs.jsonl", "_row": 7}


def test_encode_records_counts_and_policies(tok):
    p_len = len(encode_prompt(tok, Q, 512))
    long_q = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog " * 6}]
    records = [rec(prompt=Q, chosen="paris", rejected="rome"),
               rec(prompt=long_q, chosen="a", rejected="b"),  # prompt too long: dropped
               rec(prompt=Q, chosen="paris is nice", rejected="paris is bad")]  # cut to "paris": identical
    items = encode_records(records, "preference", tok, max_len=p_len + 2, max_prompt_len=p_len + 1,
                           long_prompt="drop", progress=False)
    stats = items.stats
    assert isinstance(items, list) and len(items) == 1 and items[0]["prompt_len"] == p_len
    assert (stats.total, stats.kept, stats.dropped_long_prompt, stats.dropped_identical) == (3, 1, 1, 1)
    assert stats.dropped == 2 and stats.truncated == 1  # "paris"+eos / "rome"+eos > 2 tokens


def test_long_prompt_error_names_source_row_field_and_flags(tok):
    long_q = [{"role": "user", "content": "hello world " * 40}]
    with pytest.raises(DataError) as info:
        encode_records([rec(prompt=long_q)], "prompt", tok, max_prompt_len=16, progress=False)
    msg = str(info.value)
    assert "my_pairs.jsonl line 7, field 'prompt'" in msg
    assert "data.long_prompt=truncate_left or drop" in msg and "data.max_prompt_len" in msg


def test_sft_rows_without_supervised_tokens_are_dropped_and_all_dropped_raises(tok):
    records = [rec(messages=TWO_TURNS), rec(messages=TWO_TURNS[1:3])]
    cutoff = len(encode_prompt(tok, TWO_TURNS[1:2], 512))  # everything before the first answer
    items = encode_records(records[1:], "sft", tok, max_len=cutoff + 1, max_prompt_len=4, progress=False)
    assert items.stats.truncated == 1 and len(items[0]["input_ids"]) == cutoff + 1
    assert sum(t != IGNORE_INDEX for t in items[0]["labels"]) == 1  # only the answer's first token is left
    with pytest.raises(DataError, match=r"my_pairs.jsonl: no sft rows left after tokenisation"):
        encode_records(records, "sft", tok, max_len=cutoff - 1, max_prompt_len=4, progress=False)


def test_limits_come_from_a_config_object_and_keywords_override(tok):
    class Limits:  # the fields of the stages' DataConfig that encoding reads
        max_len, max_prompt_len, long_prompt = 512, 4, "truncate_left"

    items = encode_records([rec(prompt=Q)], "prompt", tok, Limits, progress=False)
    assert len(items[0]["input_ids"]) == 4 and items.stats.truncated == 1
    hi = [{"role": "user", "content": "hi"}]
    assert len(encode_prompt(tok, hi, 512)) <= 12 < len(encode_prompt(tok, Q, 512))
    items = encode_records([rec(prompt=Q), rec(prompt=hi)], "prompt", tok, Limits, max_prompt_len=12,
                           long_prompt="drop", progress=False)
    assert [it["prompt"] for it in items] == [hi] and items.stats.dropped_long_prompt == 1


def test_empty_input_gives_empty_items(tok):
    items = encode_records([], "sft", tok, progress=False)
    assert items == [] and items.stats.total == 0


def test_prompt_items_keep_messages_and_meta(tok):
    items = encode_records([{**rec(prompt=Q), "meta": {"harmful": True}}], "prompt", tok, progress=False)
    assert items[0]["prompt"] == Q and items[0]["meta"] == {"harmful": True}


# ----------------------------------------------------------------------------- collators
def test_pad_sequences_right_and_left():
    ids, mask = pad_sequences([[5, 6, 7], [8]], pad_id=0, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_sequences([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long
    ids, _ = pad_sequences([[1, 2, 3]], pad_id=9, pad_to_multiple_of=4)
    assert ids.tolist() == [[1, 2, 3, 9]]


def test_pad_id_equal_to_a_real_token_is_masked_by_attention_only():
    # token 2 is both eos and pad: the mask must keep the real one and drop the padding
    ids, mask = pad_sequences([[4, 2], [4, 5, 6, 2]], pad_id=2)
    assert ids.tolist() == [[4, 2, 2, 2], [4, 5, 6, 2]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_pair_collator_stacks_chosen_then_rejected():
    batch = PairCollator(pad_id=0)([
        {"chosen_input_ids": [1, 2, 3], "rejected_input_ids": [1, 9], "prompt_len": 1},
        {"chosen_input_ids": [4, 5], "rejected_input_ids": [4, 6, 7, 8], "prompt_len": 2},
    ])
    assert batch["num_pairs"] == 2
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [4, 5, 0, 0], [1, 9, 0, 0], [4, 6, 7, 8]]
    assert batch["attention_mask"].sum(-1).tolist() == [3, 2, 2, 4]
    assert batch["prompt_lens"].tolist() == [1, 2, 1, 2]


def test_prompt_collator_left_pads_for_generation(tok):
    items = encode_records([rec(prompt=Q), rec(prompt=[{"role": "user", "content": "hi"}])], "prompt", tok,
                           progress=False)
    batch = PromptCollator(pad_id=tok.pad_token_id)(items)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask[:, -1].all()  # every row ends at the last column
    short = len(items[1]["input_ids"])
    assert ids[1, -short:].tolist() == items[1]["input_ids"]
    assert mask[1].tolist() == [0] * (ids.shape[1] - short) + [1] * short
    assert batch["prompts"][1] == [{"role": "user", "content": "hi"}] and len(batch["meta"]) == 2


def test_rating_collator():
    items = [{"input_ids": [1, 2], "prompt_len": 1, "score": 4}, {"input_ids": [3], "prompt_len": 1, "score": 1.5}]
    batch = RatingCollator(pad_id=0)(items)
    assert batch["input_ids"].tolist() == [[1, 2], [3, 0]]
    assert batch["scores"].tolist() == [4.0, 1.5] and batch["scores"].dtype == torch.float32
    assert batch["prompt_lens"].tolist() == [1, 1]
    assert "levels" not in batch


def test_rating_levels_are_score_minus_one_and_bad_scores_name_the_row(tok):
    records = [rec(prompt=Q, response="paris", score=5.0), rec(prompt=Q, response="rome", score=1.0)]
    items = encode_records(records, "rating", tok, progress=False)
    batch = RatingCollator(pad_id=tok.pad_token_id, num_levels=5)(items)
    assert batch["levels"].tolist() == [4, 0] and batch["levels"].dtype == torch.long
    check_rating_levels(items, num_levels=5)
    with pytest.raises(DataError, match=r"my_pairs.jsonl line 7, field 'score': score 5 is not an integer in 1..4"):
        check_rating_levels(items, num_levels=4)
    with pytest.raises(DataError, match=r"score 1.5 is not an integer"):
        RatingCollator(pad_id=0, num_levels=5)([{"input_ids": [3], "prompt_len": 1, "score": 1.5}])
