"""Hierarchical top-k pruning of key blocks (HiP Attention).

Paper: HiP, "A Training-Free Context Extension via Hierarchically Pruned Attention" (Lee et al., ICLR 2025,
https://arxiv.org/abs/2406.09827).

For each query block, the causally visible kv blocks (from the row's first real one) are split into ``topk``
ranges; each iteration splits every
surviving range in two, scores each half by its representative (the mean-pooled key of the half's middle block)
against the mean-pooled query block, and keeps the ``topk`` best halves, until every range is one block. Cost:
``O(n_q_blocks * topk * log(n_kv_blocks))`` dot products after O(N) pooling — the full block grid is never scored.
Sinks and the diagonal block are always kept.

Departures: HiP works per query block of the kernel but uses the first token of each branch as its
representative and a fixed branching of two; here the representative is the middle block's mean key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..checks import check_int
from ..layout import BlockLayout
from ..padding import first_real
from ..registry import register
from . import _slow
from .base import Geometry, PrefillPattern, finish_blocks, pool_blocks

__all__ = ["Hierarchical"]


@register(
    "hierarchical",
    "prefill",
    paper="HiP Attention (Lee et al., ICLR 2025) https://arxiv.org/abs/2406.09827",
    summary="tree search: halve candidate block ranges, keep top-k by representative keys, O(N log N)",
)
@dataclass(frozen=True)
class Hierarchical(PrefillPattern):
    """Top-k kv blocks per query block by hierarchical range pruning."""

    topk: int = 16
    sink: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.topk, "topk")
        check_int(self.sink, "sink", 0)

    def layout(self, q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None = None) -> BlockLayout:
        bs = self.block_size
        b, hq, nq, d = q.shape
        hk = k.shape[1]
        g = hq // hk
        geo = Geometry(nq, k.shape[2], bs, q.device)
        qp, _ = pool_blocks(q, bs)  # [b, hq, nqb, d]
        kp, has = pool_blocks(k, bs, key_valid)  # [b, hk, nkb, d]
        K = self.topk
        n_vis = (geo.last_kb + 1).view(1, 1, -1, 1)  # visible blocks per q block
        fb = (first_real(key_valid, b, q.device) // bs).view(b, 1, 1, 1)  # first block with a real key
        t = torch.arange(K + 1, device=q.device).view(1, 1, 1, -1)
        span = (n_vis - fb).clamp_min(1)
        edges = fb + (t * span) // K  # K equal ranges of [first real block, n_vis)
        lo = edges[..., :-1].expand(b, hq, -1, -1)
        hi = edges[..., 1:].expand(b, hq, -1, -1)
        kvh = (torch.arange(hq, device=q.device) // g).view(1, hq, 1, 1)
        bi = torch.arange(b, device=q.device).view(b, 1, 1, 1)
        scale = 1.0 / math.sqrt(d)
        while bool(((hi - lo) > 1).any()):
            mid = (lo + hi) // 2
            clo = torch.cat([lo, mid], -1)
            chi = torch.cat([mid, hi], -1)
            rep = ((clo + chi - 1) // 2).clamp(min=0, max=geo.nkb - 1)
            s = (qp.unsqueeze(3) * kp[bi, kvh, rep]).sum(-1) * scale  # [b, hq, nqb, 2K]
            s = s.masked_fill((chi <= clo) | ~has[bi, 0, rep], float("-inf"))
            best = s.topk(K, dim=-1).indices
            lo, hi = clo.gather(-1, best), chi.gather(-1, best)
        sel = torch.zeros(b, hq, geo.nqb, geo.nkb + 1, dtype=torch.bool, device=q.device)
        idx = torch.where(hi - lo == 1, lo, torch.full_like(lo, geo.nkb))
        sel.scatter_(-1, idx, True)
        m = finish_blocks(sel[..., : geo.nkb], geo, self.sink, key_valid, q)
        return BlockLayout.from_block_mask(m, block_size=bs, q_len=nq, kv_len=geo.kv_len)

    examples = ({"topk": 3, "sink": 8, "block_size": 16},)
    full_example = {"topk": 20, "block_size": 16}

    def reference_mask(self, q, k, key_valid=None):
        """Loop by loop: per query block, ``topk`` ranges splitting the visible kv blocks (from the row's first
        real block); each round halves every range and keeps the ``topk`` halves whose representative (middle)
        block scores best (pooled q . pooled k); at single blocks they are the selection; plus sinks and diagonal."""
        bs, d, nq, nk = self.block_size, q.shape[-1], q.shape[2], k.shape[2]
        nqb, nkb = -(-nq // bs), -(-nk // bs)

        def rows(bi, h, qh, kh, ok, off):
            qp, kp = _slow.pooled(qh, nqb, bs), _slow.pooled(kh, nkb, bs, ok)
            chosen = set()
            for i in range(nqb):
                nvis = (min((i + 1) * bs, nq) - 1 + off) // bs + 1
                K = self.topk
                fb = _slow.first(key_valid, bi) // bs
                span = max(nvis - fb, 1)
                ranges = [(fb + (t * span) // K, fb + ((t + 1) * span) // K) for t in range(K)]
                while any(hi - lo > 1 for lo, hi in ranges):
                    cand = []
                    for lo, hi in ranges:
                        mid = (lo + hi) // 2
                        cand += [(lo, mid), (mid, hi)]
                    scored = []
                    for n_, (lo, hi) in enumerate(cand):
                        rep = min(max((lo + hi - 1) // 2, 0), nkb - 1)
                        good = hi > lo and kp[rep] is not None
                        scored.append((float(qp[i] @ kp[rep]) / math.sqrt(d) if good else float("-inf"), -n_, (lo, hi)))
                    ranges = [r for _, _, r in sorted(scored, reverse=True)[:K]]
                chosen |= {(i, lo) for lo, hi in ranges if hi - lo == 1}
            return chosen

        return _slow.estimated_blocks(self, q, k, key_valid, rows)
