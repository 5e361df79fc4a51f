"""Sink + window + blockwise strided attention (LongGen).

Paper: LongGen, "A Little Goes a Long Way: Efficient Long Context Training and Inference with Partial
Contexts" (Ge et al., ICLR 2025, https://arxiv.org/abs/2410.01485), whose sparse layers use attention sinks, a
local window and blockwise strided ("Sparse Transformer"-style) attention.

Query block ``i`` attends to the kv blocks holding the first ``sink`` real tokens, the blocks within ``window``
tokens, and every block ``j`` with ``(i - j) % stride == 0`` (block units). Exact at block level (the pattern is
defined on blocks); the token-level causal rule applies.

Departures: LongGen trains with these layers in the model; here they are applied training-free to every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int
from ..layout import BlockLayout
from ..registry import register
from . import _slow
from .base import Geometry, PrefillPattern

__all__ = ["StridedWindow"]


@register(
    "strided_window",
    "prefill",
    paper="LongGen (Ge et al., ICLR 2025) https://arxiv.org/abs/2410.01485",
    summary="attention sinks + local window + every stride-th block",
)
@dataclass(frozen=True)
class StridedWindow(PrefillPattern):
    """Sink blocks, window blocks and strided blocks."""

    sink: int = 64
    window: int = 1024
    stride: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.sink, "sink", 0)
        check_int(self.window, "window")
        check_int(self.stride, "stride")

    def layout(self, q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None = None) -> BlockLayout:
        geo = Geometry(q.shape[2], k.shape[2], self.block_size, q.device)
        qb_abs = geo.q_lo // self.block_size  # kv-block index of each q block's first query
        strided = ((qb_abs[:, None] - geo.kb[None, :]) % self.stride) == 0
        m = (geo.local_blocks(self.window) | strided)[None, None] | geo.sink_blocks(self.sink, key_valid, q.shape[0])
        m = m & geo.causal_blocks()
        return BlockLayout.from_block_mask(m, block_size=self.block_size, q_len=geo.q_len, kv_len=geo.kv_len)

    examples = ({"sink": 8, "window": 20, "stride": 3, "block_size": 16},)
    full_example = {"stride": 1, "window": 1, "block_size": 16}

    def reference_mask(self, q, k, key_valid=None):
        """Loop by loop: a kv block is kept for a query block when one of its pairs is inside the window, it
        holds a sink, or it lies a multiple of ``stride`` blocks before the query block; pairs causal."""
        b, nq, nk, bs = q.shape[0], q.shape[2], k.shape[2], self.block_size
        off = nk - nq
        nqb, nkb = -(-nq // bs), -(-nk // bs)
        sel = torch.zeros(b, 1, nqb, nkb, dtype=torch.bool)
        for bi in range(b):
            f = _slow.first(key_valid, bi)
            for i in range(nqb):
                q_lo, q_hi = i * bs + off, min((i + 1) * bs, nq) - 1 + off
                for j in range(q_hi // bs + 1):
                    in_win = any(qq - kk < self.window for qq in range(q_lo, q_hi + 1)
                                 for kk in range(j * bs, min((j + 1) * bs, nk)) if kk <= qq)
                    sink = self.sink > 0 and f // bs <= j <= (f + self.sink - 1) // bs
                    sel[bi, 0, i, j] = in_win or sink or (q_lo // bs - j) % self.stride == 0
        return _slow.blocks_to_tokens(sel, nq, nk, off, bs)
