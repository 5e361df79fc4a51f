"""XAttention: block importance from antidiagonal sums of the attention logits, blocks kept up to a mass threshold.

Paper: "XAttention: Block Sparse Attention with Antidiagonal Scoring" (Xu et al., ICML 2025,
https://arxiv.org/abs/2503.16428); reference code https://github.com/mit-han-lab/x-attention. With a stride
``S``, the queries and keys are grouped into rows of ``S`` consecutive positions (absolute positions, from 0);
the score of query row ``r`` and key row ``c`` is the antidiagonal sum ``sum_t q[rS + S-1-t] . k[cS + t]``
scaled by ``1/(sqrt(d) S)`` (the paper's "inverse" selection), softmaxed over the key rows ``c <= r``. A
block's importance is the sum of these probabilities over its ``block_size/S`` query rows and key rows. Per
query block, the first block (the sinks) and the diagonal block are kept first, then the others in descending
importance while the kept importance is below ``threshold`` of the row's total (the block that crosses it is
kept).

Departures: rows padded out of the sequence (``key_valid``) contribute zeros and key rows without any real key
are left out of the softmax; the first block is the one holding the row's first real token (``sink`` real
tokens); a query row that straddles two query blocks (a chunk starting off the stride grid) counts for the block
of its last query. The attention itself is the block-sparse kernel (``ops.dispatch``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import check_float, check_int
from ..layout import BlockLayout
from ..registry import register
from .base import Geometry, PrefillPattern, expand_heads

__all__ = ["XAttention"]


@register("xattention", "prefill", paper="XAttention (Xu et al., ICML 2025) https://arxiv.org/abs/2503.16428",
          summary="antidiagonal (stride S) block scores; blocks kept up to a mass threshold per query block")
@dataclass(frozen=True)
class XAttention(PrefillPattern):
    """Antidiagonal block scoring and threshold selection."""

    stride: int = 8
    threshold: float = 0.9
    sink: int = 1
    chunk: int = 4096  # query rows scored at once (memory)

    examples = ({"stride": 4, "threshold": 0.8, "block_size": 16},
                {"stride": 8, "threshold": 0.5, "block_size": 16, "sink": 0})
    full_example = {"stride": 4, "threshold": 1.0, "block_size": 16}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.stride, "stride", 1)
        check_float(self.threshold, "threshold", 0.0, 1.0, lo_open=False)
        check_int(self.sink, "sink", 0)
        check_int(self.chunk, "chunk", 1)
        if self.block_size % self.stride:
            raise ValueError(f"stride must divide block_size ({self.block_size}), got {self.stride}")

    def importance(self, q, k, key_valid=None) -> torch.Tensor:
        """``[b, hq, nqb, nkb]``: the antidiagonal estimate of each block's attention mass."""
        b, hq, nq, d = q.shape
        nk, s, bs = k.shape[2], self.stride, self.block_size
        off = nk - nq
        geo = Geometry(nq, nk, bs, q.device)
        rows = -(-nk // s)  # stride rows over the absolute positions 0 .. nk-1
        kf = expand_heads(k, hq).float()
        qf = q.float()
        if key_valid is not None:
            kf = kf * key_valid[:, None, :, None]
            qf = qf * key_valid[:, None, off:, None]
        kp = F.pad(kf, (0, 0, 0, rows * s - nk))  # [b, hq, rows*s, d]
        qa = F.pad(qf, (0, 0, off, rows * s - nk))  # queries at their absolute positions, zeros elsewhere
        kr = kp.view(b, hq, rows, s * d)
        qr = qa.view(b, hq, rows, s, d).flip(3).reshape(b, hq, rows, s * d)  # row r: q[rS+S-1], ..., q[rS]
        pos = torch.arange(rows * s, device=q.device)
        real = torch.ones(b, rows * s, dtype=torch.bool, device=q.device)
        real[:, nk:] = False
        if key_valid is not None:
            real[:, :nk] = key_valid.bool()
        key_rows = real.view(b, rows, s).any(-1)  # [b, rows]
        q_real = real.clone()
        q_real[:, :off] = False
        q_rows = q_real.view(b, rows, s).any(-1)
        # the query block of each stride row: that of its last query (clamped into the queries)
        last_q = torch.clamp(pos.view(rows, s)[:, -1], max=nk - 1) - off
        q_block = torch.clamp(last_q, min=0) // bs
        k_block = torch.arange(rows, device=q.device) * s // bs
        out = torch.zeros(b, hq, geo.nqb, geo.nkb, device=q.device)
        scale = 1.0 / (math.sqrt(d) * s)
        c_idx = torch.arange(rows, device=q.device)
        for lo in range(0, rows, self.chunk):
            hi = min(lo + self.chunk, rows)
            logits = torch.matmul(qr[:, :, lo:hi], kr.transpose(-1, -2)) * scale  # [b, hq, m, rows]
            ok = (c_idx[None, :] <= c_idx[lo:hi, None])[None] & key_rows[:, None, :]  # [b, m, rows]
            p = logits.masked_fill(~ok[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
            p = p * q_rows[:, None, lo:hi, None]
            # sum the stride rows into blocks: key rows -> kv blocks, query rows -> q blocks
            pk = torch.zeros(b, hq, hi - lo, geo.nkb, device=q.device).index_add_(3, k_block, p)
            sel = q_rows[:, lo:hi].any(0) & (last_q[lo:hi] >= 0)
            if bool(sel.any()):
                out.index_add_(2, q_block[lo:hi][sel], pk[:, :, sel])
        return out

    def layout(self, q, k, key_valid=None) -> BlockLayout:
        b, hq, nq, _ = q.shape
        geo = Geometry(nq, k.shape[2], self.block_size, q.device)
        imp = self.importance(q, k, key_valid)  # [b, hq, nqb, nkb]
        causal = geo.causal_blocks()[None, None]
        forced = (geo.sink_blocks(self.sink, key_valid, b) | geo.diagonal_blocks()[None, None]) & causal
        imp = imp.masked_fill(~causal, 0.0)
        total = imp.sum(-1, keepdim=True)
        need = self.threshold * total
        base = (imp * forced).sum(-1, keepdim=True)
        others = imp.masked_fill(forced | ~causal, -1.0)
        vals, order = others.sort(-1, descending=True)
        before = base + vals.clamp_min(0).cumsum(-1) - vals.clamp_min(0)  # kept mass before each candidate
        take = (before < need) & (vals >= 0)
        chosen = torch.zeros_like(take).scatter_(-1, order, take)
        m = (forced | chosen) & causal
        return BlockLayout.from_block_mask(m, block_size=self.block_size, q_len=nq, kv_len=geo.kv_len)

    def reference_mask(self, q, k, key_valid=None):
        """Loop by loop: every antidiagonal sum of every (query row, key row) pair of stride rows, its softmax
        over the reachable key rows with a real key, summed into blocks; per query block the sink and diagonal
        blocks, then the best others while the kept mass is below ``threshold`` x the row's total."""
        from . import _slow

        b, hq, nq, d = q.shape
        nk, s, bs = k.shape[2], self.stride, self.block_size
        g = hq // k.shape[1]
        off = nk - nq
        rows = -(-nk // s)
        nqb, nkb = -(-nq // bs), -(-nk // bs)
        sel = torch.zeros(b, hq, nqb, nkb, dtype=torch.bool)
        for bi in range(b):
            ok = [_slow.valid(key_valid, bi, j) for j in range(nk)]
            first = _slow.first(key_valid, bi)

            def qv(h, p, bi=bi, ok=ok):
                return q[bi, h, p - off].double() if off <= p < nk and ok[p] else torch.zeros(d, dtype=torch.float64)

            def kv_(h, p, bi=bi, ok=ok):
                return k[bi, h // g, p].double() if p < nk and ok[p] else torch.zeros(d, dtype=torch.float64)

            for h in range(hq):
                mass = [[0.0] * nkb for _ in range(nqb)]
                for r in range(rows):
                    qpos = [r * s + t for t in range(s)]
                    if not any(off <= p < nk and ok[p] for p in qpos):
                        continue
                    last = min(r * s + s - 1, nk - 1) - off
                    if last < 0:
                        continue
                    logit = {}
                    for c in range(r + 1):
                        if not any(c * s + t < nk and ok[c * s + t] for t in range(s)):
                            continue
                        tot = sum(float(qv(h, r * s + s - 1 - t) @ kv_(h, c * s + t)) for t in range(s))
                        logit[c] = tot / (math.sqrt(d) * s)
                    top = max(logit.values())
                    z = sum(math.exp(x - top) for x in logit.values())
                    for c, x in logit.items():
                        mass[last // bs][c * s // bs] += math.exp(x - top) / z
                for i in range(nqb):
                    q_lo, q_hi = i * bs + off, min((i + 1) * bs, nq) - 1 + off
                    reach = [j for j in range(nkb) if j <= q_hi // bs]
                    forced = {j for j in reach if (self.sink > 0 and first // bs <= j <= (first + self.sink - 1) // bs)
                              or j >= q_lo // bs}
                    total = sum(mass[i][j] for j in reach)
                    kept = sum(mass[i][j] for j in forced)
                    chosen = set(forced)
                    for j in sorted((j for j in reach if j not in forced), key=lambda j: -mass[i][j]):
                        if kept < self.threshold * total:
                            chosen.add(j)
                            kept += mass[i][j]
                    for j in chosen:
                        sel[bi, h, i, j] = True
        return _slow.blocks_to_tokens(sel, nq, nk, off, bs)
