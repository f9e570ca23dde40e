"""The one-command pipeline end to end on the smoke preset (tiny random model, demo data)."""

import json

import pytest

from chatrlhf.cli import main

pytestmark = pytest.mark.slow


def test_train_smoke_preset_runs_sft_then_rm_and_resume_skips_done_stages(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CHATRLHF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["train", "--preset", "smoke", "--run.output_dir", str(out), "--run.progress", "false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {"sft", "rm", "ppo", "evaluation"} <= set(summary)
    assert summary["sft"]["perplexity"] > 1.0 and 0.0 <= summary["rm"]["accuracy"] <= 1.0
    # The reward model starts from the SFT model and both are plain HF dirs.
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    AutoModelForCausalLM.from_pretrained(out / "sft" / "model")
    AutoModelForSequenceClassification.from_pretrained(out / "rm" / "model")
    rm_cfg = (out / "rm" / "config.yaml").read_text()
    assert str(out / "sft" / "model") in rm_cfg
    # A second run with --resume finds both stages complete and trains nothing.
    capsys.readouterr()
    assert (
        main(
            [
                "train",
                "--preset",
                "smoke",
                "--run.output_dir",
                str(out),
                "--run.progress",
                "false",
                "--run.resume",
                "true",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.count("skipped (resume)") == 3
    # The other recipes reuse the finished SFT (and RM) stages and end with the same evaluation and report.
    for algo, skipped in (("grpo", 2), ("dpo", 1)):
        flags = ["train", "--preset", "smoke", "--run.output_dir", str(out), "--run.progress", "false", "--run.resume", "true"]
        assert main([*flags, "--algo", algo]) == 0
        assert capsys.readouterr().out.count("skipped (resume)") == skipped
        assert (out / algo / "model" / "config.json").is_file()
        summary = json.loads((out / "summary.json").read_text())
        assert algo in summary and algo in summary["evaluation"]["models"], summary["evaluation"].keys()
        assert "## " in (out / "report.md").read_text()
