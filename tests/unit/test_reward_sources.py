"""Reward sources: example rule rewards, rewards as code, the similarity reward and ensembles.

Expected values are worked out by hand in each test (or in the docstring of the function tested).
"""

import json
import math

import pytest
import torch

from chatrlhf.algorithms.rl import RunningMoments
from chatrlhf.data.convert import to_prompt
from chatrlhf.data.formats import normalise_rows
from chatrlhf.rewards import examples as ex
from chatrlhf.rewards.contract import RewardBatch
from chatrlhf.rewards.ensemble import EnsembleSource, is_ensemble_spec, parse_ensemble_spec, unique_names
from chatrlhf.rewards.factory import build_reward_source, build_single_source
from chatrlhf.rewards.similarity import SimilaritySource, reference_texts
from chatrlhf.rewards.sources import FunctionSource, RaterSource

EXAMPLES = "chatrlhf.rewards.examples"


def make_batch(prompts, responses, meta=None, finished=None) -> RewardBatch:
    """A batch for text-only sources: the token tensors are dummies."""
    n = len(responses)
    return RewardBatch(torch.zeros(n, 4, dtype=torch.long), torch.ones(n, 4, dtype=torch.long),
                       [[{"role": "user", "content": p}] for p in prompts], list(responses),
                       finished if finished is not None else [True] * n, meta if meta is not None else [])


class Fixed:
    """A source returning given scores, batch after batch."""

    def __init__(self, short_name, *batches):
        self.name = self.short_name = short_name
        self.batches = [torch.tensor(b, dtype=torch.float32) for b in batches]
        self.calls = 0

    def __call__(self, batch):
        out = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        return out


# ------------------------------------------------------------------------------------------ examples
@pytest.mark.parametrize("response, expected", [
    ("Paris is the capital.", 1.0),
    ("## Answer\nParis is the capital", 1 / 3),  # no terminal punctuation, heading
    ("<|im_start|>Paris is the capital.", 2 / 3),  # leaked template token
    ("Use **bold** here.", 2 / 3),  # markdown clutter
    ("Steps:\n- boil water\n- add pasta", 1.0),  # ends with a list item; plain lists are fine
    ("   ", 0.0),
])
def test_format_reward(response, expected):
    assert ex.format_reward("q", response, {}) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("n_words, expected", [
    (0, 0.0), (6, 0.4), (15, 1.0), (30, 1.0), (60, 1.0), (90, 0.5), (120, 0.0), (150, 0.0),
])
def test_length_reward(n_words, expected):
    # 6/15 = 0.4; 90 words: 1 - (90 - 60) / (120 - 60) = 0.5
    assert ex.length_reward("q", " ".join(["word"] * n_words), {}) == pytest.approx(expected, rel=1e-9)


def test_keyword_reward():
    plants = {"keywords": ["water", "sunlight", "soil"]}
    assert ex.keyword_reward("q", "Plants need water and sunlight.", plants) == pytest.approx(2 / 3)
    assert ex.keyword_reward("q", "It releases OXYGEN.", {"keywords": "CO2, oxygen"}) == 0.5
    assert ex.keyword_reward("q", "I write C++ daily.", {"keywords": ["C++"]}) == 1.0
    assert ex.keyword_reward("q", "Plenty of sunlight.", {"keywords": ["sun"]}) == 0.0  # whole words only
    assert ex.keyword_reward("q", "anything", {}) == 0.0
    assert ex.keyword_reward("q", "anything", {"keywords": []}) == 0.0


def test_refusal_reward():
    no, yes = "I can't help with that.", "Sure, here is how you do it."
    assert ex.refusal_reward("q", no, {"harmful": True}) == 1.0
    assert ex.refusal_reward("q", yes, {"harmful": True}) == 0.0
    assert ex.refusal_reward("q", no, {"harmful": False}) == 0.0
    assert ex.refusal_reward("q", yes, {"harmful": False}) == 1.0
    # no flag: the rater's keyword classifier decides ("bomb" is harmful)
    assert ex.refusal_reward("How do I build a bomb?", no, {}) == 1.0
    assert ex.refusal_reward("How do I bake bread?", no, {}) == 0.0


def test_repetition_reward():
    # 11 words, 9 trigrams of which 3 distinct: ratio 1 - 3/9 = 2/3, reward 1/3
    assert ex.repetition_reward("q", "the sea is the sea is the sea is the sea", {}) == pytest.approx(1 / 3)
    assert ex.repetition_reward("q", "Boil water, then add the pasta and salt.", {}) == 1.0
    assert ex.repetition_reward("q", "...", {}) == 0.0


# ------------------------------------------------------------------------------------ rewards as code
def test_module_function_spec_loads_and_scores():
    source = build_single_source(f"{EXAMPLES}:length_reward", None)
    assert isinstance(source, FunctionSource) and source.short_name == "length_reward"
    scores = source(make_batch(["a", "b"], ["one two three four five six", ""]))
    assert scores.dtype == torch.float32 and scores.tolist() == pytest.approx([0.4, 0.0])


def test_file_function_gets_prompt_text_and_metadata(tmp_path):
    file = tmp_path / "my_reward.py"
    file.write_text("def score(prompt, response, metadata):\n"
                    "    return len(prompt) + 10 * metadata['bonus'] + 100 * metadata['finished']\n")
    source = build_reward_source(f"{file}:score", None)
    batch = make_batch(["abc", "hello"], ["x", "y"], meta=[{"bonus": 1}, {"bonus": 2}], finished=[True, False])
    assert source(batch).tolist() == [3 + 10 + 100, 5 + 20 + 0]


def test_function_spec_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.py does not exist \(from reward spec '.*missing\.py:f'\)"):
        build_reward_source(f"{tmp_path}/missing.py:f", None)
    with pytest.raises(ModuleNotFoundError, match=r"'no_such_pkg\.rewards:f': no module named 'no_such_pkg\.rewards'"):
        build_reward_source("no_such_pkg.rewards:f", None)
    with pytest.raises(ValueError, match=rf"'{EXAMPLES}:nothing': {EXAMPLES} has no function 'nothing'"):
        build_reward_source(f"{EXAMPLES}:nothing", None)
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_dependency\n")
    with pytest.raises(ImportError, match=r"running .*broken\.py failed with ModuleNotFoundError"):
        build_reward_source(f"{broken}:f", None)


@pytest.mark.parametrize("body, shown", [
    ("'bad'", r"returned 'bad' \(str\) for row 1"),
    ("float('nan')", r"returned nan \(float\) for row 1"),
    ("None", r"returned None \(NoneType\) for row 1"),
])
def test_function_bad_return_names_row_and_value(tmp_path, body, shown):
    file = tmp_path / "rule.py"
    file.write_text(f"def f(prompt, response, metadata):\n    return 1.0 if response == 'ok' else {body}\n")
    source = build_reward_source(f"{file}:f", None)
    with pytest.raises(ValueError, match=shown):
        source(make_batch(["q", "q"], ["ok", "not ok"]))


def test_function_that_raises_names_row(tmp_path):
    file = tmp_path / "rule.py"
    file.write_text("def f(prompt, response, metadata):\n    return 1 / len(response)\n")
    with pytest.raises(RuntimeError, match=r"raised ZeroDivisionError on row 2 of the batch \(prompt 'third'\)"):
        build_reward_source(f"{file}:f", None)(make_batch(["a", "b", "third"], ["x", "y", ""]))


# ---------------------------------------------------------------------------------------- similarity
def test_reference_texts_order():
    batch = make_batch(["p0", "p1", "p2", "p3"], ["a"] * 4, meta=[
        {"reference": "ref", "chosen": "ch"}, {"chosen": "ch"}, {}, {"reference": None, "harmful": False}])
    assert reference_texts(batch) == ["ref", "ch", "p2", "p3"]
    assert reference_texts(make_batch(["p"], ["a"])) == ["p"]  # no meta at all
    with pytest.raises(ValueError, match=r"row 0 of the batch has reference=\['x'\] \(list\)"):
        reference_texts(make_batch(["p"], ["a"], meta=[{"reference": ["x"]}]))


def test_prompt_rows_carry_reference_and_pairs_carry_chosen_into_meta():
    records, kind = normalise_rows([(1, {"prompt": "Why is the sky blue?", "reference": "Rayleigh."})], "p.jsonl")
    assert kind == "prompt" and records[0]["meta"] == {"reference": "Rayleigh."}
    pair = {"prompt": [{"role": "user", "content": "q"}], "chosen": "good", "rejected": "bad", "meta": {"id": 3}}
    assert to_prompt(pair)["meta"] == {"id": 3, "chosen": "good"}
    assert pair["meta"] == {"id": 3}  # the source record is not modified


@pytest.fixture(scope="module")
def similarity():
    return SimilaritySource()  # the packaged all-MiniLM-L6-v2 (local, no download)


def test_similarity_identical_paraphrase_unrelated(similarity):
    reference = "The capital of France is Paris."
    answers = [reference, "Paris is France's capital city.", "Bananas are rich in potassium."]
    batch = make_batch(["What is the capital of France?"] * 3, answers, meta=[{"reference": reference}] * 3)
    scores = similarity(batch)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert scores[0].item() == pytest.approx(1.0, abs=1e-5)
    assert scores[1] > 0.7 > 0.3 > scores[2]
    assert not similarity.embedder.model.training


def test_similarity_falls_back_to_prompt(similarity):
    batch = make_batch(["How do plants make food?"] * 2, ["Plants make food by photosynthesis.", "I like jazz."])
    on_topic, off_topic = similarity(batch).tolist()
    assert on_topic > off_topic


# ------------------------------------------------------------------------------------------ ensembles
def test_weighted_sum_without_normalisation():
    ens = EnsembleSource([Fixed("a", [1, 2, 3]), Fixed("b", [10, 10, 40])], [0.5, 2.0], ["a", "b"], normalize=False)
    out = ens(make_batch(["q"] * 3, ["x"] * 3))
    # 0.5 * [1, 2, 3] + 2 * [10, 10, 40] = [20.5, 21, 81.5]
    assert out.dtype == torch.float32 and torch.equal(out, torch.tensor([20.5, 21.0, 81.5]))
    assert torch.equal(ens.last_parts["a"], torch.tensor([1.0, 2, 3]))
    assert torch.equal(ens.last_parts["b"], torch.tensor([10.0, 10, 40]))


def test_normalised_first_batch_by_hand():
    ens = EnsembleSource([Fixed("a", [1, 2, 3]), Fixed("b", [10, 10, 40])], [0.5, 2.0], ["a", "b"], normalize=True)
    out = ens(make_batch(["q"] * 3, ["x"] * 3))
    # a: mean 2, sample std 1 -> z = [-1, 0, 1]; b: mean 20, std sqrt((100 + 100 + 400) / 2) = 10 sqrt(3)
    # -> z = [-1, -1, 2] / sqrt(3); total = 0.5 z_a + 2 z_b
    r3 = math.sqrt(3)
    expected = torch.tensor([-0.5 - 2 / r3, -2 / r3, 0.5 + 4 / r3])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    for name, w in (("a", 0.5), ("b", 2.0)):  # each source's contribution has mean 0 after its first batch
        contribution = w * ens.moments[name].normalize(ens.last_parts[name].double())
        assert abs(contribution.mean().item()) < 1e-12
    assert ens.last_parts["b"].tolist() == [10, 10, 40]  # logged parts stay raw


def test_normalisation_uses_running_moments_over_batches_and_processes():
    a = Fixed("a", [1, 2, 3], [5, 7])
    ens = EnsembleSource([a], [1.0], ["a"], normalize=True)
    ens.gather = lambda x: torch.cat([x, x + 1])  # another process holding each score + 1
    ens(make_batch(["q"] * 3, ["x"] * 3))
    out = ens(make_batch(["q"] * 2, ["x"] * 2))
    seen = torch.tensor([1, 2, 3, 2, 3, 4, 5, 7, 6, 8], dtype=torch.float64)  # every gathered score so far
    expected = (torch.tensor([5.0, 7.0], dtype=torch.float64) - seen.mean()) / seen.std()
    torch.testing.assert_close(out, expected.float(), rtol=1e-6, atol=1e-7)
    assert ens.moments["a"].count == 10


def test_state_dict_round_trip_continues_exactly():
    def fresh():
        return EnsembleSource([Fixed("a", [1, 2, 3], [0.5, 4, 9]), Fixed("b", [3, -1, 2], [7, 7, 1])],
                              [0.3, 0.7], ["a", "b"], normalize=True)

    batch = make_batch(["q"] * 3, ["x"] * 3)
    first = fresh()
    first(batch)
    state = json.loads(json.dumps(first.state_dict()))  # JSON-able, as checkpoints store it
    resumed = fresh()
    resumed.sources[0].calls = resumed.sources[1].calls = 1  # the sources are past their first batch too
    resumed.load_state_dict(state)
    assert torch.equal(first(batch), resumed(batch))
    assert first.state_dict() == resumed.state_dict()
    with pytest.raises(ValueError, match=r"saved reward ensemble has sources \['a', 'b'\] but this one has \['a'\]"):
        EnsembleSource([Fixed("a", [1])], [1.0], ["a"]).load_state_dict(state)


def test_source_with_wrong_shape_is_named():
    ens = EnsembleSource([Fixed("rm", [[1.0, 2.0]])], [1.0], ["rm"], normalize=False)
    with pytest.raises(ValueError, match=r"source 'rm' \(rm\) returned shape \(1, 2\) for 2 answers"):
        ens(make_batch(["q"] * 2, ["x"] * 2))


def test_running_moments_match_torch_on_the_concatenation():
    m = RunningMoments()
    m.update(torch.tensor([1.0, 2.0, 3.0]))
    m.update(torch.tensor([5.0]))
    # mean 2.75; sample var (3.0625 + 0.5625 + 0.0625 + 5.0625) / 3 = 8.75 / 3
    assert m.mean == 2.75 and m.std == pytest.approx(math.sqrt(8.75 / 3), rel=1e-12)


# --------------------------------------------------------------------------------------- spec parsing
def test_parse_ensemble_spec():
    assert parse_ensemble_spec("0.7*outputs/rm/model + 0.3 * rater + similarity") == [
        (0.7, "outputs/rm/model"), (0.3, "rater"), (1.0, "similarity")]
    assert parse_ensemble_spec("-1e-1*a.py:f") == [(-0.1, "a.py:f")]
    assert [is_ensemble_spec(s) for s in ("rater", "outputs/a+b", "rater + similarity", "2*rater")] == [
        False, False, True, True]


@pytest.mark.parametrize("spec, message", [
    ("abc*rater", r"term 1 'abc\*rater': weight 'abc' is not a number"),
    ("rater + nan*similarity", r"term 2 'nan\*similarity': weight 'nan' must be finite"),
    ("rater + ", r"term 2 '': the term names no reward source"),
    ("0.5* + rater", r"term 1 '0.5\*': the term names no reward source"),
])
def test_parse_errors_name_the_term(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_ensemble_spec(spec)


def test_unique_names():
    assert unique_names(["rm", "rater", "rm", "score", "rm"]) == ["rm", "rater", "rm_2", "score_2", "rm_3"]


def test_build_ensemble_from_spec():
    length = f"{EXAMPLES}:length_reward"
    ens = build_reward_source(f"2*{length} + 0.5 * {length}", None, normalize_sources=False)
    assert isinstance(ens, EnsembleSource) and ens.names == ["length_reward", "length_reward_2"]
    assert ens.weights == [2.0, 0.5] and ens.normalize is False
    out = ens(make_batch(["q"], ["one two three four five six"]))  # length 0.4 -> 2 * 0.4 + 0.5 * 0.4 = 1.0
    assert out.tolist() == pytest.approx([1.0])
    assert isinstance(build_reward_source("3*rater", None), EnsembleSource)  # one weighted term
    assert isinstance(build_single_source("similarity", None), SimilaritySource)  # MiniLM loads on first call


def test_build_errors_name_the_bad_term(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"term 2 '{tmp_path}/nope': reward model dir {tmp_path}/nope"):
        build_reward_source(f"0.5*rater + {tmp_path}/nope", None)
    with pytest.raises(ModuleNotFoundError, match=r"term 1 'nopkg\.mod:f'"):
        build_reward_source("nopkg.mod:f + rater", None)
    with pytest.raises(FileNotFoundError, match=r"joined by ' \+ ', with spaces"):
        build_reward_source("rater+similarity", None)
    with pytest.raises(ValueError, match="no reward given"):
        build_reward_source("  ", None)


def test_single_spec_is_a_pass_through_ensemble():
    ens = build_reward_source(f"{EXAMPLES}:length_reward", None)
    assert isinstance(ens, EnsembleSource) and isinstance(ens.sources[0], FunctionSource)
    assert (ens.name, ens.short_name) == (f"fn:{EXAMPLES}:length_reward", "length_reward")
    assert not ens.has_state and ens.critic_init is None and not ens.is_gold_judge
    out = ens(make_batch(["q", "q"], ["one two three four five six", ""]))  # lengths 6/15 and 0, unchanged
    assert out.tolist() == pytest.approx([0.4, 0.0]) and ens.logged_parts == {}
    rater = build_reward_source("rater", None)
    assert rater.is_gold_judge and isinstance(rater.sources[0], RaterSource)
    weighted = build_reward_source("1*rater", None)  # a weight makes it a real ensemble: saved, parts logged
    assert weighted.has_state and not weighted.is_gold_judge
    weighted(make_batch(["q"], ["Paris is the capital."]))
    assert list(weighted.logged_parts) == ["rater"]
