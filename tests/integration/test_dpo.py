"""The DPO stage on a tiny random Llama: it learns a preference, and its bookkeeping is exact (precomputed
reference == per-step reference, micro-batch x accumulation == full batch)."""

import json
import math
import random
from pathlib import Path

import pytest
import torch

from chatrlhf.cli import main
from chatrlhf.config import ConfigError
from chatrlhf.data import PairCollator, encode_records
from chatrlhf.models import load_causal_lm, load_tokenizer
from chatrlhf.models.tiny import build_tiny_llama
from chatrlhf.reference import answer_log_probs
from chatrlhf.stages.dpo_config import DPOConfig
from chatrlhf.training import rank_batches

pytestmark = pytest.mark.slow
WORDS = "the quick brown fox jumps over lazy dog".split()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {"policy": str(build_tiny_llama(root / "policy", seed=0)), "other": str(build_tiny_llama(root / "other", seed=1))}


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """Separable by construction: the chosen answer contains 'good' where the rejected one has 'bad'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        stem = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
        at = rng.randint(0, len(stem))
        good, bad = stem[:at] + ["good"] + stem[at:], stem[:at] + ["bad"] + stem[at:]
        rows.append({"prompt": f"question {' '.join(stem)}", "chosen": " ".join(good), "rejected": " ".join(bad)})
    return rows


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(160)))
    return str(path)


def run_dpo(model: str, data: str, out: Path, *extra: str) -> Path:
    flags = [
        "--model.name_or_path", model, "--data.datasets", f"[{data}]", "--data.data_split", "0,1,0",
        "--data.eval_fraction", "0.2", "--run.output_dir", str(out), "--run.progress", "false",
        "--engine.learning_rate", "1e-3", "--engine.warmup_steps", "0", "--engine.gradient_accumulation_steps", "1",
    ]  # fmt: skip
    assert main(["dpo", *flags, *extra]) == 0
    return out


def metric(out: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


@pytest.mark.parametrize(("n", "world", "batch"), [(5, 2, 2), (9, 2, 4), (1, 2, 4), (0, 1, 4), (12, 3, 2), (7, 1, 3)])
def test_rank_batches_cover_every_item_once_in_equal_numbers(n, world, batch):
    shares = [rank_batches(n, r, world, batch) for r in range(world)]
    assert len({len(s) for s in shares}) == 1  # ZeRO-3: every rank joins every forward
    real = sorted(i for s in shares for idx, k in s for i in idx[:k])
    assert real == list(range(n))  # the real (unpadded) entries are each item exactly once
    assert all(0 < len(idx) <= batch for s in shares for idx, _ in s)


def test_answer_log_probs_equal_an_unpadded_forward(models):
    """The (2P, T) padded batch's summed answer log-probs equal each sequence scored alone, without padding,
    token by token in float64 (answer = every token after the prompt, its EOS included)."""
    tok = load_tokenizer(models["policy"])
    rows = [{"prompt": [{"role": "user", "content": "hello"}], "chosen": "yes good dog", "rejected": "no"},
            {"prompt": [{"role": "user", "content": "the quick brown fox"}], "chosen": "a", "rejected": "lazy dog bad"}]
    items = encode_records(rows, "preference", tok, max_len=64, max_prompt_len=32)
    batch = PairCollator(pad_id=tok.pad_token_id)(items)
    assert (batch["attention_mask"] == 0).any()  # padding is present, and pad id == eos id
    model = load_causal_lm(models["policy"]).eval()
    with torch.no_grad():
        got = answer_log_probs(model, batch, torch.device("cpu"))
        want = []
        for item in items:
            for key in ("chosen_input_ids", "rejected_input_ids"):
                ids = torch.tensor([item[key]])
                logp = model(input_ids=ids).logits[0].double().log_softmax(-1)  # (T, V)
                p = item["prompt_len"]
                want.append(sum(logp[t - 1, ids[0, t]].item() for t in range(p, ids.shape[1])))
    want = torch.tensor(want, dtype=torch.float32)
    order = torch.tensor([0, 2, 1, 3])  # want is (c0, r0, c1, r1); the batch is chosen rows first
    torch.testing.assert_close(got, want[order], rtol=1e-5, atol=1e-5)


def test_dpo_learns_the_preference(models, pairs, tmp_path):
    out = run_dpo(models["policy"], pairs, tmp_path / "dpo", "--engine.micro_batch_size", "8", "--max_steps", "30")
    losses = metric(out, "train/loss")
    assert len(losses) == 30
    assert losses[0] == pytest.approx(math.log(2), rel=1e-6)  # policy == reference at the first step: h = 0
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    ev = json.loads((out / "eval.json").read_text())
    assert ev["stage"] == "dpo" and ev["pairs"] == 32
    # held-out pairs: rewards are 0 = 0 at the start (accuracy 0, strict >), then the chosen answer wins
    assert ev["start"]["rewards/accuracy"] == 0.0 and ev["start"]["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert ev["rewards/accuracy"] >= 0.9 and ev["rewards/margin"] > 0.5 and ev["loss"] < 0.5, ev
    assert ev["rewards/chosen"] > 0 > ev["rewards/rejected"]
    assert all(math.isfinite(g) for g in metric(out, "train/grad_norm"))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "model")  # plain transformers loads the result


def test_precomputed_reference_equals_per_step_reference(models, pairs, tmp_path):
    """A reference other than the starting policy, scored once up front vs in every micro-batch."""
    flags = ["--reference", models["other"], "--engine.micro_batch_size", "4", "--max_steps", "4"]
    pre = run_dpo(models["policy"], pairs, tmp_path / "pre", *flags)
    step = run_dpo(models["policy"], pairs, tmp_path / "step", *flags, "--precompute_reference", "false")
    for key in ("train/loss", "train/rewards/margin", "eval/loss", "eval/rewards/chosen"):
        a, b = metric(pre, key), metric(step, key)
        assert len(a) == len(b) > 0
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=0)
    assert metric(pre, "train/loss")[0] != pytest.approx(math.log(2), rel=1e-3)  # the reference is not the policy


def test_accumulation_equals_the_full_batch(models, pairs, tmp_path):
    # Adam moves a weight by about lr * g / (|g| + eps): for a gradient at rounding-noise level (~1e-9) eps 1e-8
    # would turn the noise into a visible step, so both runs use eps 1e-6, as tests/integration/test_engine.py does.
    adam = ["--engine.adam_eps", "1e-6"]
    small = run_dpo(models["policy"], pairs, tmp_path / "2x2", "--engine.micro_batch_size", "2",
                    "--engine.gradient_accumulation_steps", "2", "--max_steps", "4", "--run.eval_at_start", "false", *adam)
    full = run_dpo(models["policy"], pairs, tmp_path / "4x1", "--engine.micro_batch_size", "4",
                   "--max_steps", "4", "--run.eval_at_start", "false", *adam)
    torch.testing.assert_close(torch.tensor(metric(small, "train/loss")), torch.tensor(metric(full, "train/loss")),
                               rtol=1e-5, atol=0)
    from safetensors.torch import load_file

    a, b = load_file(small / "model" / "model.safetensors"), load_file(full / "model" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("flags", "first_loss"),
    [
        (["--loss", "ipo"], 25.0),  # h = 0 at the first step: (0 - 1 / (2 * 0.1))^2 = 25
        (["--label_smoothing", "0.1"], math.log(2)),  # cDPO at h = 0: 0.9 ln 2 + 0.1 ln 2
        (["--reference_free", "true"], None),
    ],
    ids=["ipo", "cdpo", "reference_free"],
)
def test_variants_run_and_are_finite(models, pairs, tmp_path, flags, first_loss):
    out = run_dpo(models["policy"], pairs, tmp_path / "v", *flags, "--engine.micro_batch_size", "8",
                  "--max_steps", "3", "--run.eval_at_start", "false")
    losses = metric(out, "train/loss")
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    ev = json.loads((out / "eval.json").read_text())
    assert all(math.isfinite(v) for v in ev.values() if isinstance(v, float))
    if first_loss is not None:
        assert losses[0] == pytest.approx(first_loss, rel=1e-6)
    else:  # no reference: the implicit reward is beta * log pi(y) itself
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        first = next(r for r in rows if "train/loss" in r)
        assert first["train/rewards/chosen"] == pytest.approx(0.1 * first["train/logps/chosen"], rel=1e-6)


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_simpo_and_orpo_learn_the_preference(models, pairs, tmp_path, loss):
    """SimPO and ORPO (no reference) learn the pairs: the held-out chosen answers' mean log-prob ends
    above the rejected ones' for most pairs, and the loss falls."""
    beta = "2.0" if loss == "simpo" else "0.5"
    out = run_dpo(models["policy"], pairs, tmp_path / loss, "--loss", loss, "--beta", beta,
                  "--engine.micro_batch_size", "8", "--max_steps", "30")
    losses = metric(out, "train/loss")
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    ev = json.loads((out / "eval.json").read_text())
    assert ev["objective"] == loss and ev["rewards/accuracy"] >= 0.8, ev
    first = next(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in line)
    assert first["train/rewards/chosen"] == pytest.approx(float(beta) * first["train/logps/chosen"], rel=1e-6)


def test_bad_config_names_the_flag(models, pairs, tmp_path, capsys):
    with pytest.raises(ConfigError, match="beta must be > 0"):
        DPOConfig(beta=0.0).validate()
    with pytest.raises(ConfigError, match="label_smoothing"):
        DPOConfig(loss="ipo", label_smoothing=0.1).validate()
    with pytest.raises(ConfigError, match="--loss simpo is reference-free"):
        DPOConfig(loss="simpo", reference="other").validate()
    flags = ["--model.name_or_path", models["policy"], "--data.datasets", f"[{pairs}]",
             "--run.output_dir", str(tmp_path / "bad"), "--beta", "0"]
    assert main(["dpo", *flags]) == 2
    assert "beta must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()  # stopped before anything ran
