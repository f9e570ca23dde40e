"""Fixtures shared by the bad-input tables (hostile.py is their harness) and the browser tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from feedback_server import CHROMIUM, CHROMIUM_ARGS
from hostile import copy_rows, sft_flags

from chatrlhf.cli import main
from chatrlhf.models.tiny import build_tiny_llama


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's, driven by Playwright) for one test module."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def narrow_model(tmp_path_factory) -> Path:
    """Same tokenizer and layer count, half the hidden size: its weights cannot take the checkpoint's."""
    return build_tiny_llama(tmp_path_factory.mktemp("narrow") / "model", hidden_size=32, intermediate_size=64)


@pytest.fixture(scope="session")
def sft_run(tiny_model, tmp_path_factory) -> Path:
    """A finished tiny SFT run: model/ plus a complete checkpoint at step 1 (cases copy it before tampering)."""
    root = tmp_path_factory.mktemp("sft_run")
    data = root / "copy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in copy_rows(16)))
    out = root / "run"
    assert main(["sft", *sft_flags(tiny_model, data, out)]) == 0
    assert (out / "model" / "config.json").is_file() and (out / "checkpoints" / "step-1" / "manifest.json").is_file()
    return out


@pytest.fixture
def env(tmp_path, tiny_model, narrow_model, sft_run, monkeypatch):
    """A case's own dir (also the working dir: relative paths stay in it) and the shared inputs."""
    from hostile import Env

    monkeypatch.chdir(tmp_path)
    return Env(tmp_path, tiny_model, narrow_model, sft_run)
