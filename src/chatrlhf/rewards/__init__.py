"""Reward sources. ``SimulatedRater`` is the gold judge used for evaluation (see docs/rater.md)."""

from chatrlhf.rewards.rater import RaterScore, RaterWeights, SimulatedRater, classify_harmful, is_refusal

__all__ = ["RaterScore", "RaterWeights", "SimulatedRater", "classify_harmful", "is_refusal"]
