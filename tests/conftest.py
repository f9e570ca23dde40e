import os

# Tests never touch the network: any hub lookup must fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The exact tests run in fp32 whatever the CPU: --run.precision auto would pick bf16 on AMX machines. Tests
# of mixed precision ask for it by name.
os.environ.setdefault("CHATRLHF_PRECISION", "fp32")

import pytest  # noqa: E402
import torch  # noqa: E402

# The tests use tiny models, where thread start-up costs more than it saves, and a 2-core machine
# shared with subprocesses (launcher tests) slows down badly when OpenMP threads oversubscribe it.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Back to one thread after each test: accelerate (under TRL's trainers) sets cores / processes threads when
    it finds a launcher's environment variables, and the exact-resume tests compare an in-process run with a
    fresh process's, whose reductions must run in the same order."""
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
