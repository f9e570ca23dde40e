"""Multi-turn rollouts: episodes of an ``Environment`` played by a generation function, as one token row each.

Each episode's row is the opening prompt (rendered once by the chat template), then every policy turn's
sampled tokens exactly as generated, and between them the environment's turns as the template renders them.
An environment turn's tokens are the template's text after the policy's end-of-turn token up to and
including the next generation prompt, tokenised on its own: the policy's tokens are never re-tokenised, so
the tokens trained on are the tokens the model saw (``tests/unit/test_episodes.py`` checks that this equals
the template's rendering of the whole conversation). ``to_rollout`` lays the episodes out as a ``Rollout``
whose response part holds every post-prompt token, with ``response_mask`` 1 on policy tokens only and
``context_mask`` 1 on all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from chatrlhf.data.collate import pad_sequences
from chatrlhf.environments.base import Environment, Step
from chatrlhf.rollout.types import Rollout, SamplingConfig

Generate = Callable[[torch.Tensor, torch.Tensor, SamplingConfig], Rollout]
"""(left-padded ids (B, T), their mask, sampling) -> the rollout of one turn."""


@dataclass
class Episode:
    """One conversation: its tokens after the prompt, which are the policy's, and what it earned."""

    prompt_ids: list[int]
    messages: list[dict]  # the conversation so far, opening included
    state: object
    opening: int = 0  # how many of ``messages`` are the opening (the prompt the first turn answers)
    ids: list[int] = field(default_factory=list)  # every token after the prompt, in order
    policy: list[bool] = field(default_factory=list)  # per token of ids: sampled by the policy
    log_probs: list[float] = field(default_factory=list)  # per token of ids: the generator's (0 off policy)
    turn_rewards: list[tuple[int, float]] = field(default_factory=list)  # (index in ids of a turn's last token, r)
    score: float = 0.0  # the final step's reward
    done: bool = False
    finished: bool = True  # the last policy turn ended with EOS
    turns: int = 0
    info: dict = field(default_factory=dict)

    @property
    def replies(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "assistant"]


def render_opening(tokenizer, env: Environment, row: dict) -> tuple[list[dict], list[int]]:
    """(opening messages, their prompt ids ending in the generation prompt); tools go through the template's
    ``tools=`` when it renders them, else into a system message."""
    messages = env.opening(row)
    tools = [t.schema() for t in env.tools]
    if tools and not template_renders_tools(tokenizer):
        from chatrlhf.environments.tools import plain_tool_prompt

        messages = _with_system(messages, plain_tool_prompt(env.tools))
        tools = []
    text = tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True, tokenize=False)
    return messages, list(tokenizer(text, add_special_tokens=False)["input_ids"])


def template_renders_tools(tokenizer) -> bool:
    """Whether the chat template uses ``tools=`` (rendering with and without them differs)."""
    probe = [{"role": "user", "content": "hi"}]
    schema = [{"type": "function", "function": {"name": "probe_tool", "description": "d",
                                                "parameters": {"type": "object", "properties": {}}}}]
    bare = tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
    return tokenizer.apply_chat_template(probe, tools=schema, add_generation_prompt=True, tokenize=False) != bare


def _with_system(messages: list[dict], text: str) -> list[dict]:
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def turn_ids(tokenizer, messages: list[dict], new: list[dict], eos_text: str) -> list[int]:
    """The tokens between the policy's end-of-turn token ending ``messages`` and the next policy turn: the
    template's text of ``new`` and the generation prompt. Raises when the template renders the earlier
    turns differently once ``new`` follows them (its output would not extend what the policy saw)."""
    before = tokenizer.apply_chat_template(messages, tokenize=False)
    after = tokenizer.apply_chat_template(messages + new, add_generation_prompt=True, tokenize=False)
    cut = before.rfind(eos_text)
    if cut < 0 or after[: cut + len(eos_text)] != before[: cut + len(eos_text)]:
        raise ValueError("the chat template renders earlier turns differently once a new turn follows, so an "
                         "episode's tokens cannot grow turn by turn; use a template that only appends")
    return list(tokenizer(after[cut + len(eos_text):], add_special_tokens=False)["input_ids"])


def run_episodes(env: Environment, rows: list[dict], tokenizer, generate: Generate, sampling: SamplingConfig,
                 eos_id: int, max_turns: int | None = None, max_total_tokens: int | None = None,
                 all_done: Callable[[bool], bool] | None = None) -> list[Episode]:
    """Plays one episode per row, each turn batched over the episodes still running.

    ``all_done(local_done) -> bool`` keeps processes in lock step: each turn is taken until every process's
    episodes are done, a process with none left generating for a stand-in row whose answer is dropped (its
    forwards take part in the others' collectives, e.g. ZeRO-3's parameter gathers).
    """
    max_turns = max_turns or env.max_turns
    max_total = max_total_tokens or env.max_total_tokens
    eos_text = tokenizer.convert_ids_to_tokens(eos_id)
    episodes = []
    for row in rows:
        messages, prompt_ids = render_opening(tokenizer, env, row)
        episodes.append(Episode(prompt_ids, messages, env.start(row), len(messages)))
    for turn in range(max_turns):
        for e in episodes:
            if not e.done and _room(e, max_total) <= 0:  # the last environment turn filled the token budget
                e.done, e.finished = True, False
        active = [e for e in episodes if not e.done]
        if all_done(not active) if all_done else not active:
            break
        contexts = [e.prompt_ids + e.ids for e in active] or [episodes[0].prompt_ids]
        budget = min(sampling.max_new_tokens, max((_room(e, max_total) for e in active), default=1))
        ids, mask = pad_sequences(contexts, tokenizer.pad_token_id, "left")
        rollout = generate(ids, mask, _with_budget(sampling, budget))
        for i, e in enumerate(active):
            _take_turn(e, env, rollout, i, tokenizer, eos_text, turn == max_turns - 1, _room(e, max_total))
    return episodes


def _room(e: Episode, max_total: int) -> int:
    """Tokens the episode may still add."""
    return max_total - len(e.prompt_ids) - len(e.ids)


def _with_budget(sampling: SamplingConfig, budget: int) -> SamplingConfig:
    return SamplingConfig(budget, sampling.temperature, sampling.top_p, sampling.top_k, sampling.do_sample)


def _take_turn(e: Episode, env: Environment, rollout: Rollout, i: int, tokenizer, eos_text: str, last: bool,
               room: int) -> None:
    """Appends row ``i`` of this turn's rollout to episode ``e`` (cut to the episode's token room), asks the
    environment, and appends its answer unless the episode ends."""
    n = min(int(rollout.response_lengths[i]), room)
    tokens = rollout.response_ids[i, :n].tolist()
    e.ids += tokens
    e.policy += [True] * n
    e.log_probs += rollout.log_probs[i, :n].tolist()
    e.finished = bool(rollout.finished[i]) and n == int(rollout.response_lengths[i])
    e.turns += 1
    reply = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    e.messages.append({"role": "assistant", "content": reply})
    step = env.step(e.state, reply)
    _merge_info(e.info, step)
    cut = not e.finished
    if step.done or last or (cut and env.end_on_cut) or not step.messages or cut and room <= n:
        e.done, e.score = True, float(step.reward) if step.done else 0.0
        if not step.done:
            _add_turn_reward(e, step.reward)
        return
    _add_turn_reward(e, step.reward)
    more = turn_ids(tokenizer, e.messages, step.messages, eos_text)
    if cut:  # the template closes every turn with the end-of-turn token: it goes in as context, untrained
        more = [tokenizer.convert_tokens_to_ids(eos_text), *more]
    e.messages += step.messages
    e.ids += more
    e.policy += [False] * len(more)
    e.log_probs += [0.0] * len(more)


def _add_turn_reward(e: Episode, reward: float) -> None:
    if reward:
        e.turn_rewards.append((len(e.ids) - 1, float(reward)))


def _merge_info(info: dict, step: Step) -> None:
    for key, value in step.info.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            info[key] = value
        else:
            info[key] = info.get(key, 0) + value


def to_rollout(episodes: list[Episode], pad_id: int) -> tuple[Rollout, torch.Tensor]:
    """(the episodes as one ``Rollout``, their per-turn rewards (B, R) on each rewarded turn's last token).

    ``response_ids`` holds every token after the prompt, right-padded; ``response_mask`` is 1 on the
    policy's tokens, ``context_mask`` on all of them; ``finished`` says whether the last policy turn ended
    with EOS."""
    prompt_ids, prompt_mask = pad_sequences([e.prompt_ids for e in episodes], pad_id, "left")  # (B, P)
    response_ids, context = pad_sequences([e.ids for e in episodes], pad_id, "right")  # (B, R)
    width = response_ids.shape[1]
    policy = torch.zeros((len(episodes), width), dtype=torch.long)
    log_probs = torch.zeros((len(episodes), width), dtype=torch.float32)
    turn_rewards = torch.zeros((len(episodes), width), dtype=torch.float32)
    for i, e in enumerate(episodes):
        policy[i, : len(e.policy)] = torch.tensor(e.policy, dtype=torch.long)
        log_probs[i, : len(e.log_probs)] = torch.tensor(e.log_probs, dtype=torch.float32)
        for index, reward in e.turn_rewards:
            turn_rewards[i, index] += reward
    finished = torch.tensor([e.finished for e in episodes], dtype=torch.bool)
    rollout = Rollout(prompt_ids, prompt_mask, response_ids, policy, finished, log_probs, context_mask=context)
    return rollout, turn_rewards
