"""Process setup: join (or, alone, create) the process group, and tear it down."""

from __future__ import annotations

import os
import socket

import torch


def _skip_shm_comm_build() -> None:
    # DeepSpeed's CPU backend JIT-compiles a shared-memory allreduce op on first init (~80 s with a C++
    # toolchain on 2 cores). gloo is plenty for CPU runs, so skip it unless CHATRLHF_DS_SHM_COMM=1.
    # DeepSpeed caches the probe result in this module-level dict and reads it back, so the edit holds.
    if os.environ.get("CHATRLHF_DS_SHM_COMM") == "1":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _loopback_interface() -> str | None:
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in names if n == "lo" or n.startswith("lo")), None)


def init_distributed() -> tuple[int, int]:
    """Joins (or, alone, creates) the process group; returns ``(rank, world_size)``. Idempotent.

    One process (no launcher, or a launcher with one process) gets an in-memory store and its collective
    backend bound to the loopback interface: a single-process run opens no port reachable from the
    network. Under ``deepspeed``/``torchrun`` with several processes it joins their rendezvous. Backend:
    gloo on CPU, DeepSpeed's default (nccl) on GPUs.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() == "cpu":
        _skip_shm_comm_build()
        backend = "gloo"
        # Several processes on one CPU, each with a thread per core, oversubscribe it and every step gets
        # many times slower. torchrun sets OMP_NUM_THREADS=1; the deepspeed launcher does not.
        local_procs = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
        if local_procs > 1 and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_procs))
    else:
        accel.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = None
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        for key in ("RANK", "LOCAL_RANK"):  # DeepSpeed reads these
            os.environ.setdefault(key, "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        loopback = _loopback_interface()
        if loopback is not None:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", loopback)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed() -> None:
    """Waits for every process, then tears the process group down. A process that exits with the group
    still alive can abort in its C++ destructors (``terminate called without an active exception``)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
