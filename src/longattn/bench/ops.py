"""``longattn ops-bench``: op-level speed of block-sparse attention vs dense causal SDPA, in one process.

Every record carries the dense SDPA time measured in the same run on the same inputs; ``speedup`` is
``dense_ms / ms`` where ``ms`` includes the layout estimation (``est_ms``) and the kernel (``kernel_ms``).
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from ..layout import BlockLayout
from ..ops.block_sparse import block_sparse_attention, can_run
from ..prefill.sink_window import SinkWindow

__all__ = ["OpsBenchConfig", "run_ops", "PATTERNS"]

PATTERNS = ("sink_window", "random")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class OpsBenchConfig:
    patterns: tuple[str, ...] = PATTERNS
    lengths: tuple[int, ...] = (4096, 16384, 32768)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    heads: int = 8
    dim: int = 64
    backends: tuple[str, ...] = ("flex", "gather")
    block_size: int = 128
    repeats: int = 3
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        for p in self.patterns:
            if p not in PATTERNS:
                raise ValueError(f"--patterns: unknown pattern {p!r}; allowed: {', '.join(PATTERNS)}")
        for d in self.dtypes:
            if d not in DTYPES:
                raise ValueError(f"--dtypes: unknown dtype {d!r}; allowed: {', '.join(DTYPES)}")
        if not self.lengths or any(n < 128 for n in self.lengths):
            raise ValueError(f"--lengths must be integers >= 128, got {list(self.lengths)}")
        if self.heads < 1 or self.dim < 16:
            raise ValueError(f"--heads must be >= 1 and --dim >= 16, got {self.heads}, {self.dim}")


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def random_layout(n: int, heads: int, block_size: int, density: float, seed: int) -> BlockLayout:
    """Random causal block layout: each (q block, earlier kv block) kept with probability ``density``; the
    diagonal block is always kept so no query row is empty."""
    g = torch.Generator().manual_seed(seed)
    nb = -(-n // block_size)
    m = torch.rand(1, heads, nb, nb, generator=g) < density
    tri = torch.ones(nb, nb, dtype=torch.bool).tril()
    m = (m & tri) | torch.eye(nb, dtype=torch.bool)
    return BlockLayout.from_block_mask(m, block_size=block_size, seq_len=n)


def run_ops(cfg: OpsBenchConfig) -> list[dict]:
    from tqdm.auto import tqdm

    cfg.validate()
    recs = []
    combos = [(n, dt, p) for n in cfg.lengths for dt in cfg.dtypes for p in cfg.patterns]
    bar = tqdm(combos, desc="ops-bench", disable=not cfg.progress, file=sys.stderr)
    dense: dict[tuple[int, str], float] = {}
    with torch.no_grad():
        for n, dtn, pat in bar:
            bar.set_postfix_str(f"N={n} {dtn} {pat}")
            dt = DTYPES[dtn]
            g = torch.Generator().manual_seed(cfg.seed)
            q, k, v = (torch.randn(1, cfg.heads, n, cfg.dim, generator=g).to(dt) for _ in range(3))
            if (n, dtn) not in dense:  # the dense reference, same inputs, same run
                dense[n, dtn] = _time(partial(F.scaled_dot_product_attention, q, k, v, is_causal=True), cfg.repeats)
            dense_ms = dense[n, dtn]
            if pat == "sink_window":
                sw = SinkWindow(sink=64, window=1024, block_size=cfg.block_size)
                est_ms = _time(partial(sw.layout, q, k), cfg.repeats)
                layout = sw.layout(q, k)
            else:
                est_ms = 0.0
                layout = random_layout(n, cfg.heads, cfg.block_size, 0.1, cfg.seed)
            density = layout.density()
            for be in cfg.backends:
                ok, why = can_run(be, q, k, v, layout)
                if not ok:
                    print(f"ops-bench: skipping backend {be}: {why}", file=sys.stderr)
                    continue
                kernel_ms = _time(partial(block_sparse_attention, q, k, v, layout, backend=be), cfg.repeats)
                ms = est_ms + kernel_ms
                recs.append({
                    "op": "block_sparse", "pattern": pat, "N": n, "dtype": dtn, "heads": cfg.heads,
                    "dim": cfg.dim, "density": density, "recall": None, "backend": be, "est_ms": est_ms,
                    "kernel_ms": kernel_ms, "ms": ms, "dense_ms": dense_ms, "speedup": dense_ms / ms,
                })
    return recs
