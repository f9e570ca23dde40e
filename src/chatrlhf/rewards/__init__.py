"""Reward sources and the simulated rater (``SimulatedRater``, the gold judge used for evaluation; docs/rater.md).

Modules, each importing only those before it: ``contract`` (``RewardBatch``, the ``RewardSource`` protocol),
``sources`` and ``similarity`` (the judges), ``ensemble`` (weighted sums), ``factory`` (a ``--reward`` spec to
an ensemble).
"""

from chatrlhf.rewards.rater import RaterScore, RaterWeights, SimulatedRater, classify_harmful, is_refusal

__all__ = ["RaterScore", "RaterWeights", "SimulatedRater", "classify_harmful", "is_refusal"]
