"""Every ``--loss_agg`` gives the same GRPO update on 2 processes as on 1: the normalisers (answer tokens and
answers of the whole mini-batch) are global, so data parallelism does not change the loss or the gradient."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatrlhf.models.tiny import build_tiny_llama

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "integration" / "agg_worker.py"
LAUNCHER = Path(sys.executable).with_name("deepspeed")


def run_worker(model: str, out: Path, world: int) -> dict:
    prefix = [str(LAUNCHER), "--num_gpus", "2", "--no_local_rank"] if world == 2 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CHATRLHF_PRECISION": "fp32"}
    proc = subprocess.run([*prefix, str(WORKER), "--model", model, "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.skipif(not LAUNCHER.exists(), reason="needs the deepspeed launcher")
def test_two_processes_equal_one_for_every_loss_aggregation(tmp_path):
    model = str(build_tiny_llama(tmp_path / "model"))
    one, two = run_worker(model, tmp_path / "one.json", 1), run_worker(model, tmp_path / "two.json", 2)
    assert (one["world"], two["world"]) == (1, 2)
    modes = [m for m in one if m != "world"]
    assert len(modes) == 4
    for mode in modes:
        for key, value in one[mode]["stats"].items():
            assert two[mode]["stats"][key] == pytest.approx(value, rel=1e-5, abs=1e-8), (mode, key)
        a, b = torch.tensor(one[mode]["delta"]), torch.tensor(two[mode]["delta"])
        assert a.abs().max() > 1e-6  # the step moved the weights
        # atol 1e-8: the weights are float32, so a change is resolved to about one ulp of the weight (~7e-9 near
        # 0.1); the gradients themselves differ only in the order of the all-reduce's additions
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-8)
    # the modes are different objectives: their updates differ far beyond the tolerance above
    base = torch.tensor(one["token-mean"]["delta"])
    for mode in modes[1:]:
        assert (torch.tensor(one[mode]["delta"]) - base).abs().max() > 100 * 1e-8 + 1e-4 * base.abs().max(), mode
