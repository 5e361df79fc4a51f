"""Long-range grouping attention (LRGT LGA).

Paper: "Long-Range Grouping Transformer for Multi-View 3D Reconstruction" (Yang et al., ICCV 2023,
https://arxiv.org/abs/2308.08724), long-range grouping attention (LGA).

The sequence is a concatenation of segments (views) of ``segment`` tokens, counted from each row's first real
token. Each segment is cut into chunks of ``chunk`` tokens; chunk ``c`` of every segment forms group ``c``, so a
group gathers tokens at the same place of every view (a stride of ``segment``), and attention stays inside a
group (causal here, for language models). The first ``sink`` real tokens are visible to all.

Departures: LGA samples a group's tokens with an interval inside each view (many small groups); here a group is
a contiguous chunk per view, which keeps block-level sparsity; LGA is non-causal, this is causal unless the op
is called with ``causal=False``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int
from ..layout import BlockLayout
from ..padding import first_real
from ..registry import register
from . import _slow
from .base import Geometry, PrefillPattern, group_layout

__all__ = ["LongRangeGrouping"]


@register(
    "long_range_grouping",
    "prefill",
    paper="LRGT LGA (Yang et al., ICCV 2023) https://arxiv.org/abs/2308.08724",
    summary="attention within groups formed by the same chunk of every segment (stride = segment)",
)
@dataclass(frozen=True)
class LongRangeGrouping(PrefillPattern):
    """Group = the same ``chunk`` of every ``segment``; attention within groups."""

    segment: int = 1024
    chunk: int = 128
    sink: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.segment, "segment", 2)
        check_int(self.chunk, "chunk")
        check_int(self.sink, "sink", 0)
        if self.chunk > self.segment:
            raise ValueError(f"chunk must be <= segment ({self.segment}), got {self.chunk}")

    def layout(self, q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None = None) -> BlockLayout:
        b, hq, nq, _ = q.shape
        nk = k.shape[2]
        geo = Geometry(nq, nk, self.block_size, q.device)
        first = first_real(key_valid, b, q.device)
        rel = (torch.arange(nk, device=q.device)[None, :] - first[:, None]).clamp_min(0)
        gr = ((rel % self.segment) // self.chunk)[:, None, :]  # [b, 1, nk]
        n_groups = -(-self.segment // self.chunk)
        return group_layout(gr, n_groups, geo, self.sink, key_valid, b)

    examples = ({"segment": 50, "chunk": 20, "sink": 3, "block_size": 16},)
    full_example = {"segment": 200, "chunk": 200, "block_size": 16}

    def reference_mask(self, q, k, key_valid=None):
        """Loop by loop: positions counted from the row's first real token; a token's group is its chunk index
        inside its segment (``(pos % segment) // chunk``), the same chunk of every segment; a query sees the keys
        of its group (causal) and, with ``sink``, the first ``sink`` real tokens."""
        b, hq, nq, nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        off = nk - nq
        m = torch.zeros(b, hq, nq, nk, dtype=torch.bool)
        for bi in range(b):
            f = _slow.first(key_valid, bi)
            for i in range(nq):
                for j in range(i + off + 1):
                    ri, rj = max(i + off - f, 0), max(j - f, 0)
                    gi, gj = (ri % self.segment) // self.chunk, (rj % self.segment) // self.chunk
                    m[bi, :, i, j] = gi == gj or (self.sink > 0 and f <= j < f + self.sink)
        return m
