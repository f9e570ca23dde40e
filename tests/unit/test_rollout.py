"""chatrlhf.rollout: sampling math by hand, and the native engine against transformers' generate and
against a training-style forward, on the tiny random Llama (pad == eos == id 2, as in SmolLM2)."""

import math

import pytest
import torch

from chatrlhf.algorithms import gather_log_probs, position_ids_from_mask
from chatrlhf.data.collate import pad_sequences
from chatrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
from chatrlhf.rollout import (
    Rollout,
    SamplingConfig,
    choose_tokens,
    decode_responses,
    generate,
    plan_groups,
    sample_from_weights,
    top_k_filter,
    top_p_filter,
)

PAD = 2  # == eos, the SmolLM2 convention
MAX_NEW = 14
# Unequal lengths, so rows are left-padded differently; the longest (row 2) is made to end first below.
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18], [20], [30, 40, 50, 60], [70, 80, 90]]
GREEDY = SamplingConfig(max_new_tokens=MAX_NEW, do_sample=False)
SAMPLED = SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.7, top_k=50, top_p=0.9)


# ---- pure sampling math ----------------------------------------------------------------------------
def test_top_k_filter_by_hand():
    """k = 2 of [1, 3, 2, 0] keeps 3 and 2; ties with the k-th value are kept ([1, 2, 2, 0] keeps three)."""
    inf = float("-inf")
    out = top_k_filter(torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 2.0, 2.0, 0.0]]), 2)
    assert out.tolist() == [[inf, 3.0, 2.0, inf], [inf, 2.0, 2.0, inf]]
    logits = torch.tensor([[1.0, 3.0]])
    assert top_k_filter(logits, 0) is logits and top_k_filter(logits, 2) is logits  # off / k >= V


def test_top_p_filter_by_hand():
    """probs [.25, .5, .125, .125]: ranked mass above each token is 0, .5, .75, .875 (for .5, .25, .125, .125).
    p = 0.7 keeps .5 and .25 (mass .75 >= .7); p = 0.4 keeps only .5; p = 0.9 keeps all but the last
    .125 ranked (mass above it .875 < .9 -> kept too: all four); p = 1 is off."""
    logits = torch.log(torch.tensor([[0.25, 0.5, 0.125, 0.125]]))
    keep = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert keep(0.7) == [True, True, False, False]
    assert keep(0.4) == [False, True, False, False]
    assert keep(0.9) == [True, True, True, True]
    assert top_p_filter(logits, 1.0) is logits
    torch.testing.assert_close(top_p_filter(logits, 0.7)[0, :2], logits[0, :2], rtol=0, atol=0)


def test_choose_tokens_greedy_by_hand():
    """logits [0, log 3]: argmax 1, log-prob log(3/4) = -0.28768207245178085 (temperature ignored)."""
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])
    tokens, logp = choose_tokens(logits, SamplingConfig(do_sample=False, temperature=5.0))
    assert tokens.tolist() == [1, 0]
    torch.testing.assert_close(logp, torch.full((2,), math.log(0.75)), rtol=1e-6, atol=0)


def test_choose_tokens_sampling_log_probs_are_unfiltered_at_temperature():
    """logits [0, log 3, -inf-ish]: at T = 0.5 the distribution is [1, 9, ~0] / 10, so a sampled token 1
    has log-prob log(0.9), token 0 log(0.1). top_k = 2 drops token 2 (never sampled) but does not
    renormalise the returned log-prob (it is the unfiltered one)."""
    logits = torch.tensor([[0.0, math.log(3.0), -30.0]]).expand(2000, 3)
    g = torch.Generator().manual_seed(0)
    tokens, logp = choose_tokens(logits, SamplingConfig(temperature=0.5, top_k=2), g)
    assert set(tokens.tolist()) == {0, 1}
    frac1 = (tokens == 1).float().mean().item()
    assert abs(frac1 - 0.9) < 0.03  # 2000 draws: std of the fraction is 0.0067
    expected = torch.where(tokens == 1, math.log(0.9), math.log(0.1))
    torch.testing.assert_close(logp, expected, rtol=1e-5, atol=1e-6)


def test_sample_from_weights_inverse_cdf_by_hand():
    """weights [1, 0, 3] -> cdf [1, 1, 4]: u * 4 < 1 -> index 0, else index 2; index 1 (weight 0) never.
    The u's are the generator's own draws, replayed from the same seed."""
    weights = torch.tensor([[1.0, 0.0, 3.0]]).expand(1000, 3)
    u = torch.rand((1000, 1), generator=torch.Generator().manual_seed(5)).squeeze(1)
    drawn = sample_from_weights(weights, torch.Generator().manual_seed(5))
    assert torch.equal(drawn, torch.where(u * 4 < 1, 0, 2))
    assert set(drawn.tolist()) == {0, 2}


def test_plan_groups_by_hand():
    """Lengths [3, 5, 4, 1], max_batch 2: longest first -> rows 1 (5), 2 (4) then 0 (3), 3 (1)."""
    groups = plan_groups(torch.tensor([3, 5, 4, 1]), 2)
    assert [g.tolist() for g in groups] == [[1, 2], [0, 3]]
    assert [g.tolist() for g in plan_groups(torch.tensor([3, 5]), None)] == [[0, 1]]
    assert [g.tolist() for g in plan_groups(torch.tensor([3, 5]), 8)] == [[0, 1]]


def test_sampling_config_validation_names_the_field():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingConfig(top_k=-1)
    SamplingConfig(temperature=0.0, do_sample=False)  # greedy ignores temperature


# ---- the engine on the tiny model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    # Untied embeddings: the tied random model only repeats its last input token (logits = E h, h ~ E x).
    path = build_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=0, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def prompts():
    return pad_sequences(PROMPTS, PAD, side="left")  # (6, 7) ids and mask


@pytest.fixture(scope="module")
def eos_ids(model, prompts):
    """EOS ids chosen so that rows end at different steps and some never do: pad/eos 2 and the tokens
    that rows 2 (the longest prompt), 0 and 4 emit 2nd, 5th and 9th in a greedy run without them."""
    ids, mask = prompts
    free = generate(model, ids, mask, GREEDY, eos_token_ids=[PAD], pad_token_id=PAD)
    return sorted({PAD, *(int(free.response_ids[row, t]) for row, t in ((2, 1), (0, 4), (4, 8)))})


def _assert_same(a: Rollout, b: Rollout, atol=1e-6):
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(a.finished, b.finished)
    torch.testing.assert_close(a.log_probs, b.log_probs, rtol=1e-5, atol=atol)


def _assert_well_formed(r: Rollout, eos_ids, max_new):
    eos = torch.tensor(eos_ids)
    for i in range(len(r)):
        n = int(r.response_lengths[i])
        resp = r.response_ids[i]
        assert r.response_mask[i, :n].all() and not r.response_mask[i, n:].any()
        assert (resp[n:] == PAD).all() and (r.log_probs[i, n:] == 0).all()
        body_has_eos = torch.isin(resp[: n - 1], eos).any()
        assert not body_has_eos  # nothing after the first EOS belongs to the response
        if r.finished[i]:
            assert int(resp[n - 1]) in eos_ids  # the EOS is inside the mask
        else:
            assert n == max_new and not torch.isin(resp[:n], eos).any()
    assert (r.log_probs[r.response_mask.bool()] < 0).all()


def _training_log_probs(model, r: Rollout, temperature: float) -> torch.Tensor:
    """What a PPO update recomputes: full forward over prompt + response, positions from the mask."""
    mask = r.attention_mask
    with torch.no_grad():
        logits = model(input_ids=r.sequences, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    p = r.prompt_ids.shape[1]
    logits = logits[:, p - 1:-1] / temperature  # position t predicts token t + 1
    return gather_log_probs(logits, r.response_ids) * r.response_mask


def test_greedy_native_equals_hf_generate(model, prompts, eos_ids):
    ids, mask = prompts
    native = generate(model, ids, mask, GREEDY, eos_token_ids=eos_ids, pad_token_id=PAD)
    hf = generate(model, ids, mask, GREEDY, eos_token_ids=eos_ids, pad_token_id=PAD, backend="hf")
    # The setup must exercise both endings, and the longest prompt must end early (column trimming).
    assert native.finished.any() and not native.finished.all()
    assert native.finished[2] and native.response_lengths[2] <= 2
    assert int(native.response_lengths.min()) < MAX_NEW == int(native.response_lengths.max())
    _assert_same(native, hf)
    _assert_well_formed(native, eos_ids, MAX_NEW)
    assert torch.equal(native.prompt_ids, ids) and torch.equal(native.prompt_mask, mask)


@pytest.mark.parametrize("backend", ["native", "hf"])
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_log_probs_equal_training_forward(model, prompts, eos_ids, backend, sampling):
    ids, mask = prompts
    g = torch.Generator().manual_seed(1)
    r = generate(model, ids, mask, sampling, eos_token_ids=eos_ids, pad_token_id=PAD, backend=backend, generator=g)
    _assert_well_formed(r, eos_ids, MAX_NEW)
    expected = _training_log_probs(model, r, sampling.logprob_temperature)
    torch.testing.assert_close(r.log_probs, expected, rtol=1e-5, atol=1e-5)


def test_plain_dynamic_cache_path_equals_hf(model, prompts, eos_ids, monkeypatch):
    """Layers the engine does not preallocate (e.g. sliding-window ones) keep transformers' own cache
    classes and are compacted with its batch_select_indices: force that path for every layer."""
    from transformers import DynamicCache

    import chatrlhf.rollout.sampler as sampler

    monkeypatch.setattr(sampler, "make_cache", lambda config, capacity: (DynamicCache(config=config), False))
    ids, mask = prompts
    native = generate(model, ids, mask, GREEDY, eos_token_ids=eos_ids, pad_token_id=PAD)
    hf = generate(model, ids, mask, GREEDY, eos_token_ids=eos_ids, pad_token_id=PAD, backend="hf")
    assert native.finished.any() and not native.finished.all()
    _assert_same(native, hf)


@pytest.mark.parametrize("backend", ["native", "hf"])
def test_seeded_generator_reproduces_and_seeds_differ(model, prompts, eos_ids, backend):
    ids, mask = prompts
    run = lambda seed: generate(model, ids, mask, SAMPLED, eos_token_ids=eos_ids, pad_token_id=PAD,  # noqa: E731
                                backend=backend, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(7), run(7), run(8)
    _assert_same(a, b, atol=0)
    assert not torch.equal(a.response_ids, c.response_ids)


def test_global_rng_untouched_by_hf_backend(model, prompts, eos_ids):
    ids, mask = prompts
    torch.manual_seed(123)
    before = torch.get_rng_state()
    generate(model, ids, mask, SAMPLED, eos_token_ids=eos_ids, pad_token_id=PAD, backend="hf",
             generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), before)


def test_top_k_1_equals_greedy(model, prompts, eos_ids):
    ids, mask = prompts
    greedy = generate(model, ids, mask, GREEDY, eos_token_ids=eos_ids, pad_token_id=PAD)
    top1 = generate(model, ids, mask, SamplingConfig(max_new_tokens=MAX_NEW, top_k=1), eos_token_ids=eos_ids,
                    pad_token_id=PAD, generator=torch.Generator().manual_seed(3))
    _assert_same(greedy, top1)


def test_max_batch_keeps_order_and_equals_one_batch(model, prompts, eos_ids):
    ids, mask = prompts
    whole = generate(model, ids, mask, GREEDY, eos_token_ids=eos_ids, pad_token_id=PAD)
    for max_batch in (1, 2, 4):
        split = generate(model, ids, mask, GREEDY, eos_token_ids=eos_ids, pad_token_id=PAD, max_batch=max_batch)
        _assert_same(whole, split)
        assert torch.equal(split.prompt_ids, ids)


class _ForwardLog:
    """Forward hook recording (batch rows, input length, logits_to_keep) of every model call."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs, output):
        self.calls.append((kwargs["input_ids"].shape[0], kwargs["input_ids"].shape[1], kwargs.get("logits_to_keep")))


def test_finished_rows_leave_the_batch(model, prompts, eos_ids):
    ids, mask = prompts
    log = _ForwardLog(model)
    try:
        r = generate(model, ids, mask, GREEDY, eos_token_ids=eos_ids, pad_token_id=PAD)
    finally:
        log.handle.remove()
    # Prefill: all rows, the prompt width, last-position logits only.
    assert log.calls[0] == (6, ids.shape[1], 1)
    # Decode step t (t = 1..) runs the rows still live after t tokens: exactly the rows whose response is longer.
    lengths = r.response_lengths
    expected = [(int((lengths > t).sum()), 1) for t in range(1, int(lengths.max()))]
    assert [(b, n) for b, n, _ in log.calls[1:]] == expected
    assert expected[-1][0] < 6  # some row was really dropped


def test_sync_lock_step_runs_dummy_forwards_until_all_done(model, prompts, eos_ids):
    """A fake peer that needs 3 more steps: this rank calls sync once per forward, runs three 1-row dummy
    forwards after its own work, and its rollout is unchanged."""
    ids, mask = prompts
    expected = generate(model, ids, mask, GREEDY, eos_token_ids=eos_ids, pad_token_id=PAD, max_batch=4)
    answers = []

    def sync(this_rank_done: bool) -> bool:
        answers.append(this_rank_done)
        return this_rank_done and answers.count(True) > 3

    log = _ForwardLog(model)
    try:
        r = generate(model, ids, mask, GREEDY, eos_token_ids=eos_ids, pad_token_id=PAD, max_batch=4, sync=sync)
    finally:
        log.handle.remove()
    _assert_same(expected, r)
    assert len(answers) == len(log.calls) + 1  # one call per forward, plus the one that ends the loop
    assert answers == [False] * (len(log.calls) - 3) + [True] * 4
    assert [c[:2] for c in log.calls[-3:]] == [(1, 1)] * 3


@pytest.mark.parametrize("backend", ["native", "hf"])
@pytest.mark.parametrize("train_mode", [False, True])
def test_model_mode_and_weights_untouched(model, prompts, eos_ids, backend, train_mode):
    ids, mask = prompts
    model.train(train_mode)
    before = [p.detach().clone() for p in model.parameters()]
    try:
        generate(model, ids, mask, SAMPLED, eos_token_ids=eos_ids, pad_token_id=PAD, backend=backend,
                 generator=torch.Generator().manual_seed(0))
        assert all(m.training == train_mode for m in model.modules())
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    finally:
        model.eval()


def test_rollout_tensors_and_decode(model, prompts, eos_ids):
    ids, mask = prompts
    r = generate(model, ids, mask, GREEDY, eos_token_ids=eos_ids, pad_token_id=PAD)
    assert r.sequences.shape == (6, ids.shape[1] + int(r.response_lengths.max()))
    assert torch.equal(r.attention_mask.sum(-1), mask.sum(-1) + r.response_lengths)
    assert r.response_ids.dtype == torch.long and r.log_probs.dtype == torch.float32
    tok = build_tiny_tokenizer()
    texts = decode_responses(tok, r)
    for i, text in enumerate(texts):
        n = int(r.response_lengths[i])
        assert text == tok.decode(r.response_ids[i, :n], skip_special_tokens=True).strip()
        assert "<|im_end|>" not in text


def test_zero_new_tokens_and_bad_inputs(model, prompts):
    ids, mask = prompts
    for backend in ("native", "hf"):
        r = generate(model, ids, mask, SamplingConfig(max_new_tokens=0), eos_token_ids=[PAD], pad_token_id=PAD,
                     backend=backend)
        assert r.response_ids.shape == (6, 0) and not r.finished.any()
        empty = generate(model, ids[:0], mask[:0], GREEDY, eos_token_ids=[PAD], pad_token_id=PAD, backend=backend)
        assert empty.response_ids.shape == (0, 0) and empty.prompt_ids.shape == (0, ids.shape[1])
    right_padded, right_mask = pad_sequences(PROMPTS, PAD, side="right")
    with pytest.raises(ValueError, match="left"):
        generate(model, right_padded, right_mask, GREEDY, eos_token_ids=[PAD], pad_token_id=PAD)
    with pytest.raises(ValueError, match="backend"):
        generate(model, ids, mask, GREEDY, eos_token_ids=[PAD], pad_token_id=PAD, backend="vllm")


# ---- the accelerator decode policy, run on the CPU ---------------------------------------------------
@pytest.fixture
def accelerator_policy(monkeypatch):
    """Makes the CPU decode as on CUDA: looks at ended rows every 3rd step, host-decided SDPA masks."""
    import chatrlhf.rollout.sampler as sampler

    policy = sampler.DecodePolicy(check_every=3, host_mask=True)
    monkeypatch.setattr(sampler, "decode_policy", lambda device: policy)
    return policy


def test_accelerator_policy_greedy_equals_hf_and_drops_rows_at_looks(model, prompts, eos_ids, accelerator_policy):
    """Rows that ended stay in the batch until the next look (every 3rd token); what they sample after
    their EOS is discarded, so the rollout equals transformers' (and the every-step policy's)."""
    ids, mask = prompts
    log = _ForwardLog(model)
    masks = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: masks.append(kw["attention_mask"]), with_kwargs=True)
    try:
        r = generate(model, ids, mask, GREEDY, eos_token_ids=eos_ids, pad_token_id=PAD)
    finally:
        log.handle.remove()
        hook.remove()
    hf = generate(model, ids, mask, GREEDY, eos_token_ids=eos_ids, pad_token_id=PAD, backend="hf")
    _assert_same(r, hf)
    _assert_well_formed(r, eos_ids, MAX_NEW)
    # Decode step t runs the rows live at the last look (t rounded down to a multiple of 3; none yet: all 6).
    lengths, k = r.response_lengths, accelerator_policy.check_every
    expected = [int((lengths > t // k * k).sum()) for t in range(1, int(lengths.max()))]
    assert [b for b, _, _ in log.calls[1:]] == expected and expected[-1] < expected[0]
    assert masks[0].ndim == 2 and all(m.ndim == 4 and m.dtype == torch.bool for m in masks[1:])  # padded rows


def test_accelerator_policy_without_padding_passes_no_mask(model, eos_ids, accelerator_policy):
    """Prompts of one length: no padding column, so decode forwards get no mask (what transformers' own
    check concludes from an all-ones mask), and the rollout still equals transformers'."""
    ids, mask = pad_sequences([[5, 6, 7], [10, 11, 12], [30, 40, 50]], PAD, side="left")
    masks = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: masks.append(kw["attention_mask"]), with_kwargs=True)
    try:
        r = generate(model, ids, mask, GREEDY, eos_token_ids=eos_ids, pad_token_id=PAD)
    finally:
        hook.remove()
    _assert_same(r, generate(model, ids, mask, GREEDY, eos_token_ids=eos_ids, pad_token_id=PAD, backend="hf"))
    assert len(masks) > 2 and all(m is None for m in masks[1:])


def test_accelerator_policy_sampled_rollout_is_well_formed(model, prompts, eos_ids, accelerator_policy):
    """Sampling with ended rows kept in the batch: responses stop at their first EOS, padding after it,
    and the log-probs are those a training forward recomputes."""
    ids, mask = prompts
    r = generate(model, ids, mask, SAMPLED, eos_token_ids=eos_ids, pad_token_id=PAD,
                 generator=torch.Generator().manual_seed(1))
    _assert_well_formed(r, eos_ids, MAX_NEW)
    assert r.finished.any()
    expected = _training_log_probs(model, r, SAMPLED.logprob_temperature)
    torch.testing.assert_close(r.log_probs, expected, rtol=1e-5, atol=1e-5)
    for max_batch in (1, 4):  # sub-batches: one look schedule each
        split = generate(model, ids, mask, GREEDY, eos_token_ids=eos_ids, pad_token_id=PAD, max_batch=max_batch)
        _assert_same(split, generate(model, ids, mask, GREEDY, eos_token_ids=eos_ids, pad_token_id=PAD))


# ---- streaming: on_step -----------------------------------------------------------------------------
class _Watch:
    """An ``on_step`` that records every tensor it is handed and asks to stop after ``stop_after`` steps."""

    def __init__(self, stop_after: int | None = None):
        self.seen, self.stop_after = [], stop_after

    def __call__(self, tokens: torch.Tensor) -> bool:
        self.seen.append(tokens.clone())
        return self.stop_after is not None and len(self.seen) >= self.stop_after


@pytest.mark.parametrize("backend", ["native", "hf"])
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_on_step_sees_every_token_and_changes_nothing(model, prompts, eos_ids, backend, sampling):
    """A watcher that never stops: the same rollout as without it (sampled too, same seed), and step t hands
    it (6, t) tokens whose rows agree with the final responses up to each row's end."""
    ids, mask = prompts
    run = lambda **kw: generate(model, ids, mask, sampling, eos_token_ids=eos_ids, pad_token_id=PAD,  # noqa: E731
                                backend=backend, generator=torch.Generator().manual_seed(5), **kw)
    watch = _Watch()
    plain, watched = run(), run(on_step=watch)
    _assert_same(plain, watched, atol=0)
    assert [t.shape for t in watch.seen] == [(6, t) for t in range(1, len(watch.seen) + 1)]
    assert len(watch.seen) == int(plain.response_lengths.max())
    for row, n in enumerate(plain.response_lengths.tolist()):
        assert torch.equal(watch.seen[-1][row, :n], plain.response_ids[row, :n])


@pytest.mark.parametrize("backend", ["native", "hf"])
def test_on_step_stop_cuts_unfinished_rows(model, prompts, eos_ids, backend):
    """Stopping after 3 steps: each row is the first 3 tokens of the unstopped greedy run (or ends earlier at
    its EOS, finished); rows cut there are finished False; log-probs equal the unstopped run's."""
    ids, mask = prompts
    full = generate(model, ids, mask, GREEDY, eos_token_ids=eos_ids, pad_token_id=PAD, backend=backend)
    watch = _Watch(stop_after=3)
    cut = generate(model, ids, mask, GREEDY, eos_token_ids=eos_ids, pad_token_id=PAD, backend=backend,
                   on_step=watch)
    assert len(watch.seen) == 3
    expected_lengths = full.response_lengths.clamp(max=3)
    assert torch.equal(cut.response_lengths, expected_lengths)
    assert torch.equal(cut.finished, full.finished & (full.response_lengths <= 3))
    assert not cut.finished.all()
    for row, n in enumerate(expected_lengths.tolist()):
        assert torch.equal(cut.response_ids[row, :n], full.response_ids[row, :n])
        torch.testing.assert_close(cut.log_probs[row, :n], full.log_probs[row, :n], rtol=1e-5, atol=1e-6)


def test_on_step_stop_leaves_later_sub_batches_empty(model, prompts, eos_ids):
    """With max_batch 2 the prompts run as three sub-batches; a stop in the first gives the other four rows
    empty, unfinished responses (nothing more is generated: on_step is called exactly twice)."""
    ids, mask = prompts
    watch = _Watch(stop_after=2)
    r = generate(model, ids, mask, GREEDY, eos_token_ids=eos_ids, pad_token_id=PAD, max_batch=2, on_step=watch)
    first = plan_groups(mask.sum(-1), 2)[0].tolist()
    assert len(watch.seen) == 2 and watch.seen[-1].shape == (2, 2)
    assert all(int(r.response_lengths[row]) == 0 and not r.finished[row] for row in range(6) if row not in first)
    assert all(1 <= int(r.response_lengths[row]) <= 2 for row in first)
