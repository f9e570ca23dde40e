"""The native engine on CUDA: greedy rollouts equal transformers' generate in fp32 and bf16, under both decode
policies, and the accelerator policy reads the device once per look instead of every step."""

import warnings

import pytest
import torch

import chatrlhf.rollout.sampler as sampler
from chatrlhf.algorithms import position_ids_from_mask
from chatrlhf.data.collate import pad_sequences
from chatrlhf.rollout import SamplingConfig, generate

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="needs a CUDA device (bench/gpu_check.sh on the GPU machine)")]

PAD = 2  # == eos, as in SmolLM2
MAX_NEW = 24
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18], [20], [30, 40, 50, 60], [70, 80, 90],
           [100, 101, 102, 103, 104, 105], [200, 201, 202]]
GREEDY = SamplingConfig(max_new_tokens=MAX_NEW, do_sample=False)
LOGIT_SCALE = 20.0
"""The LM head is scaled by this, so the random model's logits spread over a few units (std ~2) instead of
~0.1: a greedy path then has few near ties, which bf16 rounding could flip either way."""
TIE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
"""A greedy divergence is accepted only where the two tokens' logits (reference forward, same dtype) differ
by at most this times the logits' std: a tie within the dtype's rounding. bf16 keeps 8 mantissa bits (relative
step 2^-8 = 0.4%) and two layers of bf16 matmuls accumulate a few of those steps."""
LOG_PROB_ATOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
"""Log-probs of equal responses: fp32 differs only by summation order (the batch composition differs: native
drops finished rows); bf16 logits carry ~3 significant digits, log-probs of logits ~2 in size a few 1e-2."""
POLICIES = {"every-step": sampler.CPU_POLICY, "accelerator": sampler.ACCELERATOR_POLICY}


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def model(request, tiny_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    with torch.no_grad():
        m.lm_head.weight.mul_(LOGIT_SCALE)
    return m.to(device="cuda", dtype=request.param).eval()


@pytest.fixture(scope="module")
def prompts():
    ids, mask = pad_sequences(PROMPTS, PAD, side="left")
    return ids.cuda(), mask.cuda()


@pytest.fixture(scope="module")
def eos_ids(model, prompts):
    """pad/eos plus the tokens rows 2, 0 and 4 emit 2nd, 5th and 9th without them: rows end at different
    steps (the longest prompt first) and some never do."""
    free = generate(model, *prompts, GREEDY, eos_token_ids=[PAD], pad_token_id=PAD, backend="hf")
    return sorted({PAD, *(int(free.response_ids[row, t]) for row, t in ((2, 1), (0, 4), (4, 8)))})


def _margin(model, prompt_ids, prompt_mask, prefix, a: int, b: int) -> tuple[float, float]:
    """(|logit a - logit b|, std of the logits) after ``prefix`` in one row: a full reference forward."""
    ids = torch.cat([prompt_ids, prefix])[None]
    mask = torch.cat([prompt_mask, torch.ones_like(prefix)])[None]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[0, -1]
    logits = logits.float()
    return float((logits[a] - logits[b]).abs()), float(logits.std())


def assert_greedy_agrees(model, native, hf, dtype) -> int:
    """Rows equal token for token, except where a divergence starts at a tie within ``TIE[dtype]``;
    log-probs of equal rows within ``LOG_PROB_ATOL``. Returns the number of rows that are equal."""
    equal = 0
    for row in range(len(native)):
        n, h = int(native.response_lengths[row]), int(hf.response_lengths[row])
        a, b = native.response_ids[row, :n], hf.response_ids[row, :h]
        if n == h and torch.equal(a, b):
            equal += 1
            torch.testing.assert_close(native.log_probs[row, :n], hf.log_probs[row, :n], rtol=0,
                                       atol=LOG_PROB_ATOL[dtype])
            continue
        differ = (a[:min(n, h)] != b[:min(n, h)]).nonzero()  # (k, 1)
        # Equal tokens up to the shorter one would mean equal lengths too (same EOS ids, same max_new_tokens).
        assert len(differ), f"row {row}: one response is a prefix of the other ({n} vs {h} tokens)"
        t = int(differ[0, 0])
        margin, scale = _margin(model, native.prompt_ids[row], native.prompt_mask[row], a[:t], int(a[t]), int(b[t]))
        assert margin <= TIE[dtype] * scale, (f"row {row} diverges at token {t} ({int(a[t])} vs {int(b[t])}) where "
                                              f"the logits differ by {margin:.4g} (std {scale:.3g}): not a tie")
    return equal


@pytest.mark.parametrize("policy", list(POLICIES))
def test_greedy_native_equals_hf_generate_on_cuda(model, prompts, eos_ids, policy, monkeypatch):
    monkeypatch.setattr(sampler, "decode_policy", lambda device: POLICIES[policy])
    dtype = next(model.parameters()).dtype
    native = generate(model, *prompts, GREEDY, eos_token_ids=eos_ids, pad_token_id=PAD)
    hf = generate(model, *prompts, GREEDY, eos_token_ids=eos_ids, pad_token_id=PAD, backend="hf")
    assert native.finished.any() and not native.finished.all()  # both endings, rows dropped mid-way
    equal = assert_greedy_agrees(model, native, hf, dtype)
    print(f"{dtype} {policy}: {equal}/{len(native)} rows equal token for token")
    assert equal >= len(native) // 2  # ties are rare at LOGIT_SCALE: most rows must be compared in full


def _syncs(model, prompts, max_new: int, eos: int) -> int:
    """Device->host synchronisations during one greedy generate (torch's sync debug mode warns on each)."""
    sampling = SamplingConfig(max_new_tokens=max_new, do_sample=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            generate(model, *prompts, sampling, eos_token_ids=[eos], pad_token_id=PAD)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def test_accelerator_policy_reads_the_device_once_per_look(model, prompts, monkeypatch):
    """16 more decode steps (no row ever ends: the EOS id is outside the vocabulary) cost the every-step loop
    at least 16 more host syncs (its own look, and transformers' mask.all() check), the accelerator policy
    2 (its looks every 8 steps) and nothing per step."""
    eos = model.config.vocab_size
    extra = {}
    for name, policy in POLICIES.items():
        monkeypatch.setattr(sampler, "decode_policy", lambda device, p=policy: p)
        generate(model, *prompts, GREEDY, eos_token_ids=[eos], pad_token_id=PAD)  # warm-up
        extra[name] = _syncs(model, prompts, 33, eos) - _syncs(model, prompts, 17, eos)
    print(f"host syncs per 16 extra decode steps: {extra}")
    assert extra["every-step"] >= 16, extra
    assert extra["accelerator"] <= 16 // sampler.ACCELERATOR_POLICY.check_every, extra
