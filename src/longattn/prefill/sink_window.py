"""A-shape / sink + sliding window prefill pattern.

Papers: StreamingLLM, "Efficient Streaming Language Models with Attention Sinks" (Xiao et al., ICLR 2024,
https://arxiv.org/abs/2309.17453); the A-shape pattern of MInference 1.0 (Jiang et al., NeurIPS 2024,
https://arxiv.org/abs/2407.02490).

Each query attends to the first ``sink`` tokens and to the last ``window`` tokens before it.
Departures: selection is at block granularity: a query block gets every kv block that holds a sink token or
a token inside the window of any of its queries, so a query may see up to one block more than
``sink``/``window`` tokens on each side; the token-level causal rule is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int
from ..layout import BlockLayout
from ..registry import register
from . import _slow
from .base import PrefillPattern

__all__ = ["SinkWindow"]


@register(
    "sink_window",
    "prefill",
    paper="StreamingLLM (Xiao et al., ICLR 2024) https://arxiv.org/abs/2309.17453; MInference A-shape "
    "https://arxiv.org/abs/2407.02490",
    summary="attention sinks + local window (A-shape), block granularity",
)
@dataclass(frozen=True)
class SinkWindow(PrefillPattern):
    """Sink tokens + local window (A-shape)."""

    sink: int = 64
    window: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.sink, "sink", 0)
        check_int(self.window, "window")

    def layout(self, q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None = None) -> BlockLayout:
        first = None
        if key_valid is not None:  # left padding: the sinks are each row's first real tokens
            first = key_valid.to(torch.int8).argmax(-1)
        return self.layout_for(q.shape[2], k.shape[2], device=q.device, first=first)

    def layout_for(self, q_len: int, kv_len: int, device=None, first: torch.Tensor | None = None) -> BlockLayout:
        """Layout for the given lengths; ``first [b]`` = index of each row's first real token (left padding)."""
        bs = self.block_size
        nqb, nkb = -(-q_len // bs), -(-kv_len // bs)
        off = kv_len - q_len
        sink_blocks = -(-self.sink // bs)  # without padding
        qb = torch.arange(nqb, device=device)
        # the kv block holding the last query of each q block (aligned to the end), and the first one
        last_kb = (torch.clamp((qb + 1) * bs, max=q_len) - 1 + off) // bs
        # the oldest key any query of the block may see: window tokens back from its first query
        lo_kb = torch.clamp(qb * bs + off - self.window + 1, min=0) // bs
        kb = torch.arange(nkb, device=device)
        local = (kb[None, :] <= last_kb[:, None]) & (kb[None, :] >= lo_kb[:, None])  # [nqb, nkb]
        if first is None:
            m = (local | (kb[None, :] < sink_blocks))[None, None]
        else:
            first = first.to(device).long().view(-1, 1)
            lo = first // bs
            hi = (first + max(self.sink, 1) - 1) // bs
            sink = (kb[None, :] >= lo) & (kb[None, :] <= hi) if self.sink > 0 else torch.zeros_like(kb[None, :] < 0)
            m = (local[None] | sink[:, None, :])[:, None]  # [b, 1, nqb, nkb]
        return BlockLayout.from_block_mask(m, block_size=bs, q_len=q_len, kv_len=kv_len)

    examples = ({"sink": 8, "window": 40, "block_size": 16},)
    full_example = {"window": 200, "block_size": 16}

    def reference_mask(self, q, k, key_valid=None):
        """Loop by loop: a block is kept when one of its pairs is a sink (from the row's first real token) or
        inside the window; its pairs are then causal."""
        b, nq, nk, bs = q.shape[0], q.shape[2], k.shape[2], self.block_size
        off = nk - nq
        sel = torch.zeros(b, 1, -(-nq // bs), -(-nk // bs), dtype=torch.bool)
        for bi in range(b):
            f = _slow.first(key_valid, bi)
            for i in range(nq):
                for j in range(i + off + 1):
                    if f <= j < f + self.sink or (i + off) - j < self.window:
                        sel[bi, 0, i // bs, j // bs] = True
            self._reference_extra(sel[bi, 0], nq, nk)
        return _slow.blocks_to_tokens(sel, nq, nk, off, bs)

    def _reference_extra(self, sel, nq: int, nk: int) -> None:
        """More blocks of ``sel [nqb, nkb]`` (subclasses)."""
