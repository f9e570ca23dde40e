"""Pure evaluation math: win-rates of rater-judged pairs and means that skip missing values.

Functions of numbers only (no models, no I/O), each with a worked example the unit tests check. The KL
of sampled answers uses ``chatrlhf.algorithms.rl`` (``sequence_kl(kl_k1(...))``), the same math as PPO.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def win_rate(a: Sequence[float], b: Sequence[float], tie_eps: float = 1e-6) -> dict:
    """Per-prompt comparison of model A's scores with model B's on the same prompts.

    Pair i is a win for A when ``a[i] - b[i] > tie_eps``, a loss when ``< -tie_eps``, else a tie, and

        win_rate = (wins + 0.5 * ties) / n

    so 0.5 means "no better, no worse". ``stderr`` is the standard error of that mean, the per-pair
    outcome o_i in {1, 0.5, 0} having population standard deviation s: stderr = s / sqrt(n).
    With no pairs (n = 0) ``win_rate`` and ``stderr`` are None: there is no evidence either way.

    Example: a = [0.9, 0.5, 0.2, 0.4], b = [0.1, 0.5, 0.3, 0.4 + 1e-7]
    -> wins 1, ties 2 (0.5 = 0.5 exactly; 1e-7 <= tie_eps), losses 1, n 4, win_rate (1 + 1) / 4 = 0.5;
    outcomes (1, 0.5, 0, 0.5) have mean 0.5 and variance (0.25 + 0 + 0.25 + 0) / 4 = 0.125, so
    stderr = sqrt(0.125) / 2 = 0.1767767.
    """
    if len(a) != len(b):
        raise ValueError(f"win_rate needs one score per prompt for both models, got {len(a)} and {len(b)}")
    if tie_eps < 0:
        raise ValueError(f"tie_eps must be >= 0, got {tie_eps}")
    outcomes = [1.0 if x - y > tie_eps else 0.0 if x - y < -tie_eps else 0.5 for x, y in zip(a, b)]
    n = len(outcomes)
    out = {
        "wins": outcomes.count(1.0),
        "ties": outcomes.count(0.5),
        "losses": outcomes.count(0.0),
        "n": n,
        "win_rate": None,
        "stderr": None,
    }
    if n:
        mean = sum(outcomes) / n
        var = sum((o - mean) ** 2 for o in outcomes) / n
        out["win_rate"] = mean
        out["stderr"] = math.sqrt(var / n)
    return out


def mean(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are not None; None when there are none. Example: [1, None, 2] -> 1.5."""
    kept = [float(v) for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None
