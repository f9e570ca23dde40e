"""DAPO's dynamic sampling (Yu et al. 2025, "DAPO", arXiv 2503.14476, section 3.2), the pure part: which groups
of answers carry a learning signal, and which groups an iteration keeps.

A group is the ``group_size`` consecutive answers to one prompt (as in ``advantages``). When its rewards are
all equal, GRPO, RLOO and Dr. GRPO give each of its answers exactly zero advantage (``advantages._centred``):
the group adds tokens to the loss's normaliser and nothing to the gradient. Dynamic sampling drops such
groups and samples other prompts in their place. Functions of tensors and lists: no models, no collectives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(G,) bool: True where the group's rewards are not all exactly equal. ``rewards`` (B,), B = G * group_size,
    rows i * group_size .. (i + 1) * group_size - 1 the answers to prompt i.

    Exact equality, as the group estimators' zero advantage is exact: a group differing by one ulp is kept.
    Example, group size 3: [1, 1, 1, 0, 1, 0, 2, 2, 2] -> [False, True, False].
    """
    if group_size < 2 or rewards.shape[0] % group_size:
        raise ValueError(f"dynamic sampling needs groups of >= 2 answers dividing the batch; got batch "
                         f"{rewards.shape[0]}, group size {group_size}")
    r = rewards.view(-1, group_size)  # (G, k)
    return (r != r[:, :1]).any(-1)


def pick_groups(informative: Sequence[bool], target: int) -> tuple[list[int], list[int]]:
    """(kept, filled): the indices of the first ``target`` informative groups, in order; and, when fewer than
    ``target`` were found, the first uninformative groups, in order, filling the rest, so that
    ``len(kept) + len(filled) == target``. Groups beyond those are discarded.

    Examples, target 3: [F, T, F, T, T, T] -> kept [1, 3, 4], filled []; [F, T, F, F] -> kept [1],
    filled [0, 2]. Raises ValueError when fewer than ``target`` groups were given.
    """
    if len(informative) < target:
        raise ValueError(f"dynamic sampling needs {target} groups to fill the batch but the rounds produced only "
                         f"{len(informative)}")
    kept = [i for i, ok in enumerate(informative) if ok][:target]
    filled = [i for i, ok in enumerate(informative) if not ok][: target - len(kept)]
    return kept, filled
