"""evaluate_models, the report and the chat loop on tiny random models (offline, a few seconds)."""

import json

import pytest
import torch

from chatrlhf.chat import ChatConfig, fit_history, run_chat
from chatrlhf.config import GenerationConfig, ModelLoadConfig
from chatrlhf.evaluation import (
    evaluate_models,
    kl_to_reference,
    load_eval_prompts,
    response_log_probs,
    sample_answers,
    write_report,
)
from chatrlhf.models import RewardModel, load_causal_lm, load_tokenizer
from chatrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
from chatrlhf.rollout import SamplingConfig

pytestmark = pytest.mark.slow
FIELDS = ("overall", "consistency", "engagingness", "safety", "relevance")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    base = build_tiny_llama(root / "base", seed=0)
    sft = build_tiny_llama(root / "sft", seed=1)
    torch.manual_seed(0)
    RewardModel.from_causal_lm(str(sft)).save_pretrained(root / "rm", tokenizer=build_tiny_tokenizer())
    return {"root": root, "base": str(base), "sft": str(sft), "rm": str(root / "rm")}


def test_evaluate_models_end_to_end(dirs, tmp_path):
    prompts = load_eval_prompts("demo", limit=6)
    sampling = SamplingConfig(max_new_tokens=8)
    # "ppo" is the SFT dir again: same weights, same seed -> the same answers, so only ties, and KL 0
    models = {"base": dirs["base"], "sft": dirs["sft"], "ppo": dirs["sft"]}
    results = evaluate_models(
        models,
        reference=dirs["sft"],
        reward_model=dirs["rm"],
        prompts=prompts,
        sampling=sampling,
        batch_size=4,
        seed=3,
        out_dir=tmp_path,
        progress=False,
    )
    assert results["order"] == ["base", "sft", "ppo"]
    for name in models:
        m = results["models"][name]
        assert set(m["gold"]) == set(FIELDS) and all(0 <= m["gold"][f] <= 1 for f in FIELDS)
        assert all(
            isinstance(m[k], float) and torch.isfinite(torch.tensor(m[k]))
            for k in ("rm_score", "kl_to_ref", "length", "finished")
        )
        assert 1 <= m["length"] <= 8
    assert results["models"]["sft"]["kl_to_ref"] == 0.0
    assert results["models"]["ppo"]["kl_to_ref"] == 0.0
    assert results["models"]["base"]["kl_to_ref"] != 0.0  # a different random model
    same = results["win_rates"]["ppo_vs_sft"]
    assert (same["ties"], same["wins"], same["losses"], same["win_rate"]) == (6, 0, 0, 0.5)
    assert set(results["win_rates"]) == {"sft_vs_base", "ppo_vs_sft", "ppo_vs_base"}
    assert results["kl_is_estimate"] is True
    # files: results JSON and one samples row per prompt with every model's answer and scores
    saved = json.loads((tmp_path / "eval_models.json").read_text())
    assert saved["models"]["ppo"]["kl_to_ref"] == 0.0
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [p.id for p in prompts]
    for r in rows:
        assert r["answers"]["ppo"]["text"] == r["answers"]["sft"]["text"]
        assert r["answers"]["sft"]["kl"] == 0.0 and set(r["answers"]["base"]["gold"]) == set(FIELDS)
        assert isinstance(r["answers"]["base"]["rm_score"], float)
    assert 1 <= len(results["examples"]) <= 4
    md = write_report(tmp_path, saved, {"ppo": tmp_path / "no-ppo"}).read_text()
    assert "| **ppo** |" in md and "## Answers side by side" in md


def test_sample_answers_kl_and_log_probs(dirs):
    prompts = load_eval_prompts("demo", limit=5)
    tok = load_tokenizer(dirs["base"], padding_side="left")
    base, sft = load_causal_lm(dirs["base"]), load_causal_lm(dirs["sft"])
    sampling = SamplingConfig(max_new_tokens=6)
    answers = sample_answers(base, tok, prompts, sampling, batch_size=2, seed=0)
    assert base.training  # the mode is restored
    again = sample_answers(base, tok, prompts, sampling, batch_size=2, seed=0)
    assert [a.text for a in answers] == [a.text for a in again]
    assert len(answers.batches) == 3 and sorted(i for ix, _ in answers.batches for i in ix) == list(range(5))
    assert all(1 <= a.num_tokens <= 6 for a in answers)
    assert kl_to_reference(base.eval(), base, answers.rollouts) == 0.0
    assert kl_to_reference(base, sft.eval(), answers.rollouts) != 0.0
    # the response log-probs equal a plain unpadded forward's, read token by token: one batch of all 5
    # prompts (left padding) with 2 rows per forward
    rollout = sample_answers(base, tok, prompts, sampling, batch_size=5, seed=1).rollouts[0]
    assert (rollout.prompt_mask == 0).any()
    lp = response_log_probs(base, rollout, chunk=2)
    seq, mask = rollout.sequences, rollout.attention_mask
    p = rollout.prompt_ids.shape[1]
    for b in range(seq.shape[0]):
        keep = mask[b].bool()
        ids = seq[b][keep][None]
        logits = base(input_ids=ids).logits[0].log_softmax(-1)
        n = int(rollout.response_mask[b].sum())
        start = int(rollout.prompt_mask[b].sum())
        want = logits[start - 1 : start - 1 + n].gather(-1, ids[0, start : start + n, None]).squeeze(-1)
        torch.testing.assert_close(lp[b, :n], want, rtol=1e-5, atol=1e-5)
        assert torch.all(lp[b, n:] == 0)
    assert lp.shape == rollout.response_ids.shape and p >= 1
    # the sampler's own temperature-1 log-probs (KV cache, step by step) agree with the full forward
    torch.testing.assert_close(lp, rollout.log_probs.float(), rtol=1e-5, atol=1e-5)


def test_run_chat_two_answers_then_eof(dirs):
    lines = iter(["hi", "/reset", "  ", "hello", EOFError])

    def fake_input(prompt):
        item = next(lines)
        if item is EOFError:
            raise EOFError
        return item

    class Out:
        text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    out = Out()
    run_chat(
        ChatConfig(model=ModelLoadConfig(dirs["base"]), generation=GenerationConfig(max_new_tokens=5, temperature=0.7)),
        input_fn=fake_input, output=out
    )
    assert out.text.count("assistant> ") == 2
    assert "[history cleared]" in out.text
    assert next(iter(lines), None) is None  # every input consumed, then a clean exit on EOF


def test_run_chat_exit_and_missing_model(dirs, tmp_path):
    out_lines = []

    class Out:
        def write(self, s):
            out_lines.append(s)

        def flush(self):
            pass

    inputs = iter(["hey", "/quit", "never read"])
    run_chat(
        ChatConfig(model=ModelLoadConfig(dirs["base"]), generation=GenerationConfig(temperature=0.0, max_new_tokens=3)),
        input_fn=lambda _p: next(inputs),
        output=Out(),
    )
    assert "".join(out_lines).count("assistant> ") == 1
    assert next(inputs) == "never read"  # /quit left the loop
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        run_chat(ChatConfig(model=ModelLoadConfig(str(missing))), input_fn=lambda _p: "/exit")


def test_fit_history_drops_oldest_exchanges(dirs):
    tok = load_tokenizer(dirs["base"])
    turns = []
    for i in range(4):
        turns += [
            {"role": "user", "content": f"question {i} about the quick brown fox"},
            {"role": "assistant", "content": f"answer {i} the lazy dog"},
        ]
    turns.append({"role": "user", "content": "last question"})
    ids, kept = fit_history(tok, "be brief", turns, 10_000)
    assert kept == turns
    one_exchange = len(fit_history(tok, "be brief", turns[-3:], 10_000)[0])
    ids, kept = fit_history(tok, "be brief", turns, one_exchange)
    assert kept == turns[-3:] and len(ids) == one_exchange
    ids, kept = fit_history(tok, "be brief", turns, 5)  # even the last turn alone is too long: keep its tail
    assert kept == turns[-1:] and len(ids) == 5


def test_run_eval_writes_results_and_report(dirs, tmp_path):
    from chatrlhf.evaluation import EvalConfig, run_eval

    cfg = EvalConfig(
        model=ModelLoadConfig(dirs["sft"]),
        name="sft",
        reference=dirs["sft"],
        limit=3,
        generation=GenerationConfig(max_new_tokens=4),
        batch_size=2,
        output_dir=str(tmp_path),
        progress=False,
    )
    results = run_eval(cfg)
    assert results["models"]["sft"]["kl_to_ref"] == 0.0 and results["models"]["sft"]["rm_score"] is None
    assert results["win_rates"] == {}
    assert {p.name for p in tmp_path.iterdir()} >= {"eval_models.json", "samples.jsonl", "report.md"}
    assert "No reward model was given" in (tmp_path / "report.md").read_text()


def test_report_of_dpo_and_grpo_stages(dirs, tmp_path):
    """A real DPO stage dir gets its loss / implicit-reward plot; an RL stage other than PPO (GRPO here, from a
    metrics file in the RL loop's names) gets the reward, KL and gold plots under its own name."""
    from chatrlhf.config import DataConfig, EngineConfig, ModelConfig, RunConfig
    from chatrlhf.stages.dpo import train_dpo
    from chatrlhf.stages.dpo_config import DPOConfig

    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"question {i}", "chosen": "good answer", "rejected": "bad"} for i in range(12)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DPOConfig(model=ModelConfig(name_or_path=dirs["sft"]),
                    data=DataConfig(datasets=[str(pairs)], data_split="0,1,0", eval_fraction=0.25),
                    engine=EngineConfig(micro_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-3),
                    run=RunConfig(output_dir=str(tmp_path / "dpo"), progress=False), max_steps=3)
    train_dpo(cfg)
    grpo = tmp_path / "grpo"
    grpo.mkdir()
    grpo_rows = [{"step": s, "train/reward/score": 0.1 * s, "train/kl": 0.01 * s, "train/kl_coef": 0.04,
                  "train/gold/overall": 0.5, "train/loss/policy": -0.1} for s in range(1, 5)]
    (grpo / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in grpo_rows))
    md = write_report(tmp_path, None, {"dpo": tmp_path / "dpo", "grpo": grpo}).read_text()
    for name in ("dpo_curves.png", "grpo_reward.png", "grpo_kl.png", "grpo_gold_vs_proxy.png", "losses.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"(plots/{name})" in md
    assert "### DPO loss and implicit reward" in md and "### GRPO reward" in md and "### GRPO Gold vs proxy" in md
    assert "PPO" not in md and "ppo_reward.png" not in md  # no PPO stage, so no PPO plots or notes about them
    assert "rewards/accuracy" in md  # the DPO stage's eval.json in the stage-evaluation table
    assert "no `dpo` metrics" not in md and "no `grpo` metrics" not in md
