"""chatrlhf.engine on a real tiny Llama: training, accumulation semantics, exact resume, 2-process DeepSpeed
launcher run, Hugging Face export. The LR-schedule tests are pure and fast; the rest are marked slow."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatrlhf import checkpoint as ckpt
from chatrlhf.config import EngineConfig
from chatrlhf.engine import Engine, init_distributed, lr_factor
from chatrlhf.engine.state import engine_state_dict, load_engines, save_engines

_spec = importlib.util.spec_from_file_location("engine_worker", Path(__file__).with_name("engine_worker.py"))
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 240


# ---- LR schedule (pure) -----------------------------------------------------------------------------------


def test_lr_factor_cosine_by_hand():
    # warmup=1, total=5: step 0 -> 1/2 (warm-up (0+1)/(1+1)); then p = (s-1)/4:
    # s=1 p=0 -> 1; s=2 p=1/4 -> (1+cos(pi/4))/2 = 0.853553; s=3 p=1/2 -> 0.5; s=4 p=3/4 -> 0.146447;
    # s=5 (one past the last step) p=1 -> 0.
    got = [lr_factor(s, warmup=1, total=5, kind="cosine") for s in range(6)]
    want = [0.5, 1.0, (1 + math.sqrt(0.5)) / 2, 0.5, (1 - math.sqrt(0.5)) / 2, 0.0]
    assert got == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_lr_factor_linear_and_constant_by_hand():
    # warmup=2, total=6: warm-up 1/3, 2/3; then p = (s-2)/4: 1, 3/4, 1/2, 1/4.
    assert [lr_factor(s, 2, 6, "linear") for s in range(6)] == pytest.approx(
        [1 / 3, 2 / 3, 1, 0.75, 0.5, 0.25]
    )
    assert [lr_factor(s, 0, 3, "constant") for s in range(3)] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="lr_scheduler"):
        lr_factor(0, 0, 3, "step")


# ---- engine on a tiny Llama -------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # A 64-wide model gains nothing from more threads, and on a busy 2-core machine extra OpenMP threads
    # make each step many times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from chatrlhf.models.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def make_engine(model_dir: Path, total_steps: int = 6, dtype: str = "float32", **overrides) -> Engine:
    from transformers import AutoModelForCausalLM

    settings = dict(learning_rate=3e-3, warmup_steps=1, weight_decay=0.01, micro_batch_size=4)
    settings.update(overrides)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    return Engine(model, EngineConfig(**settings), total_steps=total_steps, dtype=dtype)


def flat_params(engine: Engine) -> torch.Tensor:
    with engine.gathered_parameters():
        return torch.cat([p.detach().flatten().clone() for p in engine.module.parameters()])


def listening_addresses() -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) of the TCP sockets this process listens on."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A = LISTEN
                found.append(cols[1].split(":")[0])
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
def test_one_process_listens_on_loopback_only(tiny_dir):
    """A single-process run opens no port reachable from the network: the process group has an in-memory
    store (no TCP store on all interfaces) and gloo is bound to the loopback interface."""
    make_engine(tiny_dir)
    loopback = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}
    addresses = listening_addresses()
    assert addresses and set(addresses) <= loopback, addresses


@pytest.mark.slow
def test_single_process_training_lowers_loss(tiny_dir):
    steps = 12
    engine = make_engine(tiny_dir, total_steps=steps, learning_rate=1e-2, warmup_steps=2)
    batch = worker.make_batches(engine.module.config.vocab_size, n_batches=1)
    losses, lrs = [], []
    for _ in range(steps + 1):  # the extra step runs at LR 0 (schedule ended): a clean final loss
        losses += worker.train_steps(engine, batch, 1, micro_batch_size=4)[0]
        lrs.append(engine.lr)
    assert engine.optimizer_steps == steps + 1 and isinstance(engine.grad_norm, float)
    assert init_distributed() == (engine.rank, engine.world_size) == (0, 1)  # idempotent
    assert losses[-1] < 0.6 * losses[0], losses
    assert lrs == pytest.approx([1e-2 * lr_factor(s, 2, steps, "cosine") for s in range(steps + 1)], rel=1e-6)


@pytest.mark.slow
def test_micro_batch_times_accumulation_equals_full_batch(tiny_dir):
    # Rows have different token counts, so this holds only if backward() sums micro-batch gradients
    # (no 1/accumulation scaling) and the loss is normalised by the whole step's tokens.
    # adam_eps=1e-6: Adam's first update lr*g/(|g|+eps) has slope lr/eps, which at eps=1e-8 turns the
    # float summation-order noise of near-zero gradients into 1e-6-size parameter differences.
    full = make_engine(tiny_dir, micro_batch_size=4, gradient_accumulation_steps=1, adam_eps=1e-6)
    accum = make_engine(tiny_dir, micro_batch_size=2, gradient_accumulation_steps=2, adam_eps=1e-6)
    batches = worker.make_batches(full.module.config.vocab_size)
    batch = batches[0]
    n_tokens = batch["attention_mask"][:, 1:].sum()
    full.backward(worker.token_nll_sum(full, batch)[0] / n_tokens)
    for i in (0, 2):
        rows = {k: v[i : i + 2] for k, v in batch.items()}
        accum.backward(worker.token_nll_sum(accum, rows)[0] / n_tokens)
        if i == 0:
            assert accum.step() is False
    for a, f in zip(accum.module.parameters(), full.module.parameters()):
        torch.testing.assert_close(a.grad, f.grad, rtol=1e-5, atol=1e-7)
    assert full.step() and accum.step()
    assert accum.grad_norm == pytest.approx(full.grad_norm, rel=1e-6)
    torch.testing.assert_close(flat_params(accum), flat_params(full), rtol=0, atol=1e-6)
    full_losses, _ = worker.train_steps(full, batches, 2, micro_batch_size=4)
    accum_losses, _ = worker.train_steps(accum, batches, 2, micro_batch_size=2)
    assert accum.optimizer_steps == full.optimizer_steps == 3
    assert accum_losses == pytest.approx(full_losses, rel=1e-6)


@pytest.mark.slow
def test_step_reports_boundaries(tiny_dir):
    engine = make_engine(tiny_dir, micro_batch_size=2, gradient_accumulation_steps=2)
    rows = {k: v[:2] for k, v in worker.make_batches(engine.module.config.vocab_size, 1)[0].items()}
    flags = []
    for _ in range(4):
        engine.backward(worker.token_nll_sum(engine, rows)[0] / 100)
        flags.append(engine.step())
    assert flags == [False, True, False, True] and engine.optimizer_steps == 2


def optimizer_tensors(engine: Engine) -> list[torch.Tensor]:
    state = engine_state_dict(engine)["optimizer"]
    found = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            found.append(x.detach().clone())
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(state)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("stage,dtype", [(0, "float32"), (2, "float32"), (0, "bfloat16")])
def test_nonfinite_step_is_skipped_and_leaves_no_trace(tiny_dir, stage, dtype):
    """good, NaN-loss, good steps == good, good steps bit for bit: the skipped step changes neither the
    weights, the optimizer state nor the LR schedule; it is counted, and the next step trains normally."""
    batches = worker.make_batches(json.loads((tiny_dir / "config.json").read_text())["vocab_size"], 2)

    def run(poison: bool) -> Engine:
        engine = make_engine(tiny_dir, zero_stage=stage, dtype=dtype)
        for i, scale in enumerate([1.0, float("nan"), 1.0] if poison else [1.0, 1.0]):
            before = (flat_params(engine), optimizer_tensors(engine), engine.current_lr())
            engine.backward(worker.token_nll_sum(engine, batches[min(i, 1) if poison else i])[0] * scale / 50)
            applied = engine.step()
            if scale != scale:  # the NaN step
                assert not applied and engine.skipped_steps == 1 and engine.consecutive_skips == 1
                assert torch.equal(flat_params(engine), before[0])
                assert all(torch.equal(a, b) for a, b in zip(optimizer_tensors(engine), before[1], strict=True))
                assert engine.current_lr() == before[2]
            else:
                assert applied and engine.consecutive_skips == 0
        return engine

    skipped, clean = run(poison=True), run(poison=False)
    assert skipped.optimizer_steps == clean.optimizer_steps == 2
    assert torch.equal(flat_params(skipped), flat_params(clean))


@pytest.mark.slow
def test_consecutive_nonfinite_steps_stop_the_run(tiny_dir):
    engine = make_engine(tiny_dir, max_consecutive_nonfinite=2)
    batch = worker.make_batches(engine.module.config.vocab_size, 1)[0]
    engine.backward(worker.token_nll_sum(engine, batch)[0] * float("inf"))
    assert not engine.step()
    engine.backward(worker.token_nll_sum(engine, batch)[0] / 50)
    assert engine.step() and engine.consecutive_skips == 0  # a good step resets the streak
    for attempt in range(2):
        engine.backward(worker.token_nll_sum(engine, batch)[0] * float("nan"))
        if attempt == 0:
            assert not engine.step()
        else:
            with pytest.raises(FloatingPointError, match=r"stopping at optimizer step 4: 2 steps in a row.*"
                                                         r"engine.max_consecutive_nonfinite"):
                engine.step()
    assert engine.skipped_steps == 3 and engine.optimizer_steps == 1


@pytest.mark.slow
@pytest.mark.parametrize("stage,dtype,offload", [(0, "float32", False), (2, "float32", False), (3, "float32", False),
                                                (0, "bfloat16", False), (2, "float32", True), (3, "float32", True)])
def test_resume_is_bit_exact(tiny_dir, tmp_path, stage, dtype, offload):
    n = 3
    offload_flags = {"offload_optimizer": offload, "offload_params": offload and stage == 3}
    reference = make_engine(tiny_dir, total_steps=2 * n, zero_stage=stage, dtype=dtype, **offload_flags)
    batches = worker.make_batches(reference.module.config.vocab_size)
    ref_losses, _ = worker.train_steps(reference, batches, 2 * n, 4)

    first = make_engine(tiny_dir, total_steps=2 * n, zero_stage=stage, dtype=dtype, **offload_flags)
    losses, _ = worker.train_steps(first, batches, n, 4)
    path = save_engines(
        tmp_path, n, first, ckpt.TrainerState(step=n, samples_seen=4 * n, extra={"kl": 0.1})
    )
    after_save = torch.rand(3)  # the RNG stream a resumed run must continue

    resumed = make_engine(tiny_dir, total_steps=2 * n, zero_stage=stage, dtype=dtype, **offload_flags)
    state = load_engines(ckpt.latest_checkpoint(tmp_path), resumed)
    assert torch.equal(torch.rand(3), after_save)
    assert (state.step, state.samples_seen, state.extra) == (n, 4 * n, {"kl": 0.1})
    assert resumed.optimizer_steps == n and resumed.lr == first.current_lr()
    more, _ = worker.train_steps(resumed, batches, n, 4, start=state.step)
    assert losses + more == ref_losses  # bit for bit
    assert torch.equal(flat_params(resumed), flat_params(reference))
    assert ckpt.latest_checkpoint(tmp_path) == path and ckpt.is_complete(path)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_processes_zero_match_one_process(tiny_dir, tmp_path, stage):
    out = tmp_path / "out"
    out.mkdir()
    stage0 = make_engine(tiny_dir, total_steps=4)  # a 1-process stage-0 checkpoint for the 2 ranks to load
    worker.train_steps(stage0, worker.make_batches(stage0.module.config.vocab_size), 2, 4)
    stage0_dir = save_engines(tmp_path / "stage0", 2, stage0)
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", "2", str(REPO / "tests/integration/engine_worker.py")]
    cmd += ["--model", str(tiny_dir), "--out", str(out), "--stage", str(stage), "--steps", "4"]
    cmd += ["--load-stage0", str(stage0_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())

    single = make_engine(tiny_dir, total_steps=4)
    losses, norms = worker.train_steps(single, worker.make_batches(single.module.config.vocab_size), 4, 4)
    # Same global batch; only the order of float additions differs (gradient averaging over 2 ranks).
    assert result["world_size"] == 2 and result["all_reduce_sum"] == 3.0 and result["reload_equal"]
    assert result["losses"] == pytest.approx(losses, rel=1e-5)
    assert result["grad_norms"] == pytest.approx(norms, rel=1e-4)
    assert result["stage0_optimizer_steps"] == 2
    assert result["stage0_checksum"] == worker.param_checksum(stage0)
    assert result["hf_logits_max_diff"] == 0.0  # the saved model is the trained one, exactly

    saved = ckpt.latest_checkpoint(out / "ckpt")
    assert {p.name for p in saved.glob("optimizer.*.safetensors")} == {
        "optimizer.rank0-of-2.safetensors",
        "optimizer.rank1-of-2.safetensors",
    }
    one_proc = make_engine(tiny_dir, total_steps=4, zero_stage=stage)
    with pytest.raises(ckpt.CheckpointError, match=r"partitioned over 2 processes, but this run has 1"):
        load_engines(saved, one_proc)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_save_hf_reloads_with_identical_logits(tiny_dir, tmp_path, stage):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = make_engine(tiny_dir, zero_stage=stage)
    batches = worker.make_batches(engine.module.config.vocab_size)
    worker.train_steps(engine, batches, 1, 4)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    target = tmp_path / "model"
    engine.save_hf(target, tokenizer)
    worker.train_steps(engine, batches, 1, 4)
    engine.save_hf(target, tokenizer)  # replaces the first export atomically
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    engine.eval()
    reloaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    ids, mask = batches[0]["input_ids"], batches[0]["attention_mask"]
    with torch.no_grad(), engine.gathered_parameters():
        want = engine(input_ids=ids, attention_mask=mask).logits
        got = reloaded(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, want)
    assert AutoTokenizer.from_pretrained(target).eos_token == tokenizer.eos_token


def test_generation_mode_uses_live_weights_in_eval_mode_and_restores_training(tiny_dir):
    engine = make_engine(tiny_dir)
    engine.train()
    before = flat_params(engine).clone()
    with engine.generation_mode() as model:
        assert model is engine.module  # the live module: no copy
        assert not model.training and not torch.is_grad_enabled()
    assert engine.module.training and torch.is_grad_enabled()
    assert torch.equal(flat_params(engine), before)


def test_generation_mode_merges_lora_adapters_and_unmerges_after(tiny_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero B so that merging changes the weights
            torch.nn.init.normal_(p, std=0.1)
    engine = Engine(model, EngineConfig(micro_batch_size=2), total_steps=2)
    layers = [m for m in engine.module.modules() if hasattr(m, "merged") and hasattr(m, "lora_A")]
    assert layers and not any(m.merged for m in layers)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        engine.eval()
        unmerged_logits = engine.module(input_ids=ids).logits
    engine.train()
    with engine.generation_mode() as live:
        assert all(m.merged for m in layers)
        merged_logits = live(input_ids=ids).logits
    assert not any(m.merged for m in layers) and engine.module.training
    torch.testing.assert_close(merged_logits, unmerged_logits, rtol=1e-5, atol=1e-5)
