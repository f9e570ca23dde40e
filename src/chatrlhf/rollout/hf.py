"""The reference backend: transformers' ``model.generate``, its output converted into a ``Rollout``.

It is what the native engine is tested and benchmarked against. ``generate`` only returns token ids, so
the log-probs come from a forward hook that sees every forward's raw last-position logits (before any
logits processor): the token fed to forward k+1 is the one chosen from forward k's logits.
"""

from __future__ import annotations

import torch

from chatrlhf.rollout.sampler import plan_groups
from chatrlhf.rollout.types import Rollout, SamplingConfig, cut_at_first_eos, merge_rollouts


class _LogProbRecorder:
    """Forward hook: log_softmax(logits / T) of each forward's last position, gathered at the token the
    next forward is fed (one (B, V) distribution kept at a time, not all of them)."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.pending: torch.Tensor | None = None  # (B, V) log-distribution whose chosen token is not yet known
        self.values: list[torch.Tensor] = []  # (B,) per generated token

    def __call__(self, module, args, kwargs, output) -> None:
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        if self.pending is not None:
            self.values.append(self.pending.gather(-1, ids[:, -1:]).squeeze(-1))
        self.pending = torch.log_softmax(output.logits[:, -1].float() / self.temperature, dim=-1)

    def log_probs(self, response_ids: torch.Tensor) -> torch.Tensor:
        """(B, R) log-probs of ``response_ids``; the last token was never fed back, so it comes from ``pending``."""
        width = response_ids.shape[1]
        if self.pending is None:
            raise RuntimeError("the log-prob hook saw no forward call of the model during generate; pass the "
                               "transformers model itself (or a PEFT model), not another wrapper")
        values = self.values[:width]
        if len(values) < width:
            values.append(self.pending.gather(-1, response_ids[:, width - 1:width]).squeeze(-1))
        return torch.stack(values, dim=1)


def _seed_from(generator: torch.Generator) -> int:
    """A seed drawn from ``generator``: the same seeded generator gives the same samples, and it advances,
    so two calls with one generator differ (as with the native backend)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


class _StopWhen:
    """A transformers stopping criterion that hands ``on_step`` the tokens generated so far (``generate``'s
    ``on_step`` contract); all rows stop once it returns True."""

    def __init__(self, on_step, prompt_width: int):
        self.on_step, self.prompt_width = on_step, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        stop = bool(self.on_step(input_ids[:, self.prompt_width:]))
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def _generate_ids(model, input_ids, attention_mask, sampling: SamplingConfig, eos_token_ids, pad_token_id,
                  seed: int | None, on_step=None) -> tuple[torch.Tensor, _LogProbRecorder]:
    from transformers import StoppingCriteriaList

    kwargs = {"max_new_tokens": sampling.max_new_tokens, "do_sample": sampling.do_sample,
              "pad_token_id": pad_token_id, "eos_token_id": list(eos_token_ids)}
    if on_step is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([_StopWhen(on_step, input_ids.shape[1])])
    if sampling.do_sample:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    recorder = _LogProbRecorder(sampling.logprob_temperature)
    # A PEFT wrapper's generate calls the wrapped transformers model, so the hook goes there.
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    handle = target.register_forward_hook(recorder, with_kwargs=True)
    cuda = [input_ids.device.index or 0] if input_ids.device.type == "cuda" else []
    try:
        # transformers samples from the global RNG: seed it inside fork_rng, so the caller's RNG is untouched.
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    finally:
        handle.remove()
    return out[:, input_ids.shape[1]:], recorder


def _to_rollout(input_ids, attention_mask, response, recorder: _LogProbRecorder, eos: torch.Tensor,
                pad_token_id: int) -> Rollout:
    # generate pads finished rows with pad (often == eos): the first EOS ends each response
    log_probs = recorder.log_probs(response) if response.shape[1] else response.float()
    return cut_at_first_eos(input_ids, attention_mask, response, log_probs, eos, pad_token_id)


def generate_hf(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: SamplingConfig, *,
                eos_token_ids: list[int], pad_token_id: int, generator: torch.Generator | None = None,
                max_batch: int | None = None, on_step=None) -> Rollout:
    """See ``chatrlhf.rollout.generate`` (backend "hf"); sub-batches of ``max_batch`` run one after another."""
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=input_ids.device)
    parts = []
    for rows in plan_groups(attention_mask.sum(-1), max_batch):
        ids, mask = input_ids[rows], attention_mask[rows]
        if sampling.max_new_tokens == 0 or len(rows) == 0:
            response = ids.new_zeros((len(rows), 0))
            parts.append((rows, _to_rollout(ids, mask, response, _LogProbRecorder(1.0), eos, pad_token_id)))
            continue
        seed = _seed_from(generator) if generator is not None and sampling.do_sample else None
        response, recorder = _generate_ids(model, ids, mask, sampling, eos_token_ids, pad_token_id, seed, on_step)
        parts.append((rows, _to_rollout(ids, mask, response, recorder, eos, pad_token_id)))
    return merge_rollouts(parts, input_ids, attention_mask, pad_token_id)
