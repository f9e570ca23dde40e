"""tests/gpu: checks that need a CUDA device, run by bench/gpu_check.sh on the GPU machine. Every test here
carries the ``cuda`` marker and skips on a machine without CUDA (so the CPU suite collects them and moves on).
"""

import pytest


def pytest_configure(config):
    # pyproject.toml registers the suite's other markers; this directory brings its own.
    config.addinivalue_line("markers", "cuda: needs a CUDA device (bench/gpu_check.sh runs these on the GPU machine)")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny random Llama of the CPU tests (2 layers, 64 wide, pad == eos), with untied embeddings: a tied
    random model only repeats its last input token."""
    from chatrlhf.models.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", seed=0, tie_word_embeddings=False)
