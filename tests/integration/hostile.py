"""The harness of the bad-input tables (tests/integration/test_bad_inputs*.py, test_hostile_*.py).

A case writes its malformed input under its own ``tmp_path`` and returns argv for ``chatrlhf.cli.main``; it
must end with exit status 2 (or the case's own), no traceback, one error line naming what is wrong (file,
line, field or flag) and how to fix it, and every file that was on disk before (the inputs, a finished run
it points at, the shared tiny model) still there with the same bytes. Cases that plant a pickle check that
its payload (creating ``tmp_path/PWNED``) never ran. The shared fixtures (``tiny_model``, ``narrow_model``,
``sft_run``) are in tests/integration/conftest.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from chatrlhf.cli import main

MARKER = "PWNED"
WORDS = "the quick brown fox jumps over lazy dog good bad yes no answer question hello world".split()


def copy_rows(n: int) -> list[dict]:
    return [{"prompt": f"copy: {' '.join(WORDS[i % 8:i % 8 + 3])}", "response": " ".join(WORDS[i % 8:i % 8 + 3])}
            for i in range(n)]


def sft_flags(model: Path | str, data: Path | str, out: Path) -> list[str]:
    return [
        "--model.name_or_path", str(model), "--data.datasets", f"[{data}]", "--data.data_split", "1,0,0",
        "--data.eval_fraction", "0.25", "--run.output_dir", str(out), "--run.progress", "false",
        "--engine.micro_batch_size", "2", "--max_steps", "2", "--run.save_every", "1",
    ]  # fmt: skip


# ----------------------------------------------------------------------------- case helpers
@dataclass
class Env:
    """What a case builder gets: its own dir and the shared (read-only) tiny model and SFT run."""

    root: Path
    model: Path
    narrow_model: Path
    sft_run: Path

    def write(self, name: str, text: str) -> Path:
        path = self.root / name
        path.write_text(text)
        return path

    def jsonl(self, name: str, rows: list) -> Path:
        """Rows as JSON lines; a str row is written verbatim (a malformed line)."""
        return self.write(name, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))

    def sft(self, *extra: str, data: Path | None = None, model: Path | None = None) -> list[str]:
        data = data or self.jsonl("copy.jsonl", copy_rows(16))
        return ["sft", *sft_flags(model or self.model, data, self.root / "out"), *extra]

    def model_copy(self) -> Path:
        return Path(shutil.copytree(self.model, self.root / "model"))

    def run_copy(self) -> Path:
        """A copy of the finished SFT run, to tamper with and resume."""
        return Path(shutil.copytree(self.sft_run, self.root / "run"))

    def resume(self, run: Path, *extra: str, model: Path | None = None) -> list[str]:
        data = self.jsonl("copy.jsonl", copy_rows(16))
        flags = sft_flags(model or self.model, data, run)
        return ["sft", *flags, "--run.resume", "true", *extra]

    def rl(self, command: str, *extra: str) -> list[str]:
        return [command, "--model.name_or_path", str(self.model), "--run.output_dir", str(self.root / "out"),
                "--run.progress", "false", "--generation.max_new_tokens", "4", *extra]


class Evil:
    """Unpickling this calls ``open(path, "w")``: the marker file exists only if a loader ran the pickle."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant_pickle(env: Env, path: Path) -> None:
    torch.save({"weight": Evil(env.root / MARKER)}, path)


def tamper_checkpoint(run: Path, name: str, content: bytes | None) -> None:
    """Replaces (or, with None, deletes) one file of step-1 and rewrites the manifest to match, so the
    checkpoint still counts as complete and resume really reads the damaged file."""
    step = run / "checkpoints" / "step-1"
    manifest = json.loads((step / "manifest.json").read_text())
    if content is None:
        (step / name).unlink()
        manifest["files"].pop(name)
    else:
        (step / name).write_bytes(content)
        manifest["files"][name] = len(content)
    (step / "manifest.json").write_text(json.dumps(manifest))


def pickle_bytes(env: Env) -> bytes:
    scratch = env.root / "payload.pt"
    plant_pickle(env, scratch)
    data = scratch.read_bytes()
    scratch.unlink()
    return data



@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Env], list[str]]
    """Writes the malformed input under ``env.root``; returns argv for ``chatrlhf.cli.main``."""
    expect: tuple[str, ...]
    """Substrings of the error line: what is wrong (file / line / field / flag) and the fix."""
    missing: str = ""
    """Set where the message or behaviour is still missing: the case is an expected failure, and says where."""



# ----------------------------------------------------------------------------- runner and checks
def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """``main(argv)`` in this process: (exit status, stderr). A SystemExit (from argument parsing) counts
    as its status; any other exception escaping ``main`` is what a user would see as a traceback."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
    except Exception as err:  # noqa: BLE001 - reported as the failure it is
        pytest.fail(f"main({argv}) raised {type(err).__name__} (a traceback for the user): {err}")
    return code, capsys.readouterr().err


def snapshot(*roots: Path) -> dict[Path, str]:
    """sha256 of every file under ``roots``."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for root in roots for p in sorted(root.rglob("*"))
            if p.is_file()}


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("chatrlhf") and ": error: " in line]
    assert len(lines) == 1, f"expected one 'chatrlhf ...: error:' line in stderr:\n{stderr}"
    return lines[0]




def param(case: Case):
    marks = [pytest.mark.xfail(reason=case.missing, strict=True)] if case.missing else []
    return pytest.param(case, id=case.id, marks=marks)


def check_case(case: Case, env: Env, capsys, code_expected: int = 2) -> str:
    """Runs one case and checks it failed clearly and changed nothing; returns the error line."""
    argv = case.build(env)
    before = snapshot(env.root, env.model, env.sft_run)
    code, stderr = run_cli(argv, capsys)
    assert code == code_expected, f"exit status {code}, stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    line = error_line(stderr)
    for part in case.expect:
        assert part in line, f"{part!r} not in the error line:\n{line}"
    assert not (env.root / MARKER).exists(), "a planted pickle or remote code was executed"
    after = snapshot(env.root, env.model, env.sft_run)
    changed = [str(p) for p, digest in before.items() if after.get(p) != digest]
    assert not changed, f"files overwritten or deleted: {changed}"
    return line
