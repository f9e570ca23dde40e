"""Token-by-token generation on a vLLM engine, for ``VLLMEngine.generate(..., on_step=...)``.

Drives ``LLM.llm_engine`` the way ``LLM.generate`` does (render each prompt, ``add_request``, ``step()`` until
nothing is unfinished), with requests that report each step's new tokens (``RequestOutputKind.DELTA``, set
by the caller), so ``on_step`` sees the tokens after every step and can stop the generation. Stopped or
failed, the requests still running are aborted: the engine holds nothing afterwards. Imports no ``vllm``
(``chatrlhf.rollout.vllm_engine`` does, and builds the requests' ``SamplingParams``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Answer = tuple[list[int], list[float]]
"""One response: its token ids and the log-prob of each."""


def answer_tokens(completion) -> Answer:
    """A vLLM ``CompletionOutput`` (whole, or one step's delta) as its tokens and their log-probs."""
    tokens = list(completion.token_ids)
    steps = completion.logprobs or []
    if len(steps) != len(tokens):
        raise RuntimeError(f"vLLM returned {len(steps)} log-probs for {len(tokens)} tokens")
    return tokens, [step[t].logprob for t, step in zip(tokens, steps)]


def generate_stepwise(llm, prompts: list[list[int]], params: list, request_prefix: str,
                      on_step: Callable[[torch.Tensor], bool], pad_token_id: int, device) -> list[Answer]:
    """Generates one answer per prompt on ``llm`` (a ``vllm.LLM``), calling ``on_step`` after each engine step
    that produced tokens with the (B, t) tokens so far (t: the longest answer so far; shorter rows padded).
    ``on_step`` returning True stops at once; the answers are then the tokens received so far.

    ``params``: one ``SamplingParams`` per prompt, in DELTA output mode. ``request_prefix``: makes the
    request ids (``{request_prefix}-{row}``) unique in the engine; ``LLM`` numbers its own requests 0, 1, ...
    """
    engine = llm.llm_engine
    answers: list[Answer] = [([], []) for _ in prompts]
    rows = {f"{request_prefix}-{row}": row for row in range(len(prompts))}
    added: dict[int, str] = {}  # row -> the engine's internal request id
    ended: set[int] = set()
    try:
        rendered = llm._preprocess_cmpl([{"prompt_token_ids": p} for p in prompts])  # as LLM.generate renders
        for (request_id, row), engine_input, p in zip(rows.items(), rendered, params):
            added[row] = engine.add_request(request_id, engine_input, p)
        while engine.has_unfinished_requests():
            grew = False
            for out in engine.step():
                row = rows[out.request_id]
                tokens, log_probs = answer_tokens(out.outputs[0])
                answers[row][0].extend(tokens)
                answers[row][1].extend(log_probs)
                grew |= bool(tokens)
                if out.finished:
                    ended.add(row)
            if grew and on_step(_so_far(answers, pad_token_id, device)):
                break
    finally:
        if unfinished := [request_id for row, request_id in added.items() if row not in ended]:
            engine.abort_request(unfinished, internal=True)
    return answers


def _so_far(answers: list[Answer], pad_token_id: int, device) -> torch.Tensor:
    width = max(len(tokens) for tokens, _ in answers)
    so_far = torch.full((len(answers), width), pad_token_id, dtype=torch.long)  # (B, t)
    for row, (tokens, _) in enumerate(answers):
        so_far[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return so_far.to(device)
