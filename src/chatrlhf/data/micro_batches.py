"""How an optimizer step's rows are cut into forwards: which process and which micro-batch each row goes to.

The rows of a step are fixed by the batch plan (``micro_batch_size x gradient_accumulation_steps x processes``);
every stage normalises its loss by the count of the whole step, so how the rows are cut changes only the order
of float additions, never the gradient. Within a step:

* the rows are dealt to processes longest first in snake order (0, 1, ..., w-1, w-1, ..., 0, 0, ...): each
  process gets the same number of rows and about the same number of tokens;
* each process sorts its rows longest first and cuts them into micro-batches of ``micro_batch_size`` rows, or,
  with a token budget, of as many rows as fit in ``max_tokens`` (padded forward: rows x the longest row;
  packed: the sum of the rows' tokens). Neighbours in length share a micro-batch, so little goes to padding;
* every process runs the same number of micro-batches (under ZeRO each forward is a collective): a process
  with fewer splits its largest micro-batches in two until the counts agree.

    sizes = [row_size(item) for item in items]                 # (tokens, width) per row
    shares = deal(sizes, world)                                # positions per process
    micro = split(shares[rank], sizes, micro_batch_size=8, max_tokens=4096, packed=True)

Pure functions over row sizes: no tensors, no model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class RowSize(NamedTuple):
    tokens: int  # real tokens over all of the row's sequences (a preference pair: chosen + rejected)
    width: int  # positions its padded forward runs alone: sequences x the longest of them


def row_size(item: dict) -> RowSize:
    """The size of an encoded item: every ``*input_ids`` sequence it holds (SFT, RM, DPO, KTO, ILQL items)."""
    lengths = [len(v) for k, v in item.items() if k.endswith("input_ids") and isinstance(v, list)]
    return RowSize(sum(lengths), len(lengths) * max(lengths, default=0))


def cost(group: Sequence[int], sizes: Sequence[RowSize], packed: bool) -> int:
    """Positions a micro-batch's forward runs: the rows' tokens when packed, else rows x the widest row."""
    if packed:
        return sum(sizes[i].tokens for i in group)
    return len(group) * max((sizes[i].width for i in group), default=0)


def _longest_first(positions: Sequence[int], sizes: Sequence[RowSize]) -> list[int]:
    return sorted(positions, key=lambda i: (-sizes[i].width, -sizes[i].tokens, i))


def deal(sizes: Sequence[RowSize], world: int) -> list[list[int]]:
    """Positions ``0..n-1`` (n a multiple of ``world``) dealt to ``world`` processes, longest first in snake
    order. Example: widths [1, 5, 3, 4], world 2 -> [[1, 2], [3, 0]] (5 and 3 to process 0; 4 and 1 to 1)."""
    if len(sizes) % world:
        raise ValueError(f"{len(sizes)} rows cannot be dealt evenly to {world} processes")
    shares: list[list[int]] = [[] for _ in range(world)]
    for n, i in enumerate(_longest_first(range(len(sizes)), sizes)):
        lap, seat = divmod(n, world)
        shares[seat if lap % 2 == 0 else world - 1 - seat].append(i)
    return shares


def split(positions: Sequence[int], sizes: Sequence[RowSize], micro_batch_size: int, max_tokens: int = 0,
          packed: bool = False) -> list[list[int]]:
    """``positions`` longest first, cut into consecutive micro-batches: ``micro_batch_size`` rows each, or with
    ``max_tokens`` > 0 as many rows as fit that budget (a row over the budget alone forms its own).

    Example: widths [2, 9, 4, 3], max_tokens 8, padded -> [[1], [2, 3], [0]] (9 alone; 2 x 4 = 8; then 2).
    """
    groups: list[list[int]] = []
    for i in _longest_first(positions, sizes):
        if groups and (cost(groups[-1] + [i], sizes, packed) <= max_tokens if max_tokens > 0
                       else len(groups[-1]) < micro_batch_size):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def even_out(groups: list[list[int]], count: int, sizes: Sequence[RowSize], packed: bool) -> list[list[int]]:
    """``groups`` with the costliest splittable micro-batch halved until there are ``count`` (order kept)."""
    groups = [list(g) for g in groups]
    while len(groups) < count:
        splittable = [j for j, g in enumerate(groups) if len(g) > 1]
        if not splittable:
            raise ValueError(f"{sum(map(len, groups))} rows cannot form {count} micro-batches")
        j = max(splittable, key=lambda j: cost(groups[j], sizes, packed))
        half = len(groups[j]) // 2
        groups[j : j + 1] = [groups[j][:half], groups[j][half:]]
    return groups


def step_micro_batches(sizes: Sequence[RowSize], world: int, rank: int, micro_batch_size: int,
                       max_tokens: int = 0, packed: bool = False) -> list[list[int]]:
    """This process's micro-batches (positions into ``sizes``) of a step whose rows every process knows:
    dealt, split, and evened out to the largest count of any process (no collective needed)."""
    splits = [split(share, sizes, micro_batch_size, max_tokens, packed) for share in deal(sizes, world)]
    return even_out(splits[rank], max(map(len, splits)), sizes, packed)
