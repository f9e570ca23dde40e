"""Tiny random chat models built offline from a config, for tests, benchmarks and smoke runs.

The tokenizer mimics SmolLM2's chat conventions on purpose: ChatML template, ``<|im_end|>`` is both
the end-of-turn (eos) and the pad token. That is the configuration where pad-based masking bugs show.
"""

from __future__ import annotations

import os
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Small fixed corpus: enough merges for English-looking text to take a few tokens per word.
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "user assistant system you are a helpful assistant",
    "what is the capital of france paris is the capital of france",
    "how do i cook rice rinse the rice then boil it in water",
    "please copy this text exactly as written",
    "yes no good bad answer question hello world thanks",
    "0 1 2 3 4 5 6 7 8 9 a b c d e f g h i j k l m n o p q r s t u v w x y z",
]


def build_tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on a fixed corpus (deterministic, offline).

    Returns a ``PreTrainedTokenizerFast`` with a ChatML chat template and pad == eos == ``<|im_end|>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "right"
    return fast


def tiny_llama_config(vocab_size: int, **overrides):
    """A 2-layer Llama config (~0.1M params at the defaults) with eos == pad as in SmolLM2."""
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        attention_dropout=0.0,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def build_tiny_llama(out_dir: str | os.PathLike, seed: int = 0, **config_overrides) -> Path:
    """Writes a random tiny Llama chat model plus tokenizer to ``out_dir`` (HF format) and returns it."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    out = Path(out_dir)
    tok = build_tiny_tokenizer()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    bos = tok.convert_tokens_to_ids("<|im_start|>")
    config = tiny_llama_config(len(tok), bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, **config_overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
