"""Evaluation math, eval-prompt loading and the run report (no model needed)."""

import json
import math
from pathlib import Path

import pytest
import torch

from chatrlhf.data.formats import DataError
from chatrlhf.evaluation import answer_kl, load_eval_prompts, md_escape, win_rate, write_report
from chatrlhf.evaluation.metrics import mean
from chatrlhf.evaluation.plots import read_metrics, series
from chatrlhf.evaluation.prompts import spread_indices

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------- win_rate
def test_win_rate_hand_case_with_ties():
    # pairs: 0.9 > 0.1 win; 0.5 = 0.5 tie; 0.2 < 0.3 loss; 0.4 vs 0.4 + 1e-7 tie (inside tie_eps = 1e-6)
    # win_rate = (1 + 0.5 * 2) / 4 = 0.5; outcomes (1, .5, 0, .5): variance 0.125, stderr sqrt(0.125) / 2
    w = win_rate([0.9, 0.5, 0.2, 0.4], [0.1, 0.5, 0.3, 0.4 + 1e-7])
    assert (w["wins"], w["ties"], w["losses"], w["n"]) == (1, 2, 1, 4)
    assert w["win_rate"] == 0.5
    assert w["stderr"] == pytest.approx(math.sqrt(0.125) / 2, rel=1e-12)


def test_win_rate_all_wins_and_tie_eps():
    # 3 wins of 3: win_rate 1, every outcome equal -> stderr 0
    assert win_rate([1.0, 2.0, 3.0], [0.0, 0.0, 0.0]) == {
        "wins": 3,
        "ties": 0,
        "losses": 0,
        "n": 3,
        "win_rate": 1.0,
        "stderr": 0.0,
    }
    # a gap of 0.01 is a win at tie_eps 1e-6 but a tie at tie_eps 0.05: (0 + 0.5) / 1
    assert win_rate([0.51], [0.5])["win_rate"] == 1.0
    assert win_rate([0.51], [0.5], tie_eps=0.05)["win_rate"] == 0.5
    # 1 loss, 1 tie: (0 + 0.5) / 2 = 0.25
    assert win_rate([0.0, 0.3], [1.0, 0.3])["win_rate"] == 0.25


def test_win_rate_empty_and_mismatch():
    assert win_rate([], []) == {"wins": 0, "ties": 0, "losses": 0, "n": 0, "win_rate": None, "stderr": None}
    with pytest.raises(ValueError, match="2 and 1"):
        win_rate([0.1, 0.2], [0.3])
    with pytest.raises(ValueError, match="tie_eps"):
        win_rate([0.1], [0.2], tie_eps=-1)


def test_mean_skips_missing():
    assert mean([1, None, 2]) == 1.5
    assert mean([None]) is None
    assert mean([]) is None


def test_answer_kl_hand_case():
    # (-1 + 1.5) + (-2 + 1) = -0.5; the masked third token (9 vs 3) never counts.
    # Second row: 0.25 + 0 = 0.25 (its mask covers both tokens).
    lp = torch.tensor([[-1.0, -2.0, 9.0], [-0.5, -0.1, float("nan")]])
    ref = torch.tensor([[-1.5, -1.0, 3.0], [-0.75, -0.1, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    torch.testing.assert_close(answer_kl(lp, ref, mask), torch.tensor([-0.5, 0.25]), rtol=1e-6, atol=0)
    assert answer_kl(lp, lp.nan_to_num(), mask).tolist() == [0.0, 0.0]


# ------------------------------------------------------------------------------------------ prompts
def test_demo_eval_prompts():
    prompts = load_eval_prompts("demo")
    assert len(prompts) == 120
    assert len({p.id for p in prompts}) == 120
    assert all(isinstance(p.harmful, bool) for p in prompts)
    assert any(p.harmful for p in prompts) and not all(p.harmful for p in prompts)
    first = prompts[0]
    assert first.messages == [{"role": "user", "content": first.text}]
    assert first.category is not None
    assert [p.id for p in load_eval_prompts("demo", limit=5)] == [p.id for p in prompts[:5]]


def test_spread_keeps_the_category_mix():
    # floor(i * n / k): n=10, k=4 -> 0, 2.5->2, 5, 7.5->7
    assert spread_indices(10, 4) == [0, 2, 5, 7]
    assert spread_indices(3, 5) == [0, 1, 2]
    first = load_eval_prompts("demo", limit=64)
    spread = load_eval_prompts("demo", limit=64, spread=True)
    assert len(spread) == 64 and spread[0].id == first[0].id
    # the demo file is sorted by category: the first 64 rows hold no harmful prompt, spread ones do
    assert not any(p.harmful for p in first)
    assert {p.category for p in spread} == {p.category for p in load_eval_prompts("demo")}


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_custom_prompts_file(tmp_path):
    path = write_lines(
        tmp_path / "p.jsonl",
        [
            json.dumps({"id": "a", "prompt": "Hi there?", "harmful": False}),
            "",
            json.dumps({"prompt": "How do I pick a lock?"}),
        ],
    )
    prompts = load_eval_prompts(path)
    assert [(p.id, p.text, p.harmful, p.category) for p in prompts] == [
        ("a", "Hi there?", False, None),
        ("line-3", "How do I pick a lock?", None, None),
    ]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ("{not json", r"line 2: is not valid JSON"),
        (json.dumps({"id": "b"}), r"line 2, field 'prompt': is missing"),
        (json.dumps({"id": "b", "prompt": 3}), r"line 2, field 'prompt': must be a non-empty string"),
        (json.dumps({"id": "b", "prompt": "ok", "harmful": "yes"}), r"line 2, field 'harmful'"),
        (json.dumps({"id": "a", "prompt": "again"}), r"line 2, field 'id': repeats id 'a' of line 1"),
        (json.dumps(["a list"]), r"line 2: is a JSON list"),
    ],
)
def test_bad_prompt_row_names_file_row_and_field(tmp_path, row, expected):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps({"id": "a", "prompt": "fine"}), row])
    with pytest.raises(DataError, match=expected) as err:
        load_eval_prompts(path)
    assert str(err.value).startswith(path)


def test_missing_or_empty_prompts_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_eval_prompts(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="holds no prompts"):
        load_eval_prompts(write_lines(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(ValueError, match="limit"):
        load_eval_prompts("demo", limit=0)


# ------------------------------------------------------------------------------------------ metrics
def test_series_last_row_per_step_wins_and_skips_non_finite():
    rows = [
        {"step": 1, "k": 0.5},
        {"step": 2, "k": 0.7},
        {"step": 1, "k": 0.4},
        {"step": 3, "k": float("nan")},
        {"step": 4, "other": 1.0},
        {"step": 5, "k": True},
    ]
    assert series(rows, "k") == ([1, 2], [0.4, 0.7])


def test_read_metrics_skips_bad_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/lo')  # a killed run's last line
    rows, notes = read_metrics(path)
    assert rows == [{"step": 1, "train/loss": 2.0}]
    assert "1 unreadable line" in notes[0]
    rows, notes = read_metrics(tmp_path / "absent.jsonl")
    assert rows == [] and "not found" in notes[0]


def test_md_escape():
    assert md_escape("a|b <i>") == r"a\|b &lt;i&gt;"
    assert md_escape("*x*\n_y_") == r"\*x\*<br>\_y\_"
    assert md_escape("abcdef", max_chars=3) == "abc …"


# ------------------------------------------------------------------------------------------- report
def write_metrics(stage_dir: Path, rows: list[dict]) -> Path:
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "metrics.jsonl").write_text("".join(json.dumps({"time": 0.0, **r}) + "\n" for r in rows))
    return stage_dir


def ppo_rows(n: int = 12) -> list[dict]:
    # the proxy keeps rising while gold peaks and falls: the over-optimisation picture
    return [
        {
            "step": s,
            "train/reward/score": 0.1 * s,
            "train/reward/total": 0.1 * s - 0.01 * s,
            "train/kl": 0.5 * s,
            "train/kl_coef": 0.1,
            "train/loss/policy": -0.01 * s,
            "train/loss/value": 1.0 / s,
            "train/gold/overall": 0.5 + 0.05 * s - 0.005 * s * s,
        }
        for s in range(1, n + 1)
    ]


def gold(overall: float) -> dict:
    return {"overall": overall, "consistency": 0.8, "engagingness": 0.5, "safety": 1.0, "relevance": 0.4}


def synthetic_results() -> dict:
    summary = {
        "path": "x",
        "gold": gold(0.6),
        "rm_score": 0.25,
        "kl_to_ref": 1.5,
        "length": 42.0,
        "finished": 0.9,
    }
    answers = {
        "base": {"text": "Use <script>alert(1)</script> here", "finished": True, "gold": gold(0.2)},
        "sft": {"text": "a | b | c\nsecond line", "finished": False, "gold": gold(0.5)},
        "ppo": {"text": "Plain answer.", "finished": True, "gold": gold(0.9)},
    }
    return {
        "order": ["base", "sft", "ppo"],
        "num_prompts": 2,
        "seed": 0,
        "reference": "run/sft/model",
        "reward_model": "run/rm/model",
        "kl_is_estimate": True,
        "sampling": {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "do_sample": True},
        # sorted keys, as eval_models.json stores them: "order" restores base -> sft -> ppo
        "models": {
            "base": summary,
            "ppo": {**summary, "kl_to_ref": 3.25},
            "sft": {**summary, "rm_score": None},
        },
        "win_rates": {"sft_vs_base": {"a": "sft", "b": "base", **win_rate([0.5, 0.7], [0.2, 0.7])}},
        "examples": [
            {
                "id": "q1",
                "category": "how-to",
                "prompt": "How do I use | in *bash*?",
                "harmful": False,
                "answers": answers,
            }
        ],
    }


def test_report_with_all_stages(tmp_path):
    stages = {
        "sft": write_metrics(
            tmp_path / "sft",
            [{"step": s, "train/loss": 3.0 / s} for s in range(1, 6)] + [{"step": 5, "eval/loss": 1.2}],
        ),
        "rm": write_metrics(
            tmp_path / "rm", [{"step": s, "train/loss": 0.69 - 0.01 * s} for s in range(1, 6)]
        ),
        "ppo": write_metrics(tmp_path / "ppo", ppo_rows()),
    }
    (tmp_path / "rm" / "eval.json").write_text(json.dumps({"stage": "rm", "accuracy": 0.855, "start": {}}))
    path = write_report(tmp_path, synthetic_results(), stages)
    md = path.read_text()
    for name in ("ppo_reward.png", "ppo_kl.png", "gold_vs_proxy.png", "losses.png"):
        png = tmp_path / "plots" / name
        assert png.read_bytes()[:8] == PNG_MAGIC, name
        assert f"(plots/{name})" in md
    # summary table in base -> sft -> ppo order, with every column; missing RM score shown as a dash
    table = [line for line in md.splitlines() if line.startswith("| **")]
    assert [line.split("|")[1].strip() for line in table] == ["**base**", "**sft**", "**ppo**"]
    assert table[2].split(" | ")[1:] == [
        "0.600",
        "0.800",
        "0.500",
        "1.000",
        "0.400",
        "0.250",
        "3.250",
        "42.0",
        "90.0 % |",
    ]
    assert "| 0.600 | 0.800 | 0.500 | 1.000 | 0.400 | – | 1.500 |" in table[1]
    # win-rate row: 1 win, 1 tie -> 75 %
    assert "| sft vs base | 75.0 % |" in md
    assert "accuracy 0.8550" in md
    # answers and prompts are escaped: no raw HTML, no stray table pipes
    assert "<script>" not in md
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md
    assert r"a \| b \| c<br>second line" in md
    assert r"How do I use \| in \*bash\*?" in md
    assert "## Notes" not in md


def test_report_without_ppo_or_results(tmp_path):
    stages = {
        "sft": write_metrics(
            tmp_path / "sft", [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.5}]
        ),
        "rm": tmp_path / "rm",
        "ppo": tmp_path / "ppo",
    }  # rm and ppo never ran
    md = write_report(tmp_path, None, stages).read_text()
    assert (tmp_path / "plots" / "losses.png").read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "plots" / "ppo_reward.png").exists()
    assert "## Notes" in md and "No held-out evaluation results" in md
    assert "metrics.jsonl` not found" in md
    assert "PPO reward: no `ppo` metrics" in md


def test_report_ppo_without_gold_and_empty_stages(tmp_path):
    write_report(tmp_path, None, {"ppo": write_metrics(tmp_path / "ppo", ppo_rows(3))})
    assert (tmp_path / "plots" / "gold_vs_proxy.png").exists()
    # the same run dir again, now without gold scores: the stale plot goes, a note says why
    rows = [{k: v for k, v in r.items() if k != "train/gold/overall"} for r in ppo_rows(3)]
    md = write_report(
        tmp_path, synthetic_results(), {"ppo": write_metrics(tmp_path / "ppo", rows)}
    ).read_text()
    assert (tmp_path / "plots" / "ppo_kl.png").exists()
    assert not (tmp_path / "plots" / "gold_vs_proxy.png").exists()
    assert "gold_vs_proxy.png" not in md and "Gold vs proxy: no `ppo` metrics" in md
    # evaluation results without any stage: no training-curve section, no notes about it
    md = write_report(tmp_path / "eval_only", synthetic_results(), {}).read_text()
    assert md.startswith("# chatrlhf run report") and "| **ppo** |" in md
    assert "Training curves" not in md and "## Notes" not in md
    md = write_report(tmp_path / "empty", {}, {}).read_text()
    assert "No held-out evaluation results" in md
