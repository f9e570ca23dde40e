"""Data layer: formats (detect + validate), loading, phase split and blending, tokenisation, collators.

Typical use by a stage::

    train, evals = prepare_records(cfg.data, kind="preference", phase=2)   # cfg.data: a DataConfig
    items = encode_records(train, "preference", tokenizer, cfg.data)       # items.stats: kept/dropped/cut
    loader = DataLoader(items, batch_size=8, shuffle=True, collate_fn=PairCollator(tokenizer.pad_token_id))
"""

from chatrlhf.data.collate import (
    PairCollator,
    PromptCollator,
    RatingCollator,
    SFTCollator,
    check_rating_levels,
    pad_sequences,
    rating_level,
)
from chatrlhf.data.convert import convert_records, to_prompt, to_sft, to_unpaired
from chatrlhf.data.encode import (
    IGNORE_INDEX,
    LONG_PROMPT,
    Encoded,
    EncodeStats,
    answer_ids,
    encode_pair,
    encode_prompt,
    encode_rating,
    encode_records,
    encode_sft,
    eos_id,
)
from chatrlhf.data.formats import FORMATS, KINDS, DataError, detect_format, normalise_rows, parse_hh
from chatrlhf.data.sources import DEMO_DIR, demo_names, load_records, load_rows
from chatrlhf.data.split import blend, parse_split, phase_split, prepare_records, train_eval_split

__all__ = [
    "DEMO_DIR", "FORMATS", "IGNORE_INDEX", "KINDS", "LONG_PROMPT", "DataError", "Encoded", "EncodeStats", "PairCollator",
    "PromptCollator", "RatingCollator", "SFTCollator", "answer_ids", "blend", "check_rating_levels", "convert_records", "demo_names",
    "detect_format", "encode_pair", "encode_prompt", "encode_rating", "encode_records", "encode_sft", "eos_id",
    "load_records", "load_rows", "normalise_rows", "pad_sequences", "parse_hh", "parse_split", "phase_split", "rating_level",
    "prepare_records", "to_prompt", "to_sft", "to_unpaired", "train_eval_split",
]
