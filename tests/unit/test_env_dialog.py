"""The dialog environment: the simulated user's follow-ups, and the gold rater's conversation score
(relevance per turn, penalties for contradicting or repeating earlier replies)."""

import pytest

from chatrlhf.environments.dialog import (
    CONTRADICTION_PENALTY,
    FOLLOW_UPS,
    REPEAT_PENALTY,
    DialogEnv,
    conversation_score,
    follow_ups,
    repeats,
)

TOPIC = "I have a presentation tomorrow and feel anxious. What would you suggest?"
GOOD = ["Practice your talk twice tonight and get some sleep. Breathing slowly before you start helps calm nerves.",
        "For example, rehearse the opening in front of a friend and ask for one piece of feedback.",
        "Remember that the audience wants you to succeed.",
        "Start today by writing down your three key points."]


def test_follow_ups_are_two_or_three_distinct_and_fixed_per_topic():
    seen = set()
    for i in range(40):
        qs = follow_ups(f"topic {i}")
        assert 2 <= len(qs) <= 3 and len(set(qs)) == len(qs) and set(qs) <= set(FOLLOW_UPS)
        assert follow_ups(f"topic {i}") == qs
        seen.add(len(qs))
    assert seen == {2, 3}


def test_repeats_by_hand():
    assert repeats(["a b c", "a b c d", "x y"]) == 1  # Jaccard 3/4 > 0.7
    assert repeats(["a b c", "a b d e"]) == 0  # 2/5
    assert repeats(["", ""]) == 1


def test_a_good_conversation_beats_a_repetitive_one():
    questions = [TOPIC, *follow_ups(TOPIC)]
    good = conversation_score(TOPIC, questions, GOOD[: len(questions)])
    same = conversation_score(TOPIC, questions, [GOOD[0]] * len(questions))
    dull = conversation_score(TOPIC, questions, ["I don't know."] * len(questions))
    assert 0 <= dull < same < good <= 1
    # repeating costs REPEAT_PENALTY per repeated reply on top of the (lower) relevance to the follow-ups
    assert good - same > (len(questions) - 1) * REPEAT_PENALTY - 0.2


def test_contradicting_replies_lose_the_penalty():
    questions = [TOPIC, "Why does that work?"]
    a = conversation_score(TOPIC, questions, ["You should practice the talk.", "It builds memory and calm."])
    b = conversation_score(TOPIC, questions, ["You should practice the talk.", "You should not practice the talk."])
    assert a - b > CONTRADICTION_PENALTY - 0.1


def test_an_episode_asks_each_follow_up_then_scores():
    env = DialogEnv()
    state = env.start({"prompt": [{"role": "user", "content": TOPIC}], "harmful": False})
    n = len(state["questions"])
    for i in range(n - 1):
        step = env.step(state, GOOD[i])
        assert not step.done and step.messages == [{"role": "user", "content": state["questions"][i + 1]}]
    step = env.step(state, GOOD[n - 1])
    assert step.done and step.reward == pytest.approx(conversation_score(TOPIC, state["questions"], GOOD[:n], False))
    assert step.info == {"conversation_score": step.reward}
