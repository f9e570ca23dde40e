"""Multi-turn episodes: the tokens trained on are the tokens the model saw, masks cover the policy's tokens
only, the trainer's log-probs over the whole conversation equal the rollout's, and every advantage
estimator treats an environment turn between policy turns as absent."""

import pytest
import torch

from chatrlhf.algorithms import gather_log_probs
from chatrlhf.algorithms.advantages import ADVANTAGE_ESTIMATORS
from chatrlhf.environments import Environment, Step
from chatrlhf.environments.episodes import render_opening, run_episodes, to_rollout, turn_ids
from chatrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
from chatrlhf.rollout import SamplingConfig, answer_logits, generate
from chatrlhf.rollout.types import cut_at_first_eos


class Echo(Environment):
    """Three turns: the user says "again" twice, then the episode ends with reward = number of replies
    containing "yes"; turn 2 also earns a per-turn reward of 0.5."""

    max_turns = 3

    def start(self, row):
        return {"yes": 0, "turn": 0}

    def step(self, state, reply):
        state["turn"] += 1
        state["yes"] += "yes" in reply
        if state["turn"] == 3:
            return Step(reward=float(state["yes"]), done=True, info={"correct": state["yes"] > 0})
        return Step(messages=[{"role": "user", "content": "again"}], reward=0.5 if state["turn"] == 2 else 0.0)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def scripted(tok, replies_per_turn):
    """A generate function answering turn k with the canonical tokens of ``replies_per_turn[k]`` (+ EOS), cut
    at the turn's ``max_new_tokens`` as a sampler would."""
    turn = {"k": 0}

    def fn(ids, mask, sampling):
        texts = replies_per_turn[turn["k"]]
        turn["k"] += 1
        rows = [(tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[: sampling.max_new_tokens]
                for t in texts[: len(ids)]]
        width = max(len(r) for r in rows)
        tokens = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
        log_probs = -torch.arange(1, width + 1, dtype=torch.float32).repeat(len(rows), 1) / 10
        return cut_at_first_eos(ids, mask, tokens, log_probs, torch.tensor([tok.eos_token_id]), tok.pad_token_id)

    return fn


def test_episode_tokens_equal_the_template_of_the_whole_conversation(tok):
    replies = [["hello world", "no"], ["yes yes", "fox"], ["good", "yes"]]
    rows = [{"prompt": [{"role": "user", "content": "say yes"}]}, {"prompt": [{"role": "user", "content": "dog"}]}]
    episodes = run_episodes(Echo(), rows, tok, scripted(tok, replies), SamplingConfig(max_new_tokens=8), tok.eos_token_id)
    for i, e in enumerate(episodes):
        full = tok.apply_chat_template(e.messages, tokenize=False)
        expected = tok(full, add_special_tokens=False)["input_ids"]
        # the template closes the last assistant turn with "<|im_end|>\n"; the episode ends at the EOS
        assert e.prompt_ids + e.ids == expected[: len(e.prompt_ids) + len(e.ids)]
        assert tok.decode(expected[len(e.prompt_ids) + len(e.ids):]) == "\n"
        assert [m["content"] for m in e.messages if m["role"] == "assistant"] == [r[i] for r in replies]
        assert e.turns == 3 and e.done and e.finished
    assert [e.score for e in episodes] == [1.0, 1.0]  # one reply with "yes" in each
    assert episodes[0].info == {"correct": True}


def test_masks_log_probs_and_turn_rewards_by_hand(tok):
    rows = [{"prompt": [{"role": "user", "content": "hi"}]}]
    (e,) = run_episodes(Echo(), rows, tok, scripted(tok, [["a"], ["b"], ["c"]]), SamplingConfig(max_new_tokens=8),
                        tok.eos_token_id)
    a, b = (tok("a", add_special_tokens=False)["input_ids"], tok("b", add_special_tokens=False)["input_ids"])
    env_turn = turn_ids(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
                        [{"role": "user", "content": "again"}], "<|im_end|>")
    assert tok.decode(env_turn) == "\n<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n"
    n1, n2 = len(a) + 1, len(b) + 1
    policy = [True] * n1 + [False] * len(env_turn) + [True] * n2
    assert e.policy[: len(policy)] == policy
    rollout, turn_rewards = to_rollout([e], tok.pad_token_id)
    assert rollout.response_mask[0].bool().tolist() == e.policy
    assert rollout.context_mask[0].tolist() == [1] * len(e.ids)
    assert rollout.attention_mask.shape[1] == len(e.prompt_ids) + len(e.ids)
    # the scripted log-probs are -0.1, -0.2, ... per turn; environment tokens get 0
    assert rollout.log_probs[0, :n1].tolist() == pytest.approx([-0.1 * k for k in range(1, n1 + 1)])
    assert (rollout.log_probs[0, n1 : n1 + len(env_turn)] == 0).all()
    # turn 2's per-turn reward 0.5 sits on its last token (its EOS)
    assert turn_rewards[0].nonzero().flatten().tolist() == [n1 + len(env_turn) + n2 - 1]
    assert turn_rewards[0].sum().item() == 0.5


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_estimators_skip_environment_turns(name):
    """Inserting environment columns (mask 0, garbage rewards and values) between the policy's tokens, and
    shifting the answers to other columns, leaves every advantage and return on the policy's tokens as it was."""
    gen = torch.Generator().manual_seed(0)
    rows, steps, k = 4, 6, 2
    rewards = torch.randn(rows, steps, generator=gen, dtype=torch.float64)
    values = torch.randn(rows, steps, generator=gen, dtype=torch.float64)
    mask = torch.ones(rows, steps)
    mask[1, 4:] = 0  # a shorter answer
    adv, ret = ADVANTAGE_ESTIMATORS[name].fn(rewards, mask, values, k, 0.9, 0.8)
    # Spread each row's steps over 12 columns: row i starts at column i, and columns 3 and 7 are gaps.
    wide_r = torch.full((rows, 12), 7.0, dtype=torch.float64)
    wide_v = torch.full((rows, 12), -3.0, dtype=torch.float64)
    wide_m = torch.zeros(rows, 12)
    cols = []
    for i in range(rows):
        c = [j for j in range(i, 12) if j not in (3, 7)][:steps]
        cols.append(c)
        wide_r[i, c], wide_v[i, c], wide_m[i, c] = rewards[i], values[i], mask[i]
    wide_adv, wide_ret = ADVANTAGE_ESTIMATORS[name].fn(wide_r, wide_m, wide_v, k, 0.9, 0.8)
    for i in range(rows):
        torch.testing.assert_close(wide_adv[i, cols[i]], adv[i], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(wide_ret[i, cols[i]], ret[i], rtol=1e-12, atol=1e-12)
    assert (wide_adv[wide_m == 0] == 0).all()


def test_trainer_log_probs_over_the_conversation_equal_the_rollouts(tok, tmp_path):
    """A real tiny Llama plays 3 sampled turns per episode through the native sampler (fp32); one training-style
    forward over the whole conversation gives each policy token the log-prob the sampler reported, to 1e-5."""
    from chatrlhf.models import load_causal_lm

    model = load_causal_lm(str(build_tiny_llama(tmp_path / "m", tie_word_embeddings=False)), dtype="float32").eval()
    # A bias on the EOS logit (about 1 in 8 tokens) so the random model ends its turns and episodes go on.
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 4.0
    model.lm_head = head
    gen = torch.Generator().manual_seed(0)

    def fn(ids, mask, sampling):
        return generate(model, ids, mask, sampling, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
                        generator=gen)

    rows = [{"prompt": [{"role": "user", "content": w}]} for w in ("hello", "the quick fox", "yes", "dog")]
    episodes = run_episodes(Echo(), rows, tok, fn, SamplingConfig(max_new_tokens=10, temperature=0.9),
                            tok.eos_token_id)
    rollout, _ = to_rollout(episodes, tok.pad_token_id)
    assert max(e.turns for e in episodes) == 3  # environment turns sit between the policy's
    with torch.no_grad():
        logits = answer_logits(model, rollout.sequences, rollout.attention_mask, rollout.response_ids.shape[1], 0.9)
    trained = gather_log_probs(logits, rollout.response_ids)
    policy = rollout.response_mask.bool()
    torch.testing.assert_close(trained[policy], rollout.log_probs[policy], rtol=0, atol=1e-5)


def test_token_budget_ends_an_episode_unfinished(tok):
    env = Echo()
    rows = [{"prompt": [{"role": "user", "content": "hi"}]}]
    _, opening = render_opening(tok, env, rows[0])
    long_reply = " ".join(["yes"] * 40)
    (e,) = run_episodes(env, rows, tok, scripted(tok, [[long_reply]] * 3), SamplingConfig(max_new_tokens=200),
                        tok.eos_token_id, max_total_tokens=len(opening) + 10)
    assert len(e.prompt_ids) + len(e.ids) == len(opening) + 10
    assert e.done and not e.finished and e.turns == 1 and e.score == 0.0


class PatientEcho(Echo):
    end_on_cut = False


def test_a_cut_reply_goes_on_when_the_environment_allows_it(tok):
    """A reply cut at the turn's limit: Echo ends the episode; PatientEcho answers it, the end-of-turn token
    entering the row as context (untrained), so the row still equals the template's rendering."""
    rows = [{"prompt": [{"role": "user", "content": "hi"}]}]
    long = " ".join(["yes"] * 20)
    (ended,) = run_episodes(Echo(), rows, tok, scripted(tok, [[long]] * 3), SamplingConfig(max_new_tokens=5),
                            tok.eos_token_id)
    assert ended.turns == 1 and ended.done and not ended.finished
    (e,) = run_episodes(PatientEcho(), rows, tok, scripted(tok, [[long]] * 3), SamplingConfig(max_new_tokens=5),
                        tok.eos_token_id)
    assert e.turns == 3 and not e.finished and e.score == 3.0  # every reply holds a "yes"
    first_eos = e.ids.index(tok.eos_token_id)
    assert first_eos == 5 and e.policy[:5] == [True] * 5 and not e.policy[5]
    full = tok(tok.apply_chat_template(e.messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert e.prompt_ids + e.ids == full[: len(e.prompt_ids) + len(e.ids)]
