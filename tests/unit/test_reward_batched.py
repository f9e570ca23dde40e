"""Batched reward functions (TRL's form): which functions are batched, what they are given, and how a wrong
return is named. Expected values are worked out by hand in each test."""

import pytest
import torch

from chatrlhf.rewards import batched
from chatrlhf.rewards import examples as ex
from chatrlhf.rewards.contract import RewardBatch
from chatrlhf.rewards.factory import build_reward_source
from chatrlhf.rewards.sources import FunctionSource, batch_columns, is_batched

EXAMPLES = "chatrlhf.rewards.examples"


def make_batch(prompts, responses, meta=None, finished=None) -> RewardBatch:
    """A batch for text-only sources: the token tensors are dummies."""
    n = len(responses)
    return RewardBatch(torch.zeros(n, 4, dtype=torch.long), torch.ones(n, 4, dtype=torch.long),
                       [[{"role": "user", "content": p}] for p in prompts], list(responses),
                       finished if finished is not None else [True] * n, meta if meta is not None else [])


def source_from(tmp_path, code: str, name: str = "f") -> FunctionSource:
    file = tmp_path / "rules.py"
    file.write_text(code)
    return FunctionSource(f"{file}:{name}")


# ---------------------------------------------------------------------------------------------- the rule
def test_which_functions_are_batched():
    def per_answer(prompt, response, metadata):
        return 0.0

    def trl_style(completions, **kwargs):  # TRL's name for the answers: batched without the decorator
        return [0.0] * len(completions)

    @batched
    def marked(prompts, answers, **columns):
        return [0.0] * len(prompts)

    assert not is_batched(per_answer) and is_batched(trl_style) and is_batched(marked)
    assert marked.chatrlhf_batched is True and marked([1, 2], None) == [0.0, 0.0]  # still callable as written
    assert not is_batched(len)  # a builtin without a readable signature is per-answer


def test_batch_columns_by_hand():
    meta = [{"reference": "a"}, {"reference": "b", "id": 2}]
    assert batch_columns(meta, [True, False], 2) == {"reference": ["a", "b"], "id": [None, 2],
                                                     "finished": [True, False]}
    assert batch_columns([], [True], 1) == {"finished": [True]}  # no meta at all


# ----------------------------------------------------------------------------------------- the call
def test_trl_function_gets_prompt_texts_completions_and_columns(tmp_path):
    source = source_from(tmp_path, (
        "def f(prompts, completions, reference, **kwargs):\n"
        "    assert sorted(kwargs) == ['finished', 'id'], kwargs\n"
        "    return [len(p) + 10 * (c == r) + 100 * done + 1000 * (i or 0)\n"
        "            for p, c, r, done, i in zip(prompts, completions, reference, kwargs['finished'], kwargs['id'])]\n"))
    assert source.batched
    batch = make_batch(["abc", "hello"], ["x", "y"], meta=[{"reference": "x", "id": 3}, {"reference": "z"}],
                       finished=[True, False])
    # row 0: len("abc") 3 + 10 (matches its reference) + 100 (finished) + 3000 (id 3); row 1: 5 + 0 + 0 + 0
    assert source(batch).tolist() == [3113.0, 5.0]


def test_a_conversation_prompt_is_text_as_in_the_per_answer_form(tmp_path):
    source = source_from(tmp_path, "def f(prompts, completions, **kw):\n    return [float(len(p)) for p in prompts]\n")
    batch = make_batch(["q"], ["a"])
    batch.prompts = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]]
    text = "system: Be brief.\nuser: Hi"  # chatrlhf.rewards.contract.prompt_texts of a conversation
    assert source(batch).tolist() == [float(len(text))]


def test_function_without_kwargs_gets_only_the_columns_it_names(tmp_path):
    source = source_from(tmp_path, "def f(prompts, completions, bonus):\n    return bonus\n")
    batch = make_batch(["q", "q"], ["a", "b"], meta=[{"bonus": 1, "other": "x"}, {"bonus": 2}])
    assert source(batch).tolist() == [1.0, 2.0]
    only_answers = source_from(tmp_path, "def f(completions):\n    return [len(c) for c in completions]\n")
    assert only_answers(batch).tolist() == [1.0, 1.0]  # no prompts, no columns: it names neither


def test_marked_function_may_take_everything_as_kwargs(tmp_path):
    source = source_from(tmp_path, (
        "from chatrlhf.rewards import batched\n\n"
        "@batched\n"
        "def f(**kw):\n"
        "    return [float(len(c)) for c in kw['completions']]\n"))
    assert source(make_batch(["q", "q", "q"], ["", "ab", "abcd"])).tolist() == [0.0, 2.0, 4.0]


@pytest.mark.parametrize("returned", ["np.array([0.5, 2.0])", "torch.tensor([0.5, 2.0])", "(0.5, 2)"])
def test_arrays_tensors_and_tuples_are_accepted(tmp_path, returned):
    source = source_from(tmp_path, f"import numpy as np\nimport torch\n\ndef f(prompts, completions, **kw):\n"
                                   f"    return {returned}\n")
    out = source(make_batch(["q", "q"], ["a", "b"]))
    assert out.dtype == torch.float32 and out.tolist() == [0.5, 2.0]


# -------------------------------------------------------------------------------------- wrong returns
@pytest.mark.parametrize("returned, message", [
    ("[1.0]", r"batched reward function .*rules\.py:f returned 1 scores for a batch of 2 answers"),
    ("[1.0, 2.0, 3.0]", r"returned 3 scores for a batch of 2 answers"),
    ("[1.0, 'bad']", r"returned 'bad' \(str\) for row 1 of the batch"),
    ("[float('nan'), 1.0]", r"returned nan \(float\) for row 0 of the batch"),
    ("[1.0, None]", r"returned None \(NoneType\) for row 1 of the batch"),
    ("0.5", r"returned 0\.5 \(float\); it must return a list of 2 finite numbers, one per answer"),
    ("{'a': 1, 'b': 2}", r"returned .* \(dict\); it must return a list of 2 finite numbers"),
])
def test_wrong_return_names_the_spec_and_row(tmp_path, returned, message):
    source = source_from(tmp_path, f"def f(prompts, completions, **kw):\n    return {returned}\n")
    with pytest.raises(ValueError, match=message):
        source(make_batch(["q", "q"], ["a", "b"]))


def test_an_exception_names_the_spec_and_the_rule(tmp_path):
    source = source_from(tmp_path, "def f(prompts, completions):\n    return [1 / len(c) for c in completions]\n")
    with pytest.raises(RuntimeError, match=r"rules\.py:f raised ZeroDivisionError on a batch of 2 answers \(called "
                                           r"as f\(prompts=\.\.\., completions=\.\.\., \*\*columns\) because it is "
                                           r"marked @batched or has a 'completions' parameter\)"):
        source(make_batch(["q", "q"], ["a", ""]))


def test_a_column_named_like_an_argument_is_refused(tmp_path):
    source = source_from(tmp_path, "def f(prompts, completions, **kw):\n    return [0.0] * len(prompts)\n")
    with pytest.raises(ValueError, match=r"the data has a column named 'completions'.*rename that column"):
        source(make_batch(["q"], ["a"], meta=[{"completions": "x"}]))


# ------------------------------------------------------------------------------------------- examples
def test_reference_f1_by_hand():
    completions = ["The sky is blue.", "blue sky", "Bananas.", "anything", "the the cat"]
    reference = ["blue sky", "blue sky", "blue sky", None, "the cat sat"]
    # 0: shared {sky, blue}: P = 2/4, R = 2/2 -> 2 * 0.5 * 1 / 1.5 = 2/3; 1: identical -> 1; 2: nothing shared -> 0;
    # 3: no reference -> 0; 4: shared "the" once and "cat" (repeats counted): P = 2/3, R = 2/3 -> 2/3
    expected = [2 / 3, 1.0, 0.0, 0.0, 2 / 3]
    assert ex.reference_f1(["q"] * 5, completions, reference=reference) == pytest.approx(expected, rel=1e-12)
    assert ex.reference_f1(["q"], ["x"]) == [0.0]  # no reference column at all


def test_batched_example_in_an_ensemble_with_a_per_answer_one():
    spec = f"2*{EXAMPLES}:reference_f1 + 1*{EXAMPLES}:length_reward"
    ens = build_reward_source(spec, None, normalize_sources=False)
    assert [s.batched for s in ens.sources] == [True, False]
    batch = make_batch(["q", "q"], ["The sky is blue.", "one two three four five six"],
                       meta=[{"reference": "blue sky"}, {}])
    # row 0: 2 * 2/3 + 4 words / 15 = 4/3 + 4/15 = 1.6; row 1: 2 * 0 (no reference) + 6/15 = 0.4
    torch.testing.assert_close(ens(batch), torch.tensor([1.6, 0.4]), rtol=1e-6, atol=0)
    assert ens.last_parts["reference_f1"].tolist() == pytest.approx([2 / 3, 0.0])
