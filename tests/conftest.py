import os

# Tests never touch the network: any hub lookup must fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The exact tests run in fp32 whatever the CPU: --run.precision auto would pick bf16 on AMX machines. Tests
# of mixed precision ask for it by name.
os.environ.setdefault("CHATRLHF_PRECISION", "fp32")

import torch  # noqa: E402

# The tests use tiny models, where thread start-up costs more than it saves, and a 2-core machine
# shared with subprocesses (launcher tests) slows down badly when OpenMP threads oversubscribe it.
torch.set_num_threads(1)
