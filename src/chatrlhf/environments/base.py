"""The environment protocol: what an RL episode is made of (docs/environments.md).

An episode starts from one data row. The policy answers; after each policy turn the environment answers
with a ``Step``: messages for the next turn (tool results, a user's follow-up), or ``done`` with the reward.
A non-final step may carry a reward too (a per-turn reward, placed on that turn's last token).

    class Guess(Environment):
        max_turns = 3

        def start(self, row):                  # the row's columns: "prompt" (messages) and its extra columns
            return {"target": int(row["target"])}

        def step(self, state, reply):          # reply: the policy's text for this turn
            guess = extract_number(reply)
            if guess == state["target"]:
                return Step(reward=1.0, done=True, info={"correct": True})
            return Step(messages=[{"role": "user", "content": "higher" if guess < state["target"] else "lower"}])

The rollout driver (``episodes.py``) enforces the limits: ``max_turns`` policy turns, ``max_total_tokens``
for the whole conversation, and a tool's ``timeout_s``. An episode a limit ends keeps the rewards its
environment gave so far (0 when it never said ``done``); so does one whose reply was cut at the turn's
token limit, unless ``end_on_cut`` is False. ``info`` feeds the evaluation: ``correct`` (bool)
gives the accuracy, ``tool_calls`` and ``tool_errors`` (counts) the tool-call success rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chatrlhf.environments.tools import Tool


@dataclass
class Step:
    """The environment's answer to one policy turn."""

    messages: list[dict] = field(default_factory=list)
    """The next turn's messages, ``{"role": "tool" | "user", "content": str}``; ignored when ``done``."""
    reward: float = 0.0
    """The reward for the turn just taken; with ``done``, the episode's final score."""
    done: bool = False
    info: dict = field(default_factory=dict)
    """Counters for the evaluation (``correct``, ``tool_calls``, ``tool_errors``); later steps' values replace
    earlier ones for booleans and add up for numbers."""


class Environment:
    """Subclass, set the limits and override ``start`` and ``step``. One instance serves every episode of a
    run, so keep an episode's state in the object ``start`` returns, never on ``self``."""

    max_turns: int = 4
    """Policy turns per episode."""
    max_total_tokens: int = 1024
    """Tokens of the whole conversation, prompt included; the driver cuts the last turn to fit."""
    tools: list[Tool] = []
    """Tools the policy may call (``tools.py``): rendered by the chat template's ``tools=`` when it supports
    them, else described in a system message (``tools.plain_tool_prompt``)."""
    system: str | None = None
    """A system message put first in every episode (before the tools' description, if any)."""
    end_on_cut: bool = True
    """Whether a reply cut at the turn's token limit (no end-of-turn token) ends the episode. False: the
    environment answers it like any reply, and the end-of-turn token goes into the row as context."""
    required_columns: tuple[str, ...] = ()
    """Columns every data row must have; checked on all rows before training (``check_row`` too)."""

    def check_row(self, row: dict) -> str | None:
        """Why ``row`` cannot start an episode (None: it can); called on every row before training."""
        return None

    def opening(self, row: dict) -> list[dict]:
        """The messages the policy answers first: the row's prompt, after ``system`` when set."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + list(row["prompt"])

    def start(self, row: dict):
        """The episode's state (any object) for ``row``: its ``prompt`` messages and its extra columns."""
        return dict(row)

    def step(self, state, reply: str) -> Step:
        """The environment's answer to the policy's ``reply`` (text, special tokens removed)."""
        raise NotImplementedError
