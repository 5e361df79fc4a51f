"""Metrics: peak memory during a block, fidelity of next-token distributions."""

from __future__ import annotations

import os

import torch

__all__ = ["PeakMemory", "fidelity", "status_kib"]


def status_kib(field: str) -> int | None:
    """A KiB field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ``VmSize``); None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak bytes allocated inside the block, above what was live when it started.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU (Linux): the process's resident-set high-water mark
    (VmHWM), reset at entry through ``/proc/self/clear_refs``; it includes allocator slack, so it is an upper
    bound of the tensors' peak. ``peak_bytes`` is None where neither is available.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_bytes: int | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = None
            try:
                with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
                    f.write("5")
                self._base = status_kib("VmRSS")
            except OSError:
                self._base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device) - self._base)
        elif self._base is not None:
            hwm = status_kib("VmHWM")
            self.peak_bytes = None if hwm is None else max(0, (hwm - self._base) * 1024)
        return False


def fidelity(ref_logits: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """Mean KL(ref || method) of next-token distributions and top-1 agreement, over positions ``[n, vocab]``."""
    if ref_logits.shape != logits.shape:
        raise ValueError(f"logits shapes differ: {tuple(ref_logits.shape)} vs {tuple(logits.shape)}")
    lp = torch.log_softmax(ref_logits.double(), -1)
    lq = torch.log_softmax(logits.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).clamp_min(0).mean().item()
    top1 = (ref_logits.argmax(-1) == logits.argmax(-1)).double().mean().item()
    return kl, top1
