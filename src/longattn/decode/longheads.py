"""LongHeads: context chunks distributed over heads, each head attending within an in-distribution length.

Paper: "LongHeads: Multi-Head Attention is Secretly a Long Context Processor" (Lu et al., Findings of EMNLP
2024, https://arxiv.org/abs/2402.10685). The cache is cut into chunks of ``chunk`` tokens, each summarised by
a representation (here the mean key, ``cache.PageMeta``). Every *query head* picks its own chunks: the first
chunk (attention sinks) and the newest chunk always, plus the chunks of highest query-chunk affinity
``q . repr``, for ``budget // chunk`` chunks in all; so each head reads at most ``budget`` tokens — keep
``budget`` within the model's training length — while the heads together cover far more of the context.

Departures: the chunk representation is the mean key (the paper builds it from the chunk's keys weighted by
their attention); the cached keys keep their original rotary positions (the paper re-assigns positions so the
selected chunks look contiguous; with rotated keys in the cache that would need re-rotation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int
from ..padding import first_real
from ..registry import register
from . import _slow
from .base import DecodeSelector, Step, page_has_valid, top_with_forced

__all__ = ["LongHeads"]


@register("longheads", "decode", paper="LongHeads (Lu et al., EMNLP Findings 2024) https://arxiv.org/abs/2402.10685",
          summary="chunks distributed over query heads by query-chunk affinity; each head within its budget")
@dataclass(frozen=True)
class LongHeads(DecodeSelector):
    """Per-query-head chunk selection by query-chunk affinity."""

    renamed = {"chunk_size": "chunk"}  # old spellings, accepted with a FutureWarning

    examples = ({"budget": 64, "chunk": 16},)
    full_example = {"budget": 4096, "chunk": 16}

    chunk: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.chunk, "chunk")
        if self.budget < 2 * self.chunk:
            raise ValueError(f"budget ({self.budget}) must be >= 2 * chunk ({2 * self.chunk}): the first "
                             "and the newest chunk are always attended")

    def reference_select(self, step: Step, prefill_q=None) -> dict:
        """Loop by loop, per *query* head: a chunk's score is q . (its mean key); the first chunk holding a real
        token, the newest and the best others, ``budget // chunk``."""
        b, hq = step.q.shape[:2]
        hk = step.k.shape[1]
        g = hq // hk
        out = {}
        for bi in range(b):
            for h in range(hq):
                means = _slow.block_means(step, bi, h // g, self.chunk)
                sc = [float("-inf") if m is None else float(step.q[bi, h, 0].double() @ m) for m in means]
                forced = [_slow.first_real(step.key_valid, bi) // self.chunk, len(sc) - 1]
                out[bi, h] = _slow.tokens_of(_slow.top(sc, self.budget // self.chunk, forced), self.chunk, step.n)
        return out

    def select_pages(self, step: Step):
        b, hq = step.q.shape[:2]
        hk = step.k.shape[1]
        meta = step.layer.page_meta(self.chunk)
        reps = meta.kmean().repeat_interleave(hq // hk, dim=1)  # [b, hq, chunks, d]
        s = torch.matmul(step.q.float(), reps.transpose(-1, -2))[:, :, 0]  # [b, hq, chunks]
        ok = page_has_valid(step.key_valid, self.chunk, step.n)
        if ok is not None:
            s = s.masked_fill(~ok[:, None, :], float("-inf"))
        forced = torch.zeros_like(s, dtype=torch.bool)
        first = first_real(step.key_valid, b, s.device) // self.chunk
        forced.scatter_(-1, first.view(-1, 1, 1).expand(-1, hq, 1), True)
        forced[..., -1] = True
        return top_with_forced(s, self.budget // self.chunk, forced), self.chunk
