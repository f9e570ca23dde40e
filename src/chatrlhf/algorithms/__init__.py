"""Pure math: losses, log-prob gathering and masking. Functions of tensors only (no models, no I/O)."""

from chatrlhf.algorithms.losses import (
    IGNORE_INDEX,
    LOSS_AGGREGATIONS,
    aggregation_weights,
    answer_mask,
    entropy_from_logits,
    gather_log_probs,
    mismatch_stats,
    pairwise_loss,
    policy_loss,
    rating_loss,
    sequence_log_probs,
    tis_weights,
    token_nll,
    value_loss,
)
from chatrlhf.algorithms.masking import (
    gather_last,
    last_token_index,
    masked_mean,
    masked_sum,
    position_ids_from_mask,
    zero_off_mask,
)

__all__ = [
    "IGNORE_INDEX",
    "LOSS_AGGREGATIONS",
    "aggregation_weights",
    "answer_mask",
    "entropy_from_logits",
    "gather_last",
    "gather_log_probs",
    "last_token_index",
    "masked_mean",
    "masked_sum",
    "mismatch_stats",
    "pairwise_loss",
    "policy_loss",
    "position_ids_from_mask",
    "rating_loss",
    "sequence_log_probs",
    "tis_weights",
    "token_nll",
    "value_loss",
    "zero_off_mask",
]
