"""chatrlhf.checkpoint and chatrlhf.tensor_files: atomic commit, the latest pointer, rotation, crash leftovers,
RNG, tensor trees, and refusing pickles; what a resume checks before loading (the strict pointer, the
manifest, the state-file schemas, non-finite tensors, bad RNG states, the RL extras)."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from chatrlhf import checkpoint as ckpt
from chatrlhf import tensor_files
from chatrlhf.algorithms.rl import AdaptiveKLController, RunningMoments
from chatrlhf.checkpoint_schema import TRAINER_STATE, Invalid, TensorMeta, check_fields


def write_one(payload: str):
    def write(tmp):
        (tmp / "data.json").write_text(json.dumps(payload))

    return write


def test_commit_renames_into_place_and_points_latest(tmp_path):
    path = ckpt.write_step_dir(tmp_path, 10, write_one("a"), keep_last=2)
    assert path == tmp_path / "step-10" and ckpt.is_complete(path)
    assert json.loads((tmp_path / "latest").read_text()) == {"dir": "step-10", "step": 10}
    assert json.loads((path / "manifest.json").read_text())["files"] == {"data.json": 3}
    assert ckpt.latest_checkpoint(tmp_path) == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-10"]  # no tmp-* left


def test_failed_write_keeps_previous_latest(tmp_path):
    ckpt.write_step_dir(tmp_path, 1, write_one("a"))

    def crash(tmp):
        (tmp / "half.json").write_text("{")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.write_step_dir(tmp_path, 2, crash)
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-1"]


def test_latest_ignores_incomplete_dirs_and_a_broken_pointer(tmp_path):
    ckpt.write_step_dir(tmp_path, 1, write_one("a"))
    ckpt.write_step_dir(tmp_path, 2, write_one("bb"))
    # step-3: copied by hand without its manifest; step-2: a file cut short after the commit
    (tmp_path / "step-3").mkdir()
    (tmp_path / "step-3" / "data.json").write_text("1")
    (tmp_path / "step-2" / "data.json").write_text("")
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-1"
    assert ckpt.latest_checkpoint(tmp_path / "nowhere") is None


def test_rotation_keeps_last_n_and_the_pointer_target(tmp_path):
    for step in (1, 2, 3):
        ckpt.write_step_dir(tmp_path, step, write_one(str(step)), keep_last=2)
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [2, 3]
    # a resumed run re-saves an older step: the pointer names it, so rotation keeps it with the newest
    ckpt.write_step_dir(tmp_path, 1, write_one("again"), keep_last=1)
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [1, 3]
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-1"
    with pytest.raises(ValueError, match="keep_last"):
        ckpt.write_step_dir(tmp_path, 4, write_one("x"), keep_last=0)


def test_old_checkpoint_survives_until_the_new_one_is_committed(tmp_path):
    ckpt.write_step_dir(tmp_path, 1, write_one("a"), keep_last=1)
    seen = []

    def write(tmp):
        seen.append(ckpt.latest_checkpoint(tmp_path))
        (tmp / "data.json").write_text("2")

    ckpt.write_step_dir(tmp_path, 2, write, keep_last=1)
    assert seen == [tmp_path / "step-1"]
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [2]


def test_resaving_a_step_replaces_it_whole(tmp_path):
    ckpt.write_step_dir(tmp_path, 5, write_one("old"))
    ckpt.write_step_dir(tmp_path, 5, write_one("new"))
    assert json.loads((tmp_path / "step-5" / "data.json").read_text()) == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-5"]


def test_stale_scratch_dirs_of_dead_writers_are_cleaned(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    (tmp_path / f"tmp-7-{dead_pid}").mkdir(parents=True)
    (tmp_path / f"tmp-7-{dead_pid}" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / f"trash-3-{dead_pid}").mkdir()
    (tmp_path / f".latest.tmp-{dead_pid}").write_text("{")  # a pointer write cut short
    (tmp_path / f".model.tmp-{dead_pid}").mkdir()  # a final-model save cut short
    alive = tmp_path / f"tmp-8-{os.getppid()}"  # another live process may be writing: leave it
    alive.mkdir()
    ckpt.write_step_dir(tmp_path, 9, write_one("a"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["latest", "step-9", alive.name])


def test_pointer_is_replaced_atomically(tmp_path):
    ckpt.write_json_atomic(tmp_path / "latest", {"step": 1})
    ckpt.write_json_atomic(tmp_path / "latest", {"step": 2})
    assert json.loads((tmp_path / "latest").read_text()) == {"step": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_tensor_tree_roundtrip(tmp_path):
    shared = torch.arange(6.0)
    tree = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}, 1: {"exp_avg": shared[:3]}},
        "param_groups": [
            {"lr": 1e-3, "betas": (0.9, 0.95), "params": [0, 1], "foreach": None, "amsgrad": False}
        ],
        "view_of_same": shared,
        "names": ["a", "b"],
        "__tensor__": "a plain key that looks like a tag",
        "odd_floats": [float("inf"), -float("inf"), float("nan")],
        "ints": torch.tensor([1, 2], dtype=torch.int64),
        "bf16": torch.ones(2, dtype=torch.bfloat16),
    }
    tensor_files.save_tensor_tree(tree, tmp_path, "opt")
    back = tensor_files.load_tensor_tree(tmp_path, "opt")
    assert set(back["state"]) == {0, 1}  # int keys survive JSON
    assert back["param_groups"] == tree["param_groups"] and isinstance(
        back["param_groups"][0]["betas"], tuple
    )
    for got, want in [
        (back["state"][0]["step"], tree["state"][0]["step"]),
        (back["state"][0]["exp_avg"], tree["state"][0]["exp_avg"]),
        (back["state"][1]["exp_avg"], shared[:3]),
        (back["view_of_same"], shared),
        (back["ints"], tree["ints"]),
        (back["bf16"], tree["bf16"]),
    ]:
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert back["names"] == ["a", "b"] and back["__tensor__"] == tree["__tensor__"]
    assert back["odd_floats"][:2] == [float("inf"), -float("inf")] and math.isnan(back["odd_floats"][2])


def test_tensor_tree_refuses_other_objects(tmp_path):
    class Scaler:
        cur_scale = 1.0

    with pytest.raises(TypeError, match=r"opt\.state\.loss_scaler: a .*Scaler cannot be stored"):
        tensor_files.save_tensor_tree({"state": {"loss_scaler": Scaler()}}, tmp_path, "opt")
    with pytest.raises(TypeError, match="dict key"):
        tensor_files.save_tensor_tree({(1, 2): 3}, tmp_path, "opt")


def test_weights_roundtrip_with_tied_tensors(tmp_path):
    emb = torch.randn(5, 3)
    flat = torch.randn(10)
    state = {"embed.weight": emb, "lm_head.weight": emb, "a": flat[:4], "b": flat[4:].view(2, 3)}
    tensor_files.save_weights(state, tmp_path / "model.safetensors")
    back = tensor_files.load_weights(tmp_path / "model.safetensors")
    assert set(back) == set(state)
    assert all(torch.equal(back[k], v) for k, v in state.items())
    assert back["embed.weight"].data_ptr() == back["lm_head.weight"].data_ptr()  # stored once


def test_rng_roundtrip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1), np.random.randn()  # noqa: B018 - advance, with a cached gaussian
    tensor_files.save_rng_state(tmp_path, rank=0)
    want = (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(4))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert tensor_files.load_rng_state(tmp_path, rank=0)
    got = (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(4))
    assert got[:3] == want[:3] and torch.equal(got[3], want[3])
    assert not tensor_files.load_rng_state(tmp_path, rank=1)  # no state for that rank: a warning, not a crash


def test_trainer_state_roundtrip(tmp_path):
    state = ckpt.TrainerState(step=12, epoch=1, step_in_epoch=2, samples_seen=96, extra={"kl_coef": 0.05})
    ckpt.save_trainer_state(tmp_path, state)
    assert ckpt.load_trainer_state(tmp_path) == state
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 1, "bogus": 2}))
    with pytest.raises(ckpt.CheckpointError, match="bogus"):
        ckpt.load_trainer_state(tmp_path)


class _Exploit:
    """Unpickling this runs code: it creates the file named by ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("name", ["optimizer.pt", "model.bin", "model.safetensors", "opt.pkl"])
def test_crafted_pickle_is_refused_without_running(tmp_path, name):
    marker = tmp_path / "pwned"
    evil = tmp_path / name
    evil.write_bytes(pickle.dumps({"weight": _Exploit(str(marker))}))
    # sanity: a plain pickle load would run it
    with open(evil, "rb") as f:
        pickle.load(f).get("weight").close()
    assert marker.exists()
    marker.unlink()

    with pytest.raises(ckpt.CheckpointError):
        tensor_files.load_tensors(evil)
    assert not marker.exists()


def test_crafted_pickle_in_place_of_checkpoint_files_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(1)}, tmp_path / "fine.pt")
    assert set(tensor_files.load_tensors(tmp_path / "fine.pt")) == {"w"}  # weights-only files still load
    tensor_files.save_tensor_tree({"x": torch.zeros(2)}, tmp_path, "optimizer")
    (tmp_path / "optimizer.safetensors").write_bytes(pickle.dumps(_Exploit(str(marker))))
    with pytest.raises(ckpt.CheckpointError, match="not a valid safetensors file"):
        tensor_files.load_tensor_tree(tmp_path, "optimizer")
    assert not marker.exists()


# ---- checking before loading: the pointer, the manifest, the state files, non-finite tensors ----------------


def test_resume_checkpoint_is_strict_where_latest_checkpoint_is_lenient(tmp_path):
    ckpt.write_step_dir(tmp_path, 1, write_one("a"))
    ckpt.write_step_dir(tmp_path, 2, write_one("bb"))
    assert ckpt.resume_checkpoint(tmp_path) == tmp_path / "step-2"
    (tmp_path / "step-2" / "data.json").write_text("")  # cut short after the commit
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-1"  # a look at what is there falls back
    with pytest.raises(ckpt.CheckpointError, match=r"step-2/data.json: 0 bytes, but manifest.json lists 4"):
        ckpt.resume_checkpoint(tmp_path)  # a resume says why, rather than silently going back a step
    (tmp_path / "step-2").rename(tmp_path / "moved-out")  # what the CLI's advice says to do
    assert ckpt.resume_checkpoint(tmp_path) == tmp_path / "step-1"
    (tmp_path / "latest").write_text('{"step": 2, "dir": "../moved-out"}')
    with pytest.raises(ckpt.CheckpointError, match=r"latest: field 'dir' must be the name of a step dir"):
        ckpt.resume_checkpoint(tmp_path)
    (tmp_path / "latest").unlink()  # a crash before the first pointer: the newest complete one
    assert ckpt.resume_checkpoint(tmp_path) == tmp_path / "step-1"
    (tmp_path / "latest").write_text('{"step": 0, "dir": "step-0"}')
    with pytest.raises(ckpt.CheckpointError, match=r"step-0, which does not exist, and no complete checkpoint is older"):
        ckpt.resume_checkpoint(tmp_path)


def test_manifest_must_name_files_inside_its_dir(tmp_path):
    path = ckpt.write_step_dir(tmp_path, 3, write_one("a"))
    (path / "manifest.json").write_text(json.dumps({"step": 3, "files": {"../latest": 30}}))
    with pytest.raises(ckpt.CheckpointError, match=r"field 'files' must be a file name inside the checkpoint dir"):
        ckpt.check_complete(path)
    assert not ckpt.is_complete(path)


@pytest.mark.parametrize("state, message", [
    ({"step": -1}, r"field 'step' must be an integer >= 0, got -1"),
    ({"step": True}, r"field 'step' must be an integer >= 0, got true"),
    ({"step": 2, "epoch": 1, "step_in_epoch": 1}, r"field 'step_in_epoch' must be below the steps per epoch"),
    ({"extra": {"a": [1.0, float("inf")]}}, r"field 'extra.a\[1\]' must be a finite number"),
    ({"step": None}, r"field 'step' must be an integer >= 0, got null"),
])
def test_trainer_state_schema(tmp_path, state, message):
    full = {"step": 2, "epoch": 0, "step_in_epoch": 2, "samples_seen": 0, "extra": {}, **state}
    with pytest.raises(ckpt.CheckpointError, match=message):
        ckpt.TrainerState(**check_fields(tmp_path / "trainer_state.json", full, TRAINER_STATE))
    # epoch 1 of 2 steps per epoch at step 3 is consistent (3 = 1 x 2 + 1); without world_size: 0
    ok = check_fields("t.json", {"step": 3, "epoch": 1, "step_in_epoch": 1, "samples_seen": 6, "extra": {}},
                           TRAINER_STATE)
    assert ok["world_size"] == 0 and ok["global_batch"] == 0


def test_trainer_state_file_with_a_duplicate_key_is_refused(tmp_path):
    (tmp_path / "trainer_state.json").write_text('{"step": 1, "step": 2}')
    with pytest.raises(ckpt.CheckpointError, match=r"key 'step' appears twice"):
        ckpt.load_trainer_state(tmp_path)


def test_non_finite_tensors_are_refused_by_name(tmp_path):
    weights = {"layer.weight": torch.ones(2, 2), "ids": torch.tensor([1, 2])}
    weights["layer.weight"][1, 0] = float("nan")
    tensor_files.save_weights(weights, tmp_path / "model.safetensors")
    with pytest.raises(ckpt.CheckpointError, match=r"model.safetensors: tensor 'layer.weight' holds NaN"):
        tensor_files.load_weights(tmp_path / "model.safetensors")
    tree = {"state": {0: {"exp_avg": torch.tensor([1.0, -float("inf")])}}, "param_groups": [{"params": [0]}]}
    tensor_files.save_tensor_tree(tree, tmp_path, "optimizer")
    assert tensor_files.tree_header(tmp_path, "optimizer")["state"][0]["exp_avg"] == TensorMeta("F32", (2,))
    with pytest.raises(ckpt.CheckpointError, match=r"optimizer.safetensors: tensor 'state.0.exp_avg' holds inf"):
        tensor_files.load_tensor_tree(tmp_path, "optimizer")


def test_bad_rng_state_changes_no_generator(tmp_path):
    torch.manual_seed(5)
    state = tensor_files.capture_rng_state()
    state["torch"] = torch.zeros_like(state["torch"])  # the right size, but no valid mt19937 state
    random.seed(1)
    want = random.random()
    random.seed(1)
    with pytest.raises(ckpt.CheckpointError, match=r"not a valid RNG state \(Invalid mt19937 state\)"):
        tensor_files.restore_rng_state(state, "rng.rank0.json")
    assert random.random() == want  # Python's generator was checked too, but not set
    state["numpy"]["state"]["key"] = state["numpy"]["state"]["key"][:10]
    with pytest.raises(ckpt.CheckpointError, match=r"field 'numpy.state.key' must be a list of 32-bit words of 624"):
        tensor_files.check_rng_state(state, "rng.rank0.json")


def test_rl_extras_refuse_non_finite_state_and_keep_theirs():
    kl = AdaptiveKLController(0.2, 6.0, 10000.0)
    with pytest.raises(Invalid, match=r"field 'value' must be a finite number, got \"abc\""):
        kl.load_state_dict({"value": "abc"})  # float("abc") would fail, but float("nan") would not
    with pytest.raises(Invalid, match=r"field 'value' must be a finite number"):
        kl.load_state_dict({"value": "nan"})
    moments = RunningMoments()
    moments.update(torch.tensor([1.0, 2.0]))
    with pytest.raises(Invalid, match=r"field 'm2' must be a finite number >= 0, got -1"):
        moments.load_state_dict({"count": 9.0, "mean": 1.0, "m2": -1})
    assert (moments.count, moments.mean, kl.value) == (2.0, 1.5, 0.2)  # nothing was set
