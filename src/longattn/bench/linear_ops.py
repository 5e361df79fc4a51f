"""``longattn ops-bench --linear``: chunked Lightning attention vs the naive quadratic linear attention vs causal
softmax SDPA, per length, in one process; ``us_per_token`` shows whether the cost per token stays flat.

The naive form materialises the N x N matrix (skipped above ``naive_max``), softmax SDPA is quadratic in time
(skipped above ``softmax_max``); skipped cells are reported as such, not extrapolated.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from ..ops.linear import lightning_attention, linear_attention_naive
from .ops import time_ms

__all__ = ["LinearBenchConfig", "run_linear_ops"]


@dataclass
class LinearBenchConfig:
    lengths: tuple[int, ...] = (1024, 4096, 16384, 65536, 131072)
    heads: int = 8
    dim: int = 64
    block_size: int = 64
    decay: float = 0.99
    repeats: int = 3
    naive_max: int = 8192
    softmax_max: int = 32768
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        if not self.lengths or any(n < 16 for n in self.lengths):
            raise ValueError(f"--lengths must be integers >= 16, got {list(self.lengths)}")
        if self.heads < 1 or self.dim < 1 or self.repeats < 1:
            raise ValueError(f"--heads, --dim and --repeats must be >= 1, got {self.heads}, {self.dim}, {self.repeats}")




def run_linear_ops(cfg: LinearBenchConfig) -> list[dict]:
    from tqdm.auto import tqdm

    cfg.validate()
    recs = []
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for n in tqdm(cfg.lengths, desc="ops-bench --linear", disable=not cfg.progress, file=sys.stderr):
            q, k, v = (torch.randn(1, cfg.heads, n, cfg.dim, generator=g) for _ in range(3))
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            runs = {"lightning": partial(lightning_attention, q, k, v, decay=cfg.decay, block_size=cfg.block_size)}
            if n <= cfg.naive_max:
                runs["naive"] = partial(linear_attention_naive, q, k, v, decay=cfg.decay)
            if n <= cfg.softmax_max:
                runs["softmax_sdpa"] = partial(F.scaled_dot_product_attention, q, k, v, is_causal=True)
            times = {name: time_ms(fn, cfg.repeats) for name, fn in runs.items()}
            for name in ("lightning", "naive", "softmax_sdpa"):
                ms = times.get(name)
                recs.append({"op": "linear", "pattern": name, "N": n, "dtype": "float32", "heads": cfg.heads,
                             "dim": cfg.dim, "density": None, "recall": None, "backend": "torch", "est_ms": 0.0,
                             "kernel_ms": ms, "block_size": cfg.block_size, "ms": ms,
                             "us_per_token": None if ms is None else ms * 1e3 / n,
                             "dense_ms": times.get("softmax_sdpa"),
                             "speedup": (times["softmax_sdpa"] / ms) if ms and "softmax_sdpa" in times else None})
    return recs


def linear_table(recs: list[dict]) -> str:
    from .report import _render

    def f(x, spec):
        return "skipped" if x is None else format(x, spec)

    head = ["impl", "N", "heads", "dim", "ms", "us/token", "vs softmax"]
    rows = [[r["pattern"], str(r["N"]), str(r["heads"]), str(r["dim"]), f(r["ms"], ".1f"), f(r["us_per_token"], ".2f"),
             "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"] for r in recs]
    return _render(head, rows)
