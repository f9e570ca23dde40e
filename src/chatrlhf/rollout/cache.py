"""The KV cache of the native sampler: transformers' ``DynamicCache`` with preallocated full-attention layers.

transformers' ``DynamicLayer`` appends each step's keys/values with ``torch.cat``, copying the whole
cache every step (at batch 64 and ~200 tokens that is ~0.5 GB per step for SmolLM2-135M). Generation
knows its final length up front (prompt width + max_new_tokens), so ``PreallocatedLayer`` writes into a
buffer of that size and hands attention a view of the filled part: one copy of the new token per step.

Dropping finished rows (``compact``) copies the kept rows once; the same call can drop leading columns
that are padding in every kept row (after the longest prompt finished), so attention stops reading them.
Sliding-window and other special layers keep transformers' own classes and its ``batch_select_indices``.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer holding (B, H, capacity, D) buffers; ``keys``/``values`` are views
    of the first ``length`` positions, as transformers' attention expects from a ``DynamicLayer``."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, dk = key_states.shape
        self._k = key_states.new_empty((b, h, self.capacity, dk))  # (B, H, C, Dk)
        self._v = value_states.new_empty((b, value_states.shape[1], self.capacity, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache capacity {self.capacity} exceeded ({end} positions); this is a bug "
                               "in chatrlhf.rollout (capacity = prompt width + max_new_tokens)")
        self._k[:, :, self.length:end] = key_states
        self._v[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]  # (B, H, T, D) views
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def select(self, rows: torch.Tensor, first_col: int = 0) -> None:
        """Keeps batch rows ``rows`` (in that order) and positions ``first_col..length-1``, in place."""
        if not self.is_initialized:
            return
        n = self.length - first_col
        # Gathered straight into a fresh buffer (one pass over the kept entries; ``buf[:L] = buf[rows]``
        # would gather into a temporary and copy it again, 2.5x slower).
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_empty((len(rows), *old.shape[1:]))
            torch.index_select(old[:, :, first_col:self.length], 0, rows, out=new[:, :, :n])
            setattr(self, name, new)
        self.length = n
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select(indices)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("PreallocatedLayer is only used by chatrlhf.rollout, which never crops")


def make_cache(config, capacity: int) -> tuple[DynamicCache, bool]:
    """A ``DynamicCache`` for ``config`` whose plain full-attention layers are preallocated to ``capacity``.

    Returns ``(cache, trimmable)``: ``trimmable`` is True when every layer is preallocated, so leading
    all-padding columns may be dropped (other layer types track positions their own way).
    """
    cache = DynamicCache(config=config)
    if not cache.layers:  # a config transformers could not read layer types from: plain dynamic layers
        return cache, False
    swapped = 0
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[i] = PreallocatedLayer(capacity)
            swapped += 1
    return cache, swapped == len(cache.layers)


def compact(cache: DynamicCache, rows: torch.Tensor, first_col: int, trimmable: bool) -> None:
    """Keeps only batch ``rows`` of every layer; drops the first ``first_col`` positions when ``trimmable``."""
    for layer in cache.layers:
        if isinstance(layer, PreallocatedLayer):
            layer.select(rows, first_col if trimmable else 0)
        else:
            layer.batch_select_indices(rows)
