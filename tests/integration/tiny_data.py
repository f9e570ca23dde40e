"""Data and metric readers shared by the tiny-model integration tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = "the quick brown fox jumps over lazy dog good bad yes no answer question hello world".split()


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def copy_rows(n: int, seed: int = 0) -> list[dict]:
    """SFT rows whose answer repeats the prompt's words: a task a tiny model learns in a few steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6)))
        rows.append({"prompt": f"copy: {text}", "response": text})
    return rows


def train_rows(out: Path) -> dict[int, dict]:
    """step -> every training metric logged at it, timings left out. Each step must appear once."""
    rows = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        metrics = {k: v for k, v in row.items() if k.startswith("train/") and not k.startswith("train/time/")}
        if metrics:
            assert row["step"] not in rows, f"step {row['step']} logged twice"
            rows[row["step"]] = metrics
    return rows
