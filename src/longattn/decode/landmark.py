"""Landmark-style block retrieval, training-free: each block's mean key is its landmark.

Paper: "Landmark Attention: Random-Access Infinite Context Length for Transformers" (Mohtashami & Jaggi,
NeurIPS 2023, https://arxiv.org/abs/2305.16300). The paper *trains* a landmark token per block whose attention
score gates the block; this is the training-free variant (say so in results): the landmark of a block of
``block_size`` tokens is the mean of its keys (``cache.PageMeta`` sums, incremental), a block's score is
``q . landmark`` summed over the query heads of the kv head's group, and the top blocks within ``budget`` are
attended exactly. The first block holding a real token (attention sinks) and the newest block are always attended.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int
from ..padding import first_real
from ..registry import register
from . import _slow
from .base import DecodeSelector, Step, page_has_valid, top_with_forced

__all__ = ["Landmark"]


@register("landmark", "decode",
          paper="Landmark Attention (Mohtashami & Jaggi, NeurIPS 2023) https://arxiv.org/abs/2305.16300",
          summary="training-free: mean key of each block as its landmark, top-k blocks per step")
@dataclass(frozen=True)
class Landmark(DecodeSelector):
    """Block retrieval by mean-key landmarks (training-free variant of Landmark Attention)."""

    examples = ({"budget": 64, "block_size": 16},)
    full_example = {"budget": 4096, "block_size": 16}

    block_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.block_size, "block_size")
        if self.budget < 2 * self.block_size:
            raise ValueError(f"budget ({self.budget}) must be >= 2 * block_size ({2 * self.block_size}): the first "
                             "and the newest block are always attended")

    def reference_select(self, step: Step, prefill_q=None) -> dict:
        """Loop by loop: a block's landmark is its mean key; its score, the sum over the group's query heads of
        q . landmark; the first block holding a real token, the newest and the best others."""
        b, hq = step.q.shape[:2]
        hk = step.k.shape[1]
        g = hq // hk
        out = {}
        for bi in range(b):
            for h in range(hk):
                means = _slow.block_means(step, bi, h, self.block_size)
                sc = [float("-inf") if m is None else sum(float(step.q[bi, h * g + j, 0].double() @ m) for j in range(g))
                      for m in means]
                forced = [_slow.first_real(step.key_valid, bi) // self.block_size, len(sc) - 1]
                out[bi, h] = _slow.tokens_of(_slow.top(sc, self.budget // self.block_size, forced), self.block_size,
                                             step.n)
        return out

    def block_scores(self, step: Step) -> torch.Tensor:
        meta = step.layer.page_meta(self.block_size)
        s = torch.matmul(step.grouped_q(), meta.kmean().transpose(-1, -2)).sum(2)  # [b, hk, blocks]
        ok = page_has_valid(step.key_valid, self.block_size, step.n)
        if ok is not None:
            s = s.masked_fill(~ok[:, None, :], float("-inf"))
        return s

    def select_pages(self, step: Step):
        s = self.block_scores(step)
        forced = torch.zeros_like(s, dtype=torch.bool)
        first = first_real(step.key_valid, s.shape[0], s.device) // self.block_size  # first block with a real token
        forced.scatter_(-1, first.view(-1, 1, 1).expand(-1, s.shape[1], 1), True)
        forced[..., -1] = True
        return top_with_forced(s, self.budget // self.block_size, forced), self.block_size
