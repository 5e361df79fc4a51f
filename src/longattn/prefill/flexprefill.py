"""FlexPrefill: per head, a query-aware block pattern or vertical-slash lines, each sized to a cumulative mass.

Paper: "FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient Long-Sequence Inference" (Lai et
al., ICLR 2025, https://arxiv.org/abs/2502.20766). The last ``block_size`` queries attend densely (causal) to
every key; their mean attention per key is the *vertical* distribution, their mean along each diagonal the
*slash* distribution. Per head, the square-root Jensen-Shannon divergence between the block-pooled estimate
``softmax(mean(last queries) . mean-pooled key blocks / sqrt(d))`` and the vertical distribution summed per
block decides the pattern:

* divergence ``>= tau`` (the estimate cannot be trusted): **vertical-slash**: the fewest tokens whose vertical
  (slash) mass reaches ``gamma``, in blocks (``tokens // block_size + 1``, within ``[min_budget, max_budget]``
  tokens), then the best vertical blocks (the first real token's always) and slash blocks (the diagonal always)
  by their summed mass: a vertical block is kept for every query block after it, a slash block at its distance
  from each query block's diagonal;
* divergence ``< tau``: **query-aware**: the block-pooled attention of every query block (softmax over the
  reachable key blocks), and, over all query blocks together, the best blocks while their cumulative mass stays
  within ``gamma`` x the number of query blocks; plus ``min_budget`` vertical and slash blocks.

``tau = 0`` (the paper's default for some models) makes every head vertical-slash. ``block_topk:mode=threshold``
keeps only the query-aware half, estimated differently: this file is the complete method.

Departures: the estimate's queries and keys skip padding (``key_valid``); the query-aware set also keeps every
diagonal block (so that each query sees at least its own block); the official code's dense fallback for
sequences under two blocks is not reproduced (short inputs simply keep most blocks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..checks import check_float, check_int
from ..layout import BlockLayout
from ..padding import first_real
from ..registry import register
from .base import Geometry, PrefillPattern, expand_heads, pool_blocks

__all__ = ["FlexPrefill"]


def cover_blocks(x: torch.Tensor, gamma: float, bs: int) -> torch.Tensor:
    """Blocks needed to hold the fewest entries of ``x`` (last dim) whose mass reaches ``gamma``: the entries
    whose sorted cumulative sum stays within ``gamma``, plus one, in blocks (``// bs + 1``)."""
    cs = x.sort(-1, descending=True).values.cumsum(-1)
    tokens = (cs <= gamma).sum(-1) + 1
    return tokens // bs + 1


def js_sqrt(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Square root of the Jensen-Shannon divergence of the distributions ``p``, ``q`` (last dim)."""
    m = (p + q) / 2
    a = torch.where(p > 0, p * torch.log(p / m), torch.zeros_like(p)).sum(-1)
    b = torch.where(q > 0, q * torch.log(q / m), torch.zeros_like(q)).sum(-1)
    return torch.sqrt((0.5 * a + 0.5 * b).clamp_min(0))


@register("flexprefill", "prefill", paper="FlexPrefill (Lai et al., ICLR 2025) https://arxiv.org/abs/2502.20766",
          summary="per head: query-aware blocks or vertical-slash lines (by JS divergence), sized to mass gamma")
@dataclass(frozen=True)
class FlexPrefill(PrefillPattern):
    """Per-head choice between a query-aware and a vertical-slash pattern, each covering mass ``gamma``."""

    gamma: float = 0.9
    tau: float = 0.1
    min_budget: int = 512
    max_budget: int = 0  # 0: no maximum

    examples = ({"gamma": 0.8, "tau": 0.3, "min_budget": 16, "block_size": 16},
                {"gamma": 0.6, "tau": 0.0, "min_budget": 16, "block_size": 16},
                {"gamma": 0.7, "tau": 1.0, "min_budget": 16, "block_size": 16})
    full_example = {"gamma": 1.0, "tau": 0.0, "min_budget": 100000, "block_size": 16}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float(self.gamma, "gamma", 0.0, 1.0)
        check_float(self.tau, "tau", 0.0, 1.0, lo_open=False)
        check_int(self.min_budget, "min_budget", 1)
        check_int(self.max_budget, "max_budget", 0, hint="0: no maximum")

    def _budget(self, n_blocks: torch.Tensor, nkb: int) -> torch.Tensor:
        lo = -(-self.min_budget // self.block_size)
        hi = nkb if not self.max_budget else min(nkb, -(-self.max_budget // self.block_size))
        return n_blocks.clamp(min=min(lo, hi), max=hi)

    def estimate(self, q, k, key_valid=None):
        """``(vertical [b, hq, nk], slash [b, hq, nk] by distance, query_aware [b, hq] bool)`` from the last
        block of queries."""
        b, hq, nq, d = q.shape
        nk = k.shape[2]
        last = min(self.block_size, nq)
        ql = q[:, :, -last:].float()
        kf = expand_heads(k, hq).float()
        scale = 1.0 / math.sqrt(d)
        pos = torch.arange(nk - last, nk, device=q.device)
        j = torch.arange(nk, device=q.device)
        ok = (j[None, :] <= pos[:, None])[None, None]
        if key_valid is not None:
            ok = ok & key_valid[:, None, None, :].bool()
        a = (torch.matmul(ql, kf.transpose(-1, -2)) * scale).masked_fill(~ok, float("-inf")).softmax(-1)
        a = a.nan_to_num(0.0)  # [b, hq, last, nk]
        vertical = a.mean(2)
        dist = (pos[:, None] - j[None, :]).clamp(min=0)  # distance of each (query, key) pair
        slash = torch.zeros(b, hq, nk, device=q.device)
        slash.scatter_add_(2, dist.expand(b, hq, -1, -1).reshape(b, hq, -1), (a * ok).reshape(b, hq, -1))
        slash = slash / last
        # the block-pooled estimate of the last queries' attention, against the vertical mass per block
        bs = self.block_size
        kp, has = pool_blocks(k, bs, key_valid)
        est = torch.matmul(ql.mean(2, keepdim=True), expand_heads(kp, hq).transpose(-1, -2))[:, :, 0] * scale
        est = est.masked_fill(~has[:, :], float("-inf")).softmax(-1)
        nkb = -(-nk // bs)
        vblock = torch.nn.functional.pad(vertical, (0, nkb * bs - nk)).view(b, hq, nkb, bs).sum(-1)
        return vertical, slash, js_sqrt(est, vblock) < self.tau

    def layout(self, q, k, key_valid=None) -> BlockLayout:
        b, hq, nq, d = q.shape
        nk, bs = k.shape[2], self.block_size
        geo = Geometry(nq, nk, bs, q.device)
        nkb = geo.nkb
        vertical, slash, aware = self.estimate(q, k, key_valid)
        min_b = self._budget(torch.zeros(1, dtype=torch.long, device=q.device), nkb)
        n_v = torch.where(aware, min_b, self._budget(cover_blocks(vertical, self.gamma, bs), nkb))
        n_s = torch.where(aware, min_b, self._budget(cover_blocks(slash, self.gamma, bs), nkb))
        vb = torch.nn.functional.pad(vertical, (0, nkb * bs - nk)).view(b, hq, nkb, bs).sum(-1)
        sb = torch.nn.functional.pad(slash, (0, nkb * bs - nk)).view(b, hq, nkb, bs).sum(-1)
        first = first_real(key_valid, b, q.device) // bs  # [b]
        vb = vb.scatter(2, first.view(b, 1, 1).expand(b, hq, 1), float("inf"))
        sb[..., 0] = float("inf")  # the diagonal
        rank = torch.arange(nkb, device=q.device)
        v_sel = torch.zeros(b, hq, nkb, dtype=torch.bool, device=q.device)
        v_sel.scatter_(2, vb.sort(-1, descending=True).indices, rank[None, None] < n_v[..., None])
        s_sel = torch.zeros_like(v_sel)
        s_sel.scatter_(2, sb.sort(-1, descending=True).indices, rank[None, None] < n_s[..., None])
        causal = geo.causal_blocks()  # [nqb, nkb]
        dist = geo.last_kb[:, None] - geo.kb[None, :]  # [nqb, nkb] distance in blocks from the diagonal
        m = v_sel[:, :, None, :] | torch.gather(s_sel[:, :, None, :].expand(b, hq, geo.nqb, nkb), 3,
                                                dist.clamp(min=0)[None, None].expand(b, hq, -1, -1))
        m = m & causal & (dist >= 0)
        if bool(aware.any()):
            m = m | (self._query_aware(q, k, key_valid, geo) & aware[..., None, None])
        return BlockLayout.from_block_mask(m & causal, block_size=bs, q_len=nq, kv_len=nk)

    def _query_aware(self, q, k, key_valid, geo: Geometry) -> torch.Tensor:
        b, hq, nq, d = q.shape
        bs = self.block_size
        qv = None if key_valid is None else key_valid[:, -nq:]
        qp, q_has = pool_blocks(q, bs, qv)
        kp, k_has = pool_blocks(k, bs, key_valid)
        s = torch.matmul(qp, expand_heads(kp, hq).transpose(-1, -2)) / math.sqrt(d)  # [b, hq, nqb, nkb]
        allowed = geo.causal_blocks()[None, None] & k_has[:, :, None, :]
        p = s.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
        p = p * q_has[:, :, :, None]
        rows = q_has.sum(-1).view(b, 1, 1)  # query blocks with a real query
        flat = p.reshape(b, hq, -1)
        vals, order = flat.sort(-1, descending=True)
        take = vals.cumsum(-1) <= self.gamma * rows
        chosen = torch.zeros_like(take).scatter_(-1, order, take).view_as(p)
        return chosen | geo.diagonal_blocks()[None, None]

    def reference_mask(self, q, k, key_valid=None):
        """Loop by loop over heads, queries, keys and blocks: the last queries' softmax, its vertical and slash
        means, the JS divergence against the pooled estimate, then the head's pattern (module docstring)."""
        from . import _slow

        b, hq, nq, d = q.shape
        nk, bs = k.shape[2], self.block_size
        g = hq // k.shape[1]
        off = nk - nq
        nqb, nkb = -(-nq // bs), -(-nk // bs)
        last = min(bs, nq)
        lo_b = -(-self.min_budget // bs)
        hi_b = nkb if not self.max_budget else min(nkb, -(-self.max_budget // bs))

        def clamp(x):
            return max(min(lo_b, hi_b), min(x, hi_b))

        def cover(x):
            acc, cnt = 0.0, 0
            for val in sorted(x, reverse=True):
                acc += val
                if acc <= self.gamma:
                    cnt += 1
            return (cnt + 1) // bs + 1

        sel = torch.zeros(b, hq, nqb, nkb, dtype=torch.bool)
        for bi in range(b):
            ok = [_slow.valid(key_valid, bi, j) for j in range(nk)]
            first = _slow.first(key_valid, bi)
            for h in range(hq):
                qd, kd = q[bi, h].double(), k[bi, h // g].double()
                vert, sl = [0.0] * nk, [0.0] * nk
                for i in range(nq - last, nq):
                    p_i = i + off
                    keys = [j for j in range(p_i + 1) if ok[j]]
                    if not keys:
                        continue
                    lg = {j: float(qd[i] @ kd[j]) / math.sqrt(d) for j in keys}
                    top = max(lg.values())
                    z = sum(math.exp(x - top) for x in lg.values())
                    for j, x in lg.items():
                        vert[j] += math.exp(x - top) / z / last
                        sl[p_i - j] += math.exp(x - top) / z / last
                mean_q = sum(qd[i] for i in range(nq - last, nq)) / last
                pooled = []
                for c in range(nkb):
                    rows = [j for j in range(c * bs, min((c + 1) * bs, nk)) if ok[j]]
                    pooled.append(sum(kd[j] for j in rows) / len(rows) if rows else None)
                lg = {c: float(mean_q @ pooled[c]) / math.sqrt(d) for c in range(nkb) if pooled[c] is not None}
                top = max(lg.values())
                z = sum(math.exp(x - top) for x in lg.values())
                est = [math.exp(lg[c] - top) / z if c in lg else 0.0 for c in range(nkb)]
                vblk = [sum(vert[c * bs : (c + 1) * bs]) for c in range(nkb)]
                sblk = [sum(sl[c * bs : (c + 1) * bs]) for c in range(nkb)]
                js = 0.0
                for pe, pv in zip(est, vblk):
                    m_ = (pe + pv) / 2
                    js += 0.5 * (pe * math.log(pe / m_) if pe > 0 else 0.0) + 0.5 * (pv * math.log(pv / m_)
                                                                                     if pv > 0 else 0.0)
                aware = math.sqrt(max(js, 0.0)) < self.tau
                n_v = clamp(0) if aware else clamp(cover(vert))
                n_s = clamp(0) if aware else clamp(cover(sl))
                vblk[first // bs] = float("inf")
                sblk[0] = float("inf")
                v_keep = set(sorted(range(nkb), key=lambda c: -vblk[c])[:n_v])
                s_keep = set(sorted(range(nkb), key=lambda c: -sblk[c])[:n_s])
                for i in range(nqb):
                    diag = (min((i + 1) * bs, nq) - 1 + off) // bs
                    for c in range(diag + 1):
                        if c in v_keep or (diag - c) in s_keep:
                            sel[bi, h, i, c] = True
                if aware:
                    qa = q[bi, h].double()
                    cells, rows_real = [], 0
                    for i in range(nqb):
                        qs = [t for t in range(i * bs, min((i + 1) * bs, nq)) if ok[t + off]]
                        if not qs:
                            continue
                        rows_real += 1
                        qm = sum(qa[t] for t in qs) / len(qs)
                        diag = (min((i + 1) * bs, nq) - 1 + off) // bs
                        lg = {c: float(qm @ pooled[c]) / math.sqrt(d) for c in range(diag + 1) if pooled[c] is not None}
                        top = max(lg.values())
                        z = sum(math.exp(x - top) for x in lg.values())
                        cells += [(math.exp(x - top) / z, i, c) for c, x in lg.items()]
                        for c in range((i * bs + off) // bs, diag + 1):
                            sel[bi, h, i, c] = True
                    acc = 0.0
                    for pv, i, c in sorted(cells, reverse=True):
                        acc += pv
                        if acc <= self.gamma * rows_real:
                            sel[bi, h, i, c] = True
        return _slow.blocks_to_tokens(sel, nq, nk, off, bs)
