"""Reward sources and the simulated rater (``SimulatedRater``, the gold judge used for evaluation; docs/rater.md).

Modules, each importing only those before it: ``contract`` (``RewardBatch``, the ``RewardSource`` protocol),
``sources``, ``similarity`` and ``remote`` (the judges), ``ensemble`` (weighted sums), ``factory`` (a
``--reward`` spec to an ensemble), ``server`` (``chatrlhf serve-reward``: any spec over HTTP).

``batched`` marks a reward function as batched (TRL's form; docs/rewards.md, "Batched functions").
"""

from chatrlhf.rewards.rater import RaterScore, RaterWeights, SimulatedRater, classify_harmful, is_refusal
from chatrlhf.rewards.sources import batched

__all__ = ["RaterScore", "RaterWeights", "SimulatedRater", "batched", "classify_harmful", "is_refusal"]
