"""Tri-shape prefill pattern: A-shape (sinks + local window) plus dense attention for the last queries.

Paper: SCBench / MInference tri-shape (Li et al., "SCBench: A KV Cache-Centric Analysis of Long-Context
Methods", ICLR 2025, https://arxiv.org/abs/2412.10319), built on the A-shape of MInference 1.0
(https://arxiv.org/abs/2407.02490).

The last ``last_q`` queries of the prompt (where the question usually is) attend to every earlier key; all
other queries use sink + window. Departures: block granularity as in ``sink_window``; every query of a block
that holds one of the last ``last_q`` queries is dense (up to ``block_size - 1`` more dense queries).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int
from ..layout import BlockLayout
from ..registry import register
from .base import Geometry
from .sink_window import SinkWindow

__all__ = ["TriShape"]


@register(
    "tri_shape",
    "prefill",
    paper="SCBench tri-shape (Li et al., ICLR 2025) https://arxiv.org/abs/2412.10319",
    summary="A-shape + the last queries dense",
)
@dataclass(frozen=True)
class TriShape(SinkWindow):
    """Sink + window, and the last ``last_q`` queries dense."""

    last_q: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.last_q, "last_q")

    def layout_for(self, q_len: int, kv_len: int, device=None, first: torch.Tensor | None = None) -> BlockLayout:
        a = super().layout_for(q_len, kv_len, device=device, first=first).to_block_mask()
        geo = Geometry(q_len, kv_len, self.block_size, device)
        dense_q = geo.q_hi >= kv_len - self.last_q  # q blocks holding one of the last queries
        m = a | (dense_q[:, None] & geo.causal_blocks())[None, None]
        return BlockLayout.from_block_mask(m, block_size=self.block_size, q_len=q_len, kv_len=kv_len)

    examples = ({"sink": 8, "window": 24, "last_q": 20, "block_size": 16},)
    full_example = {"window": 200, "block_size": 16}

    def _reference_extra(self, sel, nq: int, nk: int) -> None:
        """A query block holding one of the last ``last_q`` queries is dense (causal)."""
        off, bs = nk - nq, self.block_size
        for i in range(nq):
            if i + off >= nk - self.last_q:
                sel[i // bs, : (i + off) // bs + 1] = True
