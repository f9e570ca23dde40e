"""What goes into and comes out of generation: ``SamplingConfig`` and ``Rollout``.

Shapes: B = prompts, P = padded prompt width (left padding), R = longest response in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingConfig:
    """How the next token is chosen. Validated on construction; a bad value raises naming the field."""

    max_new_tokens: int = 96
    """Most tokens generated per prompt, the EOS included; a response that reaches it is cut (unfinished)."""
    temperature: float = 1.0
    """Logits are divided by it before sampling (and for ``Rollout.log_probs``); ignored when greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of most likely tokens whose mass reaches ``top_p``; 1 = off."""
    top_k: int = 0
    """Keep only the ``top_k`` most likely tokens; 0 = off."""
    do_sample: bool = True
    """False = greedy (argmax); temperature, top_p and top_k are then ignored."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"sampling.max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"sampling.temperature must be > 0 when sampling, got {self.temperature} "
                             "(use do_sample=False for greedy decoding)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0 (0 = off), got {self.top_k}")

    @property
    def logprob_temperature(self) -> float:
        """The temperature ``Rollout.log_probs`` are taken at: ``temperature`` when sampling, 1 when greedy."""
        return float(self.temperature) if self.do_sample else 1.0


@dataclass
class Rollout:
    """Prompts and their sampled responses, row i of every tensor belonging to prompt i.

    Masks come from generation itself, never from matching pad ids (pad == eos in SmolLM2): a response's
    final EOS is inside ``response_mask`` and its padding (pad_id, often the same id) is outside.
    """

    prompt_ids: torch.Tensor  # (B, P) left-padded prompts, exactly as given
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, R) right-padded with pad_id
    response_mask: torch.Tensor  # (B, R) 1 on every generated token, the final EOS included
    finished: torch.Tensor  # (B,) bool: the response ended with an EOS (False: cut at max_new_tokens)
    log_probs: torch.Tensor  # (B, R) float32 log-prob of each token under log_softmax(logits / T); 0 on padding
    context_mask: torch.Tensor | None = None
    """(B, R) 1 on every real token of the response part, when some are not the policy's: a multi-turn
    episode's environment turns sit between its policy turns, in the context but outside ``response_mask``
    (``chatrlhf.environments.episodes``). None: the response part is the policy's alone."""

    @property
    def sequences(self) -> torch.Tensor:
        """(B, P + R) prompt then response, ready for a training-style forward."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P + R) 1 on real tokens: prompt tokens, response tokens (EOS included), environment turns."""
        response = self.response_mask if self.context_mask is None else self.context_mask
        return torch.cat([self.prompt_mask, response.to(self.prompt_mask.dtype)], dim=1)

    @property
    def response_lengths(self) -> torch.Tensor:
        """(B,) long: generated tokens per row, the EOS included."""
        return self.response_mask.long().sum(-1)

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]


def merge_rollouts(parts: list[tuple[torch.Tensor, Rollout]], prompt_ids: torch.Tensor,
                   prompt_mask: torch.Tensor, pad_token_id: int) -> Rollout:
    """Puts sub-batch rollouts back into one, in the original row order.

    ``parts`` pairs each sub-batch's row indices (into the full batch) with its rollout; responses are
    right-padded to the longest one. ``prompt_ids``/``prompt_mask`` are the full batch as given.
    """
    batch = prompt_ids.shape[0]
    width = max((r.response_ids.shape[1] for _, r in parts), default=0)
    device = prompt_ids.device
    response_ids = torch.full((batch, width), pad_token_id, dtype=torch.long, device=device)  # (B, R)
    response_mask = torch.zeros((batch, width), dtype=prompt_mask.dtype, device=device)  # (B, R)
    log_probs = torch.zeros((batch, width), dtype=torch.float32, device=device)  # (B, R)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)  # (B,)
    for rows, part in parts:
        w = part.response_ids.shape[1]
        response_ids[rows, :w] = part.response_ids
        response_mask[rows, :w] = part.response_mask.to(response_mask.dtype)
        log_probs[rows, :w] = part.log_probs
        finished[rows] = part.finished
    return Rollout(prompt_ids, prompt_mask, response_ids, response_mask, finished, log_probs)


def cut_at_first_eos(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, tokens: torch.Tensor,
                     log_probs: torch.Tensor, eos: torch.Tensor, pad_token_id: int) -> Rollout:
    """A ``Rollout`` of generated ``tokens`` (B, T) and their ``log_probs``: each response runs to its first
    EOS (``finished``) or to the last step; after it come padding (pad id, mask 0, log-prob 0), and the width
    is cut to the longest response. Example: eos 2, tokens [[5, 2, 7], [5, 6, 7]] -> lengths [2, 3]."""
    steps = tokens.shape[1]
    is_eos = torch.isin(tokens, eos)  # (B, T)
    finished = is_eos.any(-1)  # (B,)
    # argmax of a 0/1 row is its first EOS; a row without one ran to the last step (0 steps: all 0)
    lengths = torch.where(finished, is_eos.int().argmax(-1) + 1, steps) if steps else finished.long()  # (B,)
    width = int(lengths.max()) if len(lengths) else 0
    mask = torch.arange(width, device=tokens.device) < lengths[:, None]  # (B, R)
    return Rollout(prompt_ids, prompt_mask, tokens[:, :width].masked_fill(~mask, pad_token_id),
                   mask.to(prompt_mask.dtype), finished, log_probs[:, :width].float().masked_fill(~mask, 0.0))


def stack_rows(parts: list[tuple[Rollout, list[int]]], pad_token_id: int) -> Rollout:
    """One ``Rollout`` of the rows ``rows`` of each rollout in ``parts``, in that order: rollouts generated as
    separate batches (each padded to its own widths) made one. Prompts are left-padded to the widest, responses
    right-padded to the longest (pad id, mask 0, log-prob 0); ``context_mask`` is kept when any part has one.

    Example: part A has prompts [[5, 6]] and responses [[7]], part B prompts [[9]] and responses [[8, 2]]
    (pad 0) -> prompt_ids [[5, 6], [0, 9]], prompt_mask [[1, 1], [0, 1]], response_ids [[7, 0], [8, 2]],
    response_mask [[1, 0], [1, 1]].
    """
    prompt_width = max(r.prompt_ids.shape[1] for r, _ in parts)
    response_width = max(r.response_ids.shape[1] for r, _ in parts)

    def stacked(field, left: bool, value) -> torch.Tensor:
        out = []
        for rollout, rows in parts:
            x = field(rollout)[torch.as_tensor(rows, dtype=torch.long, device=rollout.prompt_ids.device)]
            extra = (prompt_width if left else response_width) - x.shape[1]
            out.append(torch.nn.functional.pad(x, (extra, 0) if left else (0, extra), value=value))
        return torch.cat(out)

    context = None
    if any(r.context_mask is not None for r, _ in parts):
        context = stacked(lambda r: r.response_mask if r.context_mask is None else r.context_mask, False, 0)
    return Rollout(stacked(lambda r: r.prompt_ids, True, pad_token_id), stacked(lambda r: r.prompt_mask, True, 0),
                   stacked(lambda r: r.response_ids, False, pad_token_id), stacked(lambda r: r.response_mask, False, 0),
                   torch.cat([r.finished[torch.as_tensor(rows, dtype=torch.long, device=r.finished.device)]
                              for r, rows in parts]),
                   stacked(lambda r: r.log_probs, False, 0.0), context)
