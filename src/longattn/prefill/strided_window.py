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
