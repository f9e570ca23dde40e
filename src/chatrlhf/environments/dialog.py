"""The shipped ``dialog`` environment: a simulated user asks two or three follow-up questions, and the gold
rater judges the whole conversation (``conversation_score``).

Data: any prompt set (``demo:prompts_train``, held out ``demo:prompts_eval``); a row's ``harmful`` column,
when present, tells the rater whether a good assistant declines the topic.
"""

from __future__ import annotations

import hashlib
import re

from chatrlhf.environments.base import Environment, Step

FOLLOW_UPS = (
    "Can you give me a concrete example?",
    "Why does that work?",
    "What is the most important thing to remember?",
    "How would I get started today?",
    "What mistakes should I avoid?",
    "Can you say that more simply?",
)
"""What the simulated user asks next, picked per row without repeats."""
CONTRADICTION_PENALTY = 0.25
"""Taken off when the replies contradict each other (``rater.contradicts`` over all their sentences)."""
REPEAT_PENALTY = 0.15
"""Taken off per reply that repeats an earlier one (word-set Jaccard similarity above ``REPEAT_JACCARD``)."""
REPEAT_JACCARD = 0.7
_WORD = re.compile(r"[a-z']+")
_RATER = None


def _rater():
    """One simulated rater per process (it holds a sentence encoder)."""
    global _RATER
    if _RATER is None:
        from chatrlhf.rewards.rater import SimulatedRater

        _RATER = SimulatedRater()
    return _RATER


def follow_ups(topic: str) -> list[str]:
    """Two or three distinct follow-up questions for ``topic``, a pure function of its text."""
    digest = hashlib.sha256(topic.encode()).digest()
    order = sorted(range(len(FOLLOW_UPS)), key=lambda i: digest[i])
    return [FOLLOW_UPS[i] for i in order[: 2 + digest[-1] % 2]]


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def repeats(replies: list[str]) -> int:
    """How many replies repeat an earlier one (Jaccard of word sets > ``REPEAT_JACCARD``; two empty ones too)."""
    count = 0
    for i, reply in enumerate(replies):
        a = _words(reply)
        for earlier in replies[:i]:
            b = _words(earlier)
            if len(a | b) == 0 or len(a & b) / len(a | b) > REPEAT_JACCARD:
                count += 1
                break
    return count


def conversation_score(topic: str, questions: list[str], replies: list[str], harmful: bool | None = None,
                       finished: bool = True) -> float:
    """The gold rater's score of a whole conversation, in [0, 1]: the mean of each reply's overall score
    (each rated against the topic and its own question, so relevance is to what was asked), minus
    ``CONTRADICTION_PENALTY`` when the replies contradict each other and ``REPEAT_PENALTY`` per repeated
    reply. A conversation cut before its last question is answered counts the missing replies as 0."""
    from chatrlhf.rewards.rater import _sentences, contradicts

    asked = [topic, *(f"{topic} {q}" for q in questions[1:])]
    n = len(replies)
    flags = None if harmful is None else [bool(harmful)] * n
    truncated = [False] * n
    if n and not finished:
        truncated[-1] = True
    scores = _rater().score_overall(asked[:n], replies, flags, truncated) if n else []
    mean = sum(scores) / len(asked)
    sentences = [s for r in replies for s in _sentences(r)]
    penalty = CONTRADICTION_PENALTY * contradicts(sentences) + REPEAT_PENALTY * repeats(replies)
    return min(1.0, max(0.0, mean - penalty))


class DialogEnv(Environment):
    """Answer the user's question, then each follow-up; the episode's reward is ``conversation_score``."""

    max_turns = 4
    max_total_tokens = 1024
    end_on_cut = False  # the user asks the next question after a long answer too; the rater judges it
    train_data, eval_data = "demo:prompts_train", "demo:prompts_eval"

    def start(self, row: dict) -> dict:
        topic = row["prompt"][-1]["content"]
        return {"topic": topic, "questions": [topic, *follow_ups(topic)], "replies": [],
                "harmful": row.get("harmful")}

    def step(self, state: dict, reply: str) -> Step:
        state["replies"].append(reply)
        asked = len(state["replies"])
        if asked < len(state["questions"]):
            return Step(messages=[{"role": "user", "content": state["questions"][asked]}])
        score = conversation_score(state["topic"], state["questions"], state["replies"], state["harmful"])
        return Step(reward=score, done=True, info={"conversation_score": score})
