"""The precision policy, in one place: exact fp32, or mixed precision (bf16 compute, fp32 master weights).

``auto`` picks mixed precision where the hardware runs bf16 well -- a CPU with ``amx_bf16`` or
``avx512_bf16`` (AMX: ~5.6x the fp32 matmul rate on the 2-core Xeons measured), a CUDA device with bf16
-- and exact fp32 elsewhere. ``CHATRLHF_PRECISION`` (``fp32`` or ``bf16``) overrides ``auto``, e.g. to keep
a test suite exact. The choice and its reason are printed at start and written to each stage's summary.

In mixed precision:
  * trained models keep fp32 weights and optimizer state; their forwards (and so their backwards) run
    under ``torch.autocast`` in bf16;
  * frozen models (reference, reward model, gold rater) are cast to bf16 and run as such;
  * the actor generates from a bf16 inference copy of its weights, refreshed after each update.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from typing import Literal

import torch

PrecisionChoice = Literal["auto", "fp32", "bf16"]
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
ENV = "CHATRLHF_PRECISION"


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``mode`` is what runs, ``reason`` says why (printed and logged)."""

    mode: Literal["fp32", "bf16"]
    reason: str
    device_type: str = "cpu"

    @property
    def mixed(self) -> bool:
        return self.mode == "bf16"

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of forwards: of trained models under autocast, and of frozen and inference copies."""
        return torch.bfloat16 if self.mixed else torch.float32

    @property
    def dtype_name(self) -> str:
        return "bfloat16" if self.mixed else "float32"

    def autocast(self):
        """Context for a trained model's forward: bf16 autocast when mixed, nothing when exact."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=torch.bfloat16)

    def summary(self) -> dict:
        return asdict(self)


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def hardware_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether ``device`` runs bf16 matmuls well, the evidence)."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(device)
        return ok, f"{name} {'supports' if ok else 'lacks'} bf16"
    if device.type == "cpu":
        found = sorted(cpu_flags() & set(CPU_BF16_FLAGS))
        if found:
            return True, f"CPU has {', '.join(found)}"
        return False, f"CPU lacks {' and '.join(CPU_BF16_FLAGS)} (bf16 would be emulated, slower than fp32)"
    return False, f"no bf16 policy for device type {device.type!r}"


def resolve_precision(choice: str, device: torch.device | str = "cpu") -> Precision:
    """``auto`` / ``fp32`` / ``bf16`` -> a :class:`Precision` with the reason for it."""
    device = torch.device(device)
    if choice not in ("auto", "fp32", "bf16"):
        raise ValueError(f"--run.precision must be auto, fp32 or bf16, got {choice!r}")
    if choice != "auto":
        return Precision(choice, f"--run.precision {choice}", device.type)
    forced = os.environ.get(ENV, "").strip()
    if forced:
        if forced not in ("fp32", "bf16"):
            raise ValueError(f"{ENV}={forced!r}: set it to fp32 or bf16, or unset it")
        return Precision(forced, f"auto: {ENV}={forced}", device.type)
    ok, why = hardware_bf16(device)
    return Precision("bf16" if ok else "fp32", f"auto: {why}", device.type)


def announce(precision: Precision) -> None:
    """Prints the resolved precision and its reason (call on rank 0)."""
    print(f"[chatrlhf] precision: {precision.mode} ({precision.reason})", flush=True)
