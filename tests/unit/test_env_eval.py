"""The environment evaluation's figures, hand-computed: unbiased pass@k and one model's summary."""

import pytest

from chatrlhf.environments.episodes import Episode
from chatrlhf.evaluation.environment import env_table, pass_at_k, summarise


@pytest.mark.parametrize(("n", "c", "k", "want"), [
    (4, 1, 2, 1 - 3 / 6),     # 1 - C(3,2)/C(4,2)
    (4, 0, 2, 0.0),
    (4, 3, 2, 1.0),           # n - c = 1 < k: every pair holds a correct one
    (5, 2, 1, 2 / 5),         # pass@1 is the fraction correct
    (10, 3, 4, 1 - 35 / 210),  # 1 - C(7,4)/C(10,4)
])
def test_pass_at_k_by_hand(n, c, k, want):
    assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


def episode(correct: bool, score: float, turns: int, tokens: int, calls: int = 0, errors: int = 0) -> Episode:
    return Episode(prompt_ids=[1], messages=[], state=None, ids=[0] * tokens, score=score, turns=turns,
                   info={"correct": correct, "tool_calls": calls, "tool_errors": errors})


def test_summary_by_hand():
    greedy = [episode(True, 1.0, 2, 10, calls=2, errors=1), episode(False, 0.0, 1, 4), episode(True, 1.0, 3, 7, calls=1)]
    sampled = [[episode(True, 1, 1, 1), episode(False, 0, 1, 1)],   # pass@2 1, pass@1 1/2
               [episode(False, 0, 1, 1), episode(False, 0, 1, 1)],  # 0, 0
               [episode(True, 1, 1, 1), episode(True, 1, 1, 1)]]    # 1, 1
    got = summarise(greedy, sampled, 2, judged=True)
    assert got == pytest.approx({"episodes": 3, "score": 2 / 3, "turns": 2.0, "tokens": 7.0, "tool_calls": 1.0,
                                 "tool_success": 2 / 3, "accuracy": 2 / 3, "pass@2": 2 / 3,
                                 "sampled_accuracy": 1.5 / 3})


def test_summary_without_checks_or_tools():
    plain = Episode(prompt_ids=[1], messages=[], state=None, ids=[0, 0], score=0.5, turns=1)
    got = summarise([plain], None, 0, judged=False)
    assert "accuracy" not in got and got["tool_success"] is None and got["score"] == 0.5


def test_an_episode_cut_before_judgement_counts_as_wrong():
    cut = Episode(prompt_ids=[1], messages=[], state=None, ids=[0], turns=1)
    got = summarise([episode(True, 1.0, 1, 1), cut], [[cut, episode(True, 1, 1, 1)]], 2, judged=True)
    assert summarise([cut], [[cut, cut]], 2, judged=True)["pass@2"] == 0.0  # a model whose every episode was cut
    assert got["accuracy"] == 0.5 and got["pass@2"] == 1.0 and got["sampled_accuracy"] == 0.5


def test_table_shows_pass_at_k_only_when_sampled():
    results = {"env": "math", "data": "demo:math_eval", "rows": 1, "k": 0, "win_rates": {},
               "models": {"base": {"accuracy": 0.25, "score": 0.25, "turns": 1.0, "tokens": 5.0, "tool_calls": 0.0}}}
    assert "pass@" not in env_table(results) and "| base | 0.250 | 0.250 |" in env_table(results)
    results.update(k=4, models={"base": {"accuracy": 0.25, "pass@4": 0.5}})
    assert "| accuracy | pass@4 |" in env_table(results) and "| base | 0.250 | 0.500 |" in env_table(results)
