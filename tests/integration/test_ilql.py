"""ILQL on a tiny random Llama: from offline scores alone, decoding with beta (Q - V) earns a rule reward the
behaviour LM does not; the decoding path through the native sampler equals a cache-free recomputation;
micro-batch x accumulation equals the full batch; bad flags are named."""

import json
import random
from pathlib import Path

import pytest
import torch
from tiny_data import write_jsonl

from chatrlhf.cli import main
from chatrlhf.data import PromptCollator, encode_records
from chatrlhf.models import load_tokenizer
from chatrlhf.models.ilql import ILQLPolicy, load_ilql
from chatrlhf.models.tiny import build_tiny_llama

pytestmark = pytest.mark.slow
ANSWERS = ("yes", "no", "maybe", "sure")
REWARD = "def said_yes(prompt, response, metadata):\n    return float(response.strip() == 'yes')\n"


def ilql_rows(n: int, seed: int = 0) -> list[dict]:
    """A uniform behaviour policy over four answers; only "yes" scores 1. The LM alone (behaviour cloning) has no
    reason to prefer it; the scores do."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        answer = rng.choice(ANSWERS)
        rows.append({"prompt": f"say {rng.choice('abcd')} {rng.choice('xyz')}", "response": answer,
                     "score": float(answer == "yes")})
    return rows


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ilql")
    (root / "reward.py").write_text(REWARD)
    return {"model": str(build_tiny_llama(root / "model", seed=0)), "data": write_jsonl(root / "d.jsonl", ilql_rows(400)),
            "reward": f"{root / 'reward.py'}:said_yes"}


def run_ilql(x: dict, out: Path, *extra: str) -> Path:
    flags = ["--model.name_or_path", x["model"], "--data.datasets", f"[{x['data']}]", "--run.output_dir", str(out),
             "--run.progress", "false", "--engine.learning_rate", "1e-3"]
    assert main(["ilql", *flags, *extra]) == 0
    return out


def test_ilql_decoding_earns_the_reward_the_behaviour_policy_does_not(inputs, tmp_path):
    out = run_ilql(inputs, tmp_path / "ilql", "--max_steps", "200", "--reward", inputs["reward"],
                   "--generation.max_new_tokens", "6")
    ev = json.loads((out / "eval.json").read_text())
    start = ev["start"]
    # the heads start at 0, so before training the ILQL policy is the LM itself, answer for answer
    assert start["samples/ilql"] == start["samples/beta0"] and start["reward/ilql"] == start["reward/beta0"]
    # greedy decoding on 32 held-out prompts: the cloned LM says one of the four answers; ILQL says "yes"
    assert ev["reward/ilql"] >= 0.9 and ev["reward/beta0"] <= 0.5, ev
    assert ev["loss/bc"] < 0.5 * start["loss/bc"] and ev["loss/q"] < start["loss/q"] + 1e-3
    assert ev["v"] > 0.1  # V learnt the expected discounted score (a quarter of the answers score 1)
    heads = load_ilql(out / "model").heads  # the saved model carries its heads
    assert heads.two_qs and all(torch.isfinite(p).all() for p in heads.parameters())
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "model")  # and is a plain model for transformers


def test_native_decoding_equals_a_cache_free_recomputation(inputs, tmp_path):
    """Greedy tokens from ILQLPolicy through the native sampler (KV cache, logits_to_keep, rows leaving the batch)
    equal a loop that recomputes log pi_beta + beta (min Q^ - V) over the whole sequence at every step."""
    out = run_ilql(inputs, tmp_path / "ilql", "--max_steps", "40")
    from chatrlhf.algorithms.ilql import ilql_logits
    from chatrlhf.rollout import SamplingConfig, generate

    model, tok = load_ilql(out / "model").eval(), load_tokenizer(out / "model")
    prompts = [[{"role": "user", "content": p}] for p in ("say a x", "say dd zz yy", "say b")]
    batch = PromptCollator(tok.pad_token_id)(encode_records([{"prompt": p} for p in prompts], "prompt", tok))
    policy = ILQLPolicy(model, beta=3.0)
    rollout = generate(policy, batch["input_ids"], batch["attention_mask"], SamplingConfig(8, do_sample=False),
                       eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        for row, (ids, mask) in enumerate(zip(batch["input_ids"], batch["attention_mask"])):
            seq = ids[mask.bool()].tolist()
            for t in range(int(rollout.response_mask[row].sum())):
                x = torch.tensor([seq])
                lm = model.lm(input_ids=x, output_hidden_states=True)
                heads = model.heads(lm.hidden_states[-1][:, -1:])
                scores = ilql_logits(lm.logits[:, -1], torch.stack(heads.target_qs).amin(0)[:, -1], heads.v[:, -1], 3.0)
                seq.append(int(scores.argmax(-1)))
                assert seq[-1] == int(rollout.response_ids[row, t]), (row, t)


def test_accumulation_equals_the_full_batch(inputs, tmp_path):
    adam = ["--engine.adam_eps", "1e-6", "--run.precision", "fp32", "--run.eval_at_start", "false"]
    small = run_ilql(inputs, tmp_path / "2x2", "--engine.micro_batch_size", "2", "--engine.gradient_accumulation_steps",
                     "2", "--max_steps", "4", *adam)
    full = run_ilql(inputs, tmp_path / "4x1", "--engine.micro_batch_size", "4", "--max_steps", "4", *adam)
    rows = [{k: v for k, v in json.loads(line).items() if k.startswith("train/loss") or k in ("train/q", "train/v")}
            for line in (small / "metrics.jsonl").read_text().splitlines()]
    full_rows = [{k: v for k, v in json.loads(line).items() if k.startswith("train/loss") or k in ("train/q", "train/v")}
                 for line in (full / "metrics.jsonl").read_text().splitlines()]
    rows, full_rows = [r for r in rows if r], [r for r in full_rows if r]
    assert len(rows) == len(full_rows) == 4
    for a, b in zip(rows, full_rows):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
    from safetensors.torch import load_file

    for name in ("model.safetensors", "ilql_heads.safetensors"):  # the trunk and the heads, targets included
        a, b = load_file(small / "model" / name), load_file(full / "model" / name)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_bad_flags_are_named(inputs, tmp_path, capsys):
    base = ["ilql", "--model.name_or_path", inputs["model"], "--run.output_dir", str(tmp_path / "o")]
    assert main([*base]) == 2  # the demo's pairs hold no scores
    assert "cannot be turned into rating records" in capsys.readouterr().err
    data = ["--data.datasets", f"[{inputs['data']}]"]
    for flags, message in ((["--tau", "1"], "--tau must be in (0, 1)"),
                           (["--polyak_alpha", "0"], "--polyak_alpha must be in (0, 1]"),
                           (["--model.lora_r", "8"], "--model.lora_r and --engine.zero_stage 3 are not supported"),
                           (["--beta", "-1"], "--beta must be a finite number >= 0")):
        assert main([*base, *data, *flags]) == 2
        assert message in capsys.readouterr().err
