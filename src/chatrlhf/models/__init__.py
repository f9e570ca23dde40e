"""Models: loading causal LMs (HF dirs, hub ids, built-in names), reward/rating/value models, encoders, LoRA.

transformers is imported inside functions, so importing this package costs only torch.
"""

from chatrlhf.models.default import DEFAULT_MODEL, TINY_MODEL, builtin_names, cache_dir, ensure_builtin
from chatrlhf.models.encoder import (
    MINILM_NAME,
    EncoderRewardModel,
    MiniLMEmbedder,
    load_encoder_reward_model,
    minilm_dir,
)
from chatrlhf.models.loading import (
    count_parameters,
    disable_dropout,
    load_causal_lm,
    load_tokenizer,
    resolve_model,
    uses_flash_attention,
)
from chatrlhf.models.lora import apply_lora
from chatrlhf.models.reward import RatingModel, RewardModel, load_rating_model, load_reward_model

__all__ = [
    "DEFAULT_MODEL",
    "MINILM_NAME",
    "TINY_MODEL",
    "EncoderRewardModel",
    "MiniLMEmbedder",
    "RatingModel",
    "RewardModel",
    "apply_lora",
    "builtin_names",
    "cache_dir",
    "count_parameters",
    "disable_dropout",
    "ensure_builtin",
    "load_causal_lm",
    "load_encoder_reward_model",
    "load_rating_model",
    "load_reward_model",
    "load_tokenizer",
    "minilm_dir",
    "resolve_model",
    "uses_flash_attention",
]
