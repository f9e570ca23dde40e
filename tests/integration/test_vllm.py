"""The vLLM backend (chatrlhf.rollout.vllm_engine) against the native engine and a training forward, on tiny
random Llamas (head_dim 32: vLLM's CPU attention has no kernel for the default tiny model's 16).

Without vllm the engine tests skip, unless CHATRLHF_REQUIRE_VLLM=1 (CI), where they fail. The first tests
(the missing-vllm error, host-state restore) need no vllm and always run.
"""

import os
import random
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

from chatrlhf.algorithms import gather_log_probs
from chatrlhf.data.collate import pad_sequences
from chatrlhf.models.tiny import build_tiny_llama
from chatrlhf.rollout import Rollout, SamplingConfig, answer_logits, generate
from chatrlhf.rollout import vllm_engine as ve
from chatrlhf.rollout.host_state import HostState, get_mempolicy, set_mempolicy

pytestmark = pytest.mark.vllm

PAD = 2  # == eos, the SmolLM2 convention
MAX_NEW = 14
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18], [20], [30, 40, 50, 60], [70, 80, 90]]
GREEDY = SamplingConfig(max_new_tokens=MAX_NEW, do_sample=False)
SAMPLED = SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.7, top_k=50, top_p=0.9)
HOT = SamplingConfig(max_new_tokens=MAX_NEW, temperature=1.3)  # no filter: vLLM's own processed log-probs
TINY = {"num_attention_heads": 2, "num_key_value_heads": 1}  # head_dim 64 / 2 = 32


def _tiny(path, **overrides):
    return build_tiny_llama(path, seed=0, **TINY, **overrides)


# ---- without vllm ---------------------------------------------------------------------------------------
def test_missing_vllm_names_the_install_command(tmp_path, monkeypatch):
    path = str(_tiny(tmp_path))
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    env = dict(os.environ)
    with pytest.raises(ImportError) as err:
        ve.VLLMEngine(path, dtype="float32", max_model_len=64)
    assert isinstance(err.value, ve.VLLMNotInstalled)
    message = str(err.value)
    assert ve.INSTALL_HINT == "bash scripts/install.sh --vllm" and ve.INSTALL_HINT in message
    assert "\n" not in message
    assert dict(os.environ) == env  # the engine's env switches are gone again


def test_importing_the_backend_does_not_import_vllm():
    code = "import sys, chatrlhf.rollout.vllm_engine; assert 'vllm' not in sys.modules, 'vllm was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _same_state(a: HostState, b: HostState) -> None:
    assert a.env == b.env
    assert (a.num_threads, a.set_num_threads, a.default_dtype) == (b.num_threads, b.set_num_threads, b.default_dtype)
    assert torch.equal(a.torch_rng, b.torch_rng)
    assert all(np.array_equal(x, y) for x, y in zip(a.numpy_rng, b.numpy_rng))
    assert a.python_rng == b.python_rng
    assert a.excepthook is b.excepthook and a.mempolicy == b.mempolicy


def test_host_state_restore_undoes_each_change(monkeypatch):
    """Every change an in-process vLLM was seen to make, made by hand here, is undone by restore()."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("CHATRLHF_TEST_CHANGED", "before")  # monkeypatch removes it at the end
    state = HostState.capture()
    os.environ["CHATRLHF_TEST_CHANGED"] = "after"
    os.environ["CHATRLHF_TEST_ADDED2"] = "1"
    torch.set_num_threads(threads + 1)
    torch.set_num_threads = lambda n: None
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    sys.excepthook = lambda *a: None
    if state.mempolicy is not None:
        set_mempolicy((2, (1,) + (0,) * 15))  # MPOL_BIND to node 0, as vLLM's CPU worker does
        assert get_mempolicy()[0] == 2
    state.restore()
    _same_state(state, HostState.capture())
    assert "CHATRLHF_TEST_ADDED2" not in os.environ and torch.get_num_threads() == threads


# ---- the engine ----------------------------------------------------------------------------------------
def _require_vllm() -> None:
    if ve.vllm_available():
        return
    if os.environ.get("CHATRLHF_REQUIRE_VLLM") == "1":
        pytest.fail(f"CHATRLHF_REQUIRE_VLLM=1 but vllm is not installed: run {ve.INSTALL_HINT}", pytrace=False)
    pytest.skip(f"vllm is not installed ({ve.INSTALL_HINT})")


def _build(path, **kwargs):
    from transformers import AutoModelForCausalLM

    _require_vllm()
    before = HostState.capture()
    engine = ve.VLLMEngine(str(path), dtype="float32", max_model_len=64, kv_cache_gb=0.05, **kwargs)
    after = HostState.capture()
    return engine, AutoModelForCausalLM.from_pretrained(path).eval(), (before, after)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # Untied embeddings: the tied random model only repeats its last input token.
    return _tiny(tmp_path_factory.mktemp("vllm_tiny"), tie_word_embeddings=False)


@pytest.fixture(scope="module")
def built(tiny_dir):
    engine, model, states = _build(tiny_dir)
    yield engine, model, states
    engine.close()


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A second engine, alive beside the first: a tied model, where vLLM's reload leaves the LM head stale."""
    engine, model, _ = _build(_tiny(tmp_path_factory.mktemp("vllm_tied")))
    yield engine, model
    engine.close()


@pytest.fixture(scope="module")
def prompts():
    return pad_sequences(PROMPTS, PAD, side="left")  # (6, 7) ids and mask


@pytest.fixture(scope="module")
def eos_ids(built, prompts):
    """pad/eos 2 and the tokens rows 2, 0 and 4 emit 2nd, 5th and 9th in a greedy run without them, so rows
    end at different steps on different EOS ids and some never do."""
    ids, mask = prompts
    free = generate(built[1], ids, mask, GREEDY, eos_token_ids=[PAD], pad_token_id=PAD)
    return sorted({PAD, *(int(free.response_ids[row, t]) for row, t in ((2, 1), (0, 4), (4, 8)))})


def _native(model, prompts, sampling, eos):
    return generate(model, *prompts, sampling, eos_token_ids=eos, pad_token_id=PAD)


def _assert_same(a: Rollout, b: Rollout, atol=1e-4):
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.response_mask, b.response_mask) and torch.equal(a.finished, b.finished)
    torch.testing.assert_close(a.log_probs, b.log_probs, rtol=0, atol=atol)


def test_greedy_equals_native(built, prompts, eos_ids):
    engine, model, _ = built
    rollout = engine.generate(*prompts, GREEDY, eos_token_ids=eos_ids, pad_token_id=PAD)
    native = _native(model, prompts, GREEDY, eos_ids)
    assert native.finished.any() and not native.finished.all()  # both endings exercised
    _assert_same(rollout, native)  # fp32, different kernels: log-probs to 1e-4
    assert torch.equal(rollout.prompt_ids, prompts[0]) and torch.equal(rollout.prompt_mask, prompts[1])


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED, HOT], ids=["greedy", "top-k-top-p", "T1.3"])
def test_log_probs_equal_training_forward(built, prompts, eos_ids, sampling):
    """Rollout.log_probs = log_softmax(logits / T) of the unfiltered logits at each sampled token, as the
    trainer recomputes them (answer_logits + gather_log_probs); fp32, within 1e-4."""
    engine, model, _ = built
    rollout = engine.generate(*prompts, sampling, eos_token_ids=eos_ids, pad_token_id=PAD,
                              generator=torch.Generator().manual_seed(1))
    width = rollout.response_ids.shape[1]
    with torch.no_grad():
        logits = answer_logits(model, rollout.sequences, rollout.attention_mask, width, sampling.logprob_temperature)
    expected = gather_log_probs(logits, rollout.response_ids) * rollout.response_mask
    torch.testing.assert_close(rollout.log_probs, expected, rtol=0, atol=1e-4)
    assert (rollout.log_probs[rollout.response_mask.bool()] < 0).all()


def test_seeded_generator_reproduces_and_advances(built, prompts, eos_ids):
    engine = built[0]
    run = lambda g: engine.generate(*prompts, SAMPLED, eos_token_ids=eos_ids, pad_token_id=PAD,  # noqa: E731
                                    generator=g)
    first, again = run(torch.Generator().manual_seed(7)), run(torch.Generator().manual_seed(7))
    _assert_same(first, again, atol=0)
    shared = torch.Generator().manual_seed(7)
    one, two = run(shared), run(shared)
    assert torch.equal(one.response_ids, first.response_ids) and not torch.equal(two.response_ids, one.response_ids)
    assert not torch.equal(run(torch.Generator().manual_seed(8)).response_ids, first.response_ids)


@pytest.mark.parametrize("with_tokenizer_eos", [True, False], ids=["with-eos-2", "without-eos-2"])
def test_every_eos_id_stops(built, prompts, eos_ids, with_tokenizer_eos):
    """Any listed id ends a response and is its last token inside the mask; an id not listed -- the
    tokenizer's own EOS included -- does not (vLLM stops on that one unless told to ignore it)."""
    engine, model, _ = built
    eos = eos_ids if with_tokenizer_eos else [t for t in eos_ids if t != PAD]
    rollout = engine.generate(*prompts, GREEDY, eos_token_ids=eos, pad_token_id=PAD)
    _assert_same(rollout, _native(model, prompts, GREEDY, eos))
    lengths = rollout.response_lengths
    last = rollout.response_ids[torch.arange(len(rollout)), (lengths - 1).clamp_min(0)]
    assert len({int(t) for t, done in zip(last, rollout.finished) if done}) >= 2  # rows end on different ids
    for row in range(len(rollout)):
        body = rollout.response_ids[row, : int(lengths[row]) - 1]
        assert not torch.isin(body, torch.tensor(eos)).any()
        assert bool(rollout.finished[row]) == (int(last[row]) in eos)


def test_weight_push_takes_effect(tied, prompts):
    """After a push, greedy output is the native engine's on the new weights (tied embeddings: vLLM's
    reload alone leaves the LM head's packed copy stale); pushing the old weights back restores it."""
    engine, model = tied
    original = {k: v.clone() for k, v in model.state_dict().items()}
    before = engine.generate(*prompts, GREEDY, eos_token_ids=[PAD], pad_token_id=PAD)
    _assert_same(before, _native(model, prompts, GREEDY, [PAD]))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    try:
        engine.push_weights(model.state_dict().items())
        after = engine.generate(*prompts, GREEDY, eos_token_ids=[PAD], pad_token_id=PAD)
        _assert_same(after, _native(model, prompts, GREEDY, [PAD]))
        assert not torch.equal(after.response_ids, before.response_ids)
    finally:
        model.load_state_dict(original)
        engine.push_weights(model.state_dict().items())
    _assert_same(engine.generate(*prompts, GREEDY, eos_token_ids=[PAD], pad_token_id=PAD), before, atol=0)


def test_bad_pushes_raise_and_leave_the_policy(tied, prompts, monkeypatch):
    engine, model = tied
    state = model.state_dict()
    before = engine.generate(*prompts, GREEDY, eos_token_ids=[PAD], pad_token_id=PAD)
    bad = {
        "unknown name": [*state.items(), ("model.layers.9.mlp.up_proj.weight", state["model.norm.weight"])],
        "wrong shape": [(k, v[:-1] if k == "model.norm.weight" else v) for k, v in state.items()],
        "tensors missing": [(k, v) for k, v in state.items() if "layers.1.mlp" not in k],
    }
    for what, named in bad.items():
        with pytest.raises(ValueError, match=what):
            engine.push_weights(named)
    # A reload that leaves a module computing with old weights is caught after loading (here: the tied LM
    # head's packed copy, when the repair step is skipped).
    monkeypatch.setattr(ve, "repack_shared", lambda model: 0)
    changed = [(k, v * 2 if "embed_tokens" in k else v) for k, v in state.items()]
    with pytest.raises(RuntimeError, match="lm_head.*stale policy"):
        engine.push_weights(changed)
    monkeypatch.undo()
    engine.push_weights(state.items())
    _assert_same(engine.generate(*prompts, GREEDY, eos_token_ids=[PAD], pad_token_id=PAD), before, atol=0)


def test_host_state_contained(built, tied, prompts, eos_ids):
    """Building engines, generating and pushing leave the host process as it was: env, torch threads and
    set_num_threads, the global torch/numpy/Python RNGs, sys.excepthook, the NUMA memory policy."""
    engine, model, (before_build, after_build) = built
    _same_state(before_build, after_build)
    state = HostState.capture()
    engine.generate(*prompts, SAMPLED, eos_token_ids=eos_ids, pad_token_id=PAD, generator=torch.Generator())
    tied[0].push_weights(tied[1].state_dict().items())
    _same_state(state, HostState.capture())
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)  # a real call again, not vLLM's warning stub
    assert torch.get_num_threads() == threads + 1
    torch.set_num_threads(threads)


def test_unsupported_head_dim_is_refused_before_building(built, tmp_path):
    """The built-in tiny-random-llama has head_dim 16, which vLLM's CPU attention cannot run."""
    path, live = build_tiny_llama(tmp_path, seed=0), ve.VLLMEngine._live
    with pytest.raises(ValueError, match="head_dim 16.*--generation.backend native"):
        ve.VLLMEngine(str(path), dtype="float32", max_model_len=64, kv_cache_gb=0.05)
    assert ve.VLLMEngine._live == live  # no engine was started


def test_generate_validates_lengths(built, prompts):
    with pytest.raises(ValueError, match="max_model_len 64"):
        built[0].generate(*prompts, SamplingConfig(max_new_tokens=60), eos_token_ids=[PAD], pad_token_id=PAD)
    empty = built[0].generate(*prompts, SamplingConfig(max_new_tokens=0), eos_token_ids=[PAD], pad_token_id=PAD)
    assert empty.response_ids.shape == (len(PROMPTS), 0) and not empty.finished.any()


_PROCESS_GROUP_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from chatrlhf.rollout import SamplingConfig
    from chatrlhf.rollout.vllm_engine import VLLMEngine
    ids = torch.tensor([[5, 6, 7]]); greedy = SamplingConfig(max_new_tokens=4, do_sample=False)
    def run():
        with VLLMEngine(sys.argv[1], dtype="float32", max_model_len=32, kv_cache_gb=0.05) as engine:
            out = engine.generate(ids, torch.ones_like(ids), greedy, eos_token_ids=[2], pad_token_id=2)
        try:
            engine.generate(ids, torch.ones_like(ids), greedy, eos_token_ids=[2], pad_token_id=2)
        except RuntimeError as err:
            assert "closed" in str(err)
        return out.response_ids
    first = run()
    assert not dist.is_initialized(), "the process group vLLM created outlived the engine"
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
    assert torch.equal(run(), first)
    assert dist.is_initialized(), "closing the engine destroyed the trainer's process group"
    value = torch.ones(1); dist.all_reduce(value); assert value.item() == 1
    print("ok")
""")


def test_process_group_ownership(tmp_path):
    """Closing an engine destroys the torch.distributed group vLLM created, and never one the trainer made."""
    _require_vllm()
    path = _tiny(tmp_path)
    out = subprocess.run([sys.executable, "-c", _PROCESS_GROUP_SCRIPT, str(path), str(tmp_path / "store")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-3000:] + out.stderr[-3000:]


def test_inference_commands_generate_with_vllm(built, tiny_dir):
    """chat, serve's answerer and eval's sampling with --generation.backend vllm build one engine from the
    model dir and answer as the native backend does (greedy)."""
    from chatrlhf.chat import ChatConfig, ChatSession
    from chatrlhf.config import GenerationConfig, ModelLoadConfig
    from chatrlhf.evaluation.answers import sample_answers
    from chatrlhf.evaluation.prompts import EvalPrompt
    from chatrlhf.feedback.answerer import Answerer
    from chatrlhf.models import load_tokenizer
    from chatrlhf.rollout.inference import InferenceEngine

    model_cfg = ModelLoadConfig(name_or_path=str(tiny_dir))
    generation = {b: GenerationConfig(max_new_tokens=8, temperature=0, backend=b) for b in ("native", "vllm")}
    sessions = {b: ChatSession(ChatConfig(model=model_cfg, generation=g, max_history_tokens=48))
                for b, g in generation.items()}
    try:
        assert sessions["vllm"].engine.vllm is not None and sessions["native"].engine.vllm is None
        for line in ("hello there", "what is the capital of france"):
            assert sessions["vllm"].answer(line) == sessions["native"].answer(line)
    finally:
        for session in sessions.values():
            session.close()
    answerers = {b: Answerer([model_cfg], g, max_history_tokens=48) for b, g in generation.items()}
    try:
        messages = [{"role": "user", "content": "how do i cook rice"}]
        native_text = answerers["native"].answer(0, messages, seed=3).text
        assert answerers["vllm"].answer(0, messages, seed=3).text == native_text
        # The chat page's streaming through vLLM: the pieces add up to the same answer; a stop cuts it.
        pieces, stop = [], threading.Event()
        assert answerers["vllm"].answer(0, messages, seed=3, on_text=pieces.append).text == native_text
        assert len(pieces) > 1 and "".join(pieces).strip() == native_text
        cut = answerers["vllm"].answer(0, messages, seed=3, on_text=lambda text: stop.set(), stop=stop)
        assert not cut.finished and cut.settings["stopped"] and native_text.startswith(cut.text)
        assert len(cut.text) < len(native_text)
    finally:
        for answerer in answerers.values():
            answerer.close()
    tok, model = load_tokenizer(tiny_dir, padding_side="left"), built[1]
    prompts = [EvalPrompt(str(i), [{"role": "user", "content": t}], t, False)
               for i, t in enumerate(["yes no good", "the quick brown fox", "paris"])]
    with InferenceEngine("vllm", model=model, model_dir=str(tiny_dir), max_model_len=64) as engine:
        via_vllm = sample_answers(model, tok, prompts, GREEDY, batch_size=2, seed=0, engine=engine)
    native = sample_answers(model, tok, prompts, GREEDY, batch_size=2, seed=0)
    assert [a.text for a in via_vllm] == [a.text for a in native]
    assert [a.num_tokens for a in via_vllm] == [a.num_tokens for a in native]


# ---- streaming (on_step) -------------------------------------------------------------------------------
def _idle(engine) -> bool:
    """Nothing left in the engine: no request in its output processor or its (in-process) scheduler."""
    scheduler = engine._llm.llm_engine.engine_core.engine_core.scheduler
    return not engine._llm.llm_engine.has_unfinished_requests() and not scheduler.requests


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "top-k-top-p"])
def test_on_step_that_never_stops_changes_nothing(built, prompts, eos_ids, sampling):
    """Same seeds, same requests: the rollout is exactly the one without on_step, and on_step sees (B, 1),
    (B, 2), ... whose step t is the rollout's first t tokens (ended rows padded after their EOS)."""
    engine, seen = built[0], []
    run = lambda **kw: engine.generate(*prompts, sampling, eos_token_ids=eos_ids, pad_token_id=PAD,  # noqa: E731
                                       generator=torch.Generator().manual_seed(3), **kw)
    plain, streamed = run(), run(on_step=lambda so_far: seen.append(so_far.clone()) or False)
    _assert_same(streamed, plain, atol=0)
    assert [s.shape for s in seen] == [(len(PROMPTS), t) for t in range(1, plain.response_ids.shape[1] + 1)]
    assert all(torch.equal(s, plain.response_ids[:, : s.shape[1]]) for s in seen) and seen[-1].dtype == torch.long
    assert _idle(engine)


@pytest.mark.parametrize("steps", [1, 5])
def test_on_step_stop_cuts_rows_and_engine_recovers(built, prompts, eos_ids, steps):
    """Stopping after k steps: rows not ended are cut at k tokens (finished False), each the first k tokens
    of the unstopped greedy run; rows ended before k are as there. The engine is left empty and generates
    normally after a stop and after an on_step that raises."""
    engine = built[0]
    run = lambda **kw: engine.generate(*prompts, GREEDY, eos_token_ids=eos_ids, pad_token_id=PAD, **kw)  # noqa: E731
    full = run()
    cut = run(on_step=lambda so_far: so_far.shape[1] >= steps)
    assert _idle(engine) and cut.response_ids.shape == (len(PROMPTS), steps)
    lengths = full.response_lengths.clamp_max(steps)
    assert torch.equal(cut.response_lengths, lengths) and (lengths == steps).any()
    assert torch.equal(cut.finished, full.finished & (full.response_lengths <= steps))
    assert torch.equal(cut.response_ids, full.response_ids[:, :steps])
    torch.testing.assert_close(cut.log_probs, full.log_probs[:, :steps], rtol=0, atol=0)

    def fail(so_far):
        raise KeyError("on_step failed")

    with pytest.raises(KeyError, match="on_step failed"):
        run(on_step=fail)
    assert _idle(engine)
    _assert_same(run(), full, atol=0)
