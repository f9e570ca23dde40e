"""``training.logged_rows``: what a resumed RL run did before it stopped, read back from metrics.jsonl."""

import json

from chatrlhf.training import logged_rows


def test_rows_up_to_the_resume_step_without_prefix(tmp_path):
    rows = [{"step": 0, "data/prompts": 8}, {"step": 0, "eval/loss": 1.0}, {"step": 1, "train/kl": 0.1},
            {"step": 2, "train/kl": 0.2, "time": 5.0}, {"step": 3, "train/kl": 0.3}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert logged_rows(tmp_path, 2) == [{"kl": 0.1}, {"kl": 0.2}]
    assert logged_rows(tmp_path, 0) == [] and logged_rows(tmp_path / "none", 5) == []
