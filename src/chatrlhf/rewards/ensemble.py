"""Reward ensembles: a weighted sum of reward sources, each optionally standardised by its own running moments.

Spec: ``W1*SPEC1 + W2*SPEC2 + ...`` (``parse_ensemble_spec``). Each SPEC is a single source
(``chatrlhf.rewards.factory.build_single_source``); a weight is optional (default 1) and may be negative or 0 (a 0-weight source is
still scored and logged, which is a cheap way to watch a judge without training on it). The score of
answer i is

    r_i = sum_k w_k * z_k,i,    z_k,i = (s_k,i - mu_k) / max(sigma_k, 1e-8)   (normalize on)
    r_i = sum_k w_k * s_k,i                                                    (normalize off)

where s_k,i is source k's raw score and mu_k / sigma_k are the running mean and sample standard deviation of
source k's scores over every batch so far, this one included, on all processes (``RunningMoments``, Chan et
al.'s parallel merge). Standardising first makes the weights shares of the total whatever each source's
scale: an RM scoring in [-5, 5] and a rule in [0, 1] would otherwise let the RM dominate at equal weights.

A spec of one source without a weight gives a pass-through ensemble (``EnsembleSource.single``): the source's
score unchanged, so the training loop always holds an ensemble and never special-cases a lone source.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from chatrlhf.algorithms.rl import MOMENTS_STATE, RunningMoments
from chatrlhf.checkpoint_schema import Invalid, apply
from chatrlhf.rewards.contract import RewardBatch, RewardSource

# A "+" standing alone between terms; "a+b" or "1e+3" are not split.
_TERM_SPLIT = re.compile(r"(?:^|\s)\+(?:\s|$)")
RESERVED_NAMES = ("score", "total")
"""Names the training loop already logs under ``reward/``; a source so named gets a suffix instead."""


def is_ensemble_spec(spec: str) -> bool:
    """Whether ``spec`` has several terms joined by `` + `` or a ``W*`` weight prefix."""
    return "*" in spec or bool(_TERM_SPLIT.search(spec))


def parse_ensemble_spec(spec: str) -> list[tuple[float, str]]:
    """``"W1*SPEC1 + W2*SPEC2 + SPEC3"`` -> ``[(W1, SPEC1), (W2, SPEC2), (1.0, SPEC3)]``.

    Example: ``"0.7*outputs/rm/model + 0.3 * rater + similarity"`` ->
    ``[(0.7, "outputs/rm/model"), (0.3, "rater"), (1.0, "similarity")]``. Raises naming the bad term.
    """
    out = []
    for i, raw in enumerate(_TERM_SPLIT.split(spec.strip())):
        term = raw.strip()
        where = f"reward ensemble {spec!r}, term {i + 1} {term!r}"
        weight = 1.0
        if "*" in term:
            weight_text, _, term = (part.strip() for part in term.partition("*"))
            try:
                weight = float(weight_text)
            except ValueError:
                raise ValueError(f"{where}: weight {weight_text!r} is not a number; write W*SPEC, "
                                 "e.g. 0.5*rater") from None
            if not math.isfinite(weight):
                raise ValueError(f"{where}: weight {weight_text!r} must be finite")
        if not term:
            raise ValueError(f"{where}: the term names no reward source; write terms as W*SPEC joined by ' + '")
        out.append((weight, term))
    return out


def unique_names(names: Sequence[str], reserved: Sequence[str] = RESERVED_NAMES) -> list[str]:
    """Each name, with ``_2``, ``_3``, ... added where it repeats an earlier one or a reserved name.

    Example: ``["rm", "rater", "rm", "score"]`` -> ``["rm", "rater", "rm_2", "score_2"]``.
    """
    taken, out = set(reserved), []
    for name in names:
        candidate, k = name, 2
        while candidate in taken:
            candidate, k = f"{name}_{k}", k + 1
        taken.add(candidate)
        out.append(candidate)
    return out


def _identity(x: Tensor) -> Tensor:
    return x


class EnsembleSource(RewardSource):
    """Weighted sum of reward sources; ``__call__(batch) -> (B,)`` float32 on CPU.

    ``gather``: maps this process's scores (B,) to all processes' scores; the training loop sets it to its
    all-gather so every process normalises with the same moments (identity on one process).
    ``last_parts``: each source's raw (un-normalised) scores (B,) from the last call, keyed by name.
    """

    short_name = "ensemble"
    passthrough = False
    """True for ``single``'s one-term ensemble, which stands for its source (name, capabilities, no parts)."""

    def __init__(self, sources: Sequence[RewardSource], weights: Sequence[float], names: Sequence[str],
                 normalize: bool = True):
        if not sources:
            raise ValueError("EnsembleSource needs at least one source")
        if not len(sources) == len(weights) == len(names):
            raise ValueError(f"EnsembleSource got {len(sources)} sources, {len(weights)} weights and {len(names)} "
                             "names; pass one weight and one name per source")
        if len(set(names)) != len(names):
            raise ValueError(f"EnsembleSource names must be unique, got {list(names)}; see unique_names")
        self.sources = list(sources)
        self.weights = [float(w) for w in weights]
        self.names = list(names)
        self.normalize = normalize
        self.moments = {name: RunningMoments() for name in self.names}
        self.gather: Callable[[Tensor], Tensor] = _identity
        self.last_parts: dict[str, Tensor] = {}
        self.name = " + ".join(f"{w:g}*{s.name}" for w, s in zip(self.weights, self.sources))

    @classmethod
    def single(cls, source: RewardSource) -> EnsembleSource:
        """A one-term ensemble passing ``source``'s scores through unchanged (weight 1, no normalisation).

        It takes the source's name and capabilities, saves nothing and logs no parts: its one part is the
        score the training loop already logs as ``reward/score``.
        """
        ensemble = cls([source], [1.0], [source.short_name], normalize=False)
        ensemble.passthrough = True
        ensemble.name, ensemble.short_name = source.name, source.short_name
        return ensemble

    @property
    def has_state(self) -> bool:
        return not self.passthrough

    @property
    def is_gold_judge(self) -> bool:
        return self.passthrough and self.sources[0].is_gold_judge

    @property
    def critic_init(self) -> str | None:
        return self.sources[0].critic_init if self.passthrough else None

    @property
    def logged_parts(self) -> dict[str, Tensor]:
        """``last_parts`` to log as ``reward/<name>``: none for a pass-through (its part is the score)."""
        return {} if self.passthrough else self.last_parts

    @torch.no_grad()
    def __call__(self, batch: RewardBatch) -> Tensor:
        n = len(batch.responses)
        parts: dict[str, Tensor] = {}
        for name, source in zip(self.names, self.sources):
            scores = torch.as_tensor(source(batch)).detach().float().cpu()
            if scores.shape != (n,):
                raise ValueError(f"reward source {name!r} ({source.name}) returned shape {tuple(scores.shape)} "
                                 f"for {n} answers; a source must return one score per answer, shape ({n},)")
            parts[name] = scores  # (B,)
        total = torch.zeros(n, dtype=torch.float64)  # (B,)
        for name, weight in zip(self.names, self.weights):
            x = parts[name].double()
            if self.normalize:
                # Update first, so the first batch is standardised by its own statistics.
                self.moments[name].update(self.gather(parts[name]))
                x = self.moments[name].normalize(x)
            total += weight * x
        self.last_parts = parts
        return total.float()

    def state_dict(self) -> dict:
        """JSON-able state: the running moments of each source (so a resumed run continues exactly)."""
        return {"normalize": self.normalize, "moments": {n: m.state_dict() for n, m in self.moments.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Raises a ValueError naming the field (``moments.<source>.count``) before setting anything, unless
        ``state`` holds valid moments for exactly this ensemble's sources."""
        saved = state.get("moments") if isinstance(state, dict) else None
        if not isinstance(saved, dict):
            raise Invalid("moments", "a JSON object (source name -> running moments)", saved)
        if sorted(saved) != sorted(self.names):
            raise ValueError(f"the saved reward ensemble has sources {sorted(saved)} but this one has "
                             f"{sorted(self.names)}; resume with the --reward spec the run started with")
        for name in self.names:  # every source checked before any is set
            try:
                apply(MOMENTS_STATE, saved[name])
            except Invalid as bad:
                raise bad.within(f"moments.{name}") from None
        for name, moments in self.moments.items():
            moments.load_state_dict(saved[name])
