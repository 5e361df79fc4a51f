"""Vertical-slash prefill pattern (MInference).

Paper: MInference 1.0 (Jiang et al., NeurIPS 2024, https://arxiv.org/abs/2407.02490), the "vertical-slash"
head pattern: every query attends to a few key *columns* (vertical lines: sinks, key tokens) and a few
*diagonals* (slash lines: the local window and periodic offsets).

Estimation as in the paper: the last ``obs_window`` queries attend densely to all keys; summing their softmax
over queries gives a score per column, summing along diagonals a score per diagonal; the ``vertical`` best
columns and ``slash`` best diagonals are kept per head, and the first ``sink`` real tokens and the
``window`` nearest diagonals are always kept (also when they outnumber the budget).

Kernel: the chosen entries are computed exactly. ``attend()`` gathers the chosen columns' keys into a compact
segment placed before the keys (so ``vertical`` columns cost ``vertical / block_size`` blocks, not one block
per column) and covers the diagonals with the blocks they cross; a token rule (FlexAttention ``mask_mod``)
keeps exactly the chosen columns and diagonals and counts a key that is both only once. ``layout()`` returns
the same selection over the original keys (for recall, density and tests).

Departures: the estimate uses all heads' own last queries (as the paper) but queries in left padding are not
excluded from the estimate when a row is padded at the end (never the case with left padding); forced sinks
and local diagonals are settings (the paper's code forces 30 columns and 100 diagonals).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import check_int
from ..layout import BlockLayout, TokenRule
from ..padding import first_real, sink_tokens
from ..registry import register
from . import _slow
from .base import Geometry, PrefillPattern, topk_mask

__all__ = ["VerticalSlash"]


@register(
    "vertical_slash",
    "prefill",
    paper="MInference 1.0 (Jiang et al., NeurIPS 2024) https://arxiv.org/abs/2407.02490",
    summary="top-k key columns + top-k diagonals per head, estimated from the last queries; exact entries",
)
@dataclass(frozen=True)
class VerticalSlash(PrefillPattern):
    """Per head: ``vertical`` columns and ``slash`` diagonals, estimated from the last ``obs_window`` queries."""

    renamed = {"last_q": "obs_window", "local": "window"}  # old spellings, accepted with a FutureWarning

    vertical: int = 1024
    slash: int = 128
    obs_window: int = 64
    sink: int = 64
    window: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.vertical, "vertical")
        check_int(self.slash, "slash")
        check_int(self.obs_window, "obs_window")
        check_int(self.sink, "sink", 0)
        check_int(self.window, "window", 1)

    # ---- estimation --------------------------------------------------------------------------------------
    def select(self, q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None = None):
        """``(columns, diagonals)``: bool ``[b, hq, nk]`` each (diagonal ``d`` = query pos - key pos)."""
        b, hq, nq, d = q.shape
        hk, nk = k.shape[1], k.shape[2]
        g = hq // hk
        lq = min(self.obs_window, nq)
        qe = q[:, :, nq - lq:].float().reshape(b, hk, g * lq, d)
        s = torch.matmul(qe, k.float().transpose(-1, -2)).view(b, hq, lq, nk) / math.sqrt(d)
        qpos = torch.arange(nk - lq, nk, device=q.device)
        kpos = torch.arange(nk, device=q.device)
        ok = (kpos[None, :] <= qpos[:, None])[None, None]
        if key_valid is not None:
            ok = ok & key_valid.to(torch.bool)[:, None, None, :]
        p = torch.softmax(s.masked_fill(~ok, float("-inf")), dim=-1).nan_to_num(0.0)
        vert = p.sum(2)  # [b, hq, nk]
        diag_idx = (qpos[:, None] - kpos[None, :]).clamp_min(0).expand(b, hq, lq, nk).reshape(b, hq, -1)
        slash = torch.zeros(b, hq, nk, device=q.device).scatter_add_(-1, diag_idx, p.reshape(b, hq, -1))
        key_ok = torch.ones(b, 1, nk, dtype=torch.bool, device=q.device)
        if key_valid is not None:
            key_ok = key_valid.to(torch.bool)[:, None, :]
        first = first_real(key_valid, b, q.device)
        sink = sink_tokens(self.sink, key_valid, b, nk, q.device)
        vert = vert.masked_fill(sink[:, None, :], float("inf"))
        slash[..., : self.window] = float("inf")
        # forced columns/diagonals are kept even beyond the budget (deterministic when they exceed it)
        columns = topk_mask(vert, self.vertical, key_ok.expand(b, hq, nk)) | (sink[:, None, :] & key_ok)
        # diagonals beyond the first real token's distance from the last key can hold no pair
        diag_ok = (kpos[None, :] <= (nk - 1 - first)[:, None])[:, None, :].expand(b, hq, nk)
        local = (kpos < self.window)[None, None, :] & diag_ok
        diagonals = topk_mask(slash, self.slash, diag_ok) | local
        return columns, diagonals

    # ---- layouts -----------------------------------------------------------------------------------------
    def _diag_blocks(self, diagonals: torch.Tensor, geo: Geometry) -> torch.Tensor:
        """bool ``[b, h, nqb, nkb]``: blocks crossed by a chosen diagonal for some query of the block."""
        bs = geo.bs
        csum = F.pad(diagonals.to(torch.int32).cumsum(-1), (1, 0))  # csum[x] = #chosen d < x
        nk = diagonals.shape[-1]
        k_lo = geo.kb * bs
        k_hi = torch.clamp(k_lo + bs, max=geo.kv_len) - 1
        lo = (geo.q_lo[:, None] - k_hi[None, :]).clamp(0, nk)  # smallest d reaching this block
        hi = (geo.q_hi[:, None] - k_lo[None, :] + 1).clamp(0, nk)  # exclusive
        b, h = diagonals.shape[:2]
        flat = lambda t: t.reshape(1, 1, -1).expand(b, h, -1)  # noqa: E731
        n = torch.gather(csum, -1, flat(hi)) - torch.gather(csum, -1, flat(lo))
        return (n > 0).view(b, h, geo.nqb, geo.nkb)

    def layout(self, q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None = None) -> BlockLayout:
        columns, diagonals = self.select(q, k, key_valid)
        return self.layout_from(columns, diagonals, q.shape[2], k.shape[2])

    def layout_from(self, columns, diagonals, q_len: int, kv_len: int) -> BlockLayout:
        geo = Geometry(q_len, kv_len, self.block_size, columns.device)
        b, h, _ = columns.shape
        colblk = F.pad(columns, (0, geo.nkb * geo.bs - kv_len)).reshape(b, h, geo.nkb, geo.bs).any(-1)
        m = (colblk[:, :, None, :] & geo.causal_blocks()) | self._diag_blocks(diagonals, geo)
        rule = TokenRule(columns=columns, diagonals=diagonals)
        return BlockLayout.from_block_mask(m, block_size=self.block_size, q_len=q_len, kv_len=kv_len, rule=rule)

    # ---- kernel ------------------------------------------------------------------------------------------
    def attend(self, q, k, v, *, scale=None, key_valid=None, window=None, layout=None, causal=None, stats=None,
               softcap=None, sinks=None):
        from ..ops.dispatch import block_sparse_attention

        if window is not None:
            raise ValueError("vertical_slash cannot run on sliding-window layers (window must be None)")
        if causal is False:
            raise ValueError("vertical_slash is a causal pattern (causal=False is not supported)")
        t0 = time.perf_counter()
        columns, diagonals = self.select(q, k, key_valid)
        b, hq, nq, d = q.shape
        hk, nk = k.shape[1], k.shape[2]
        bs = self.block_size
        dev = q.device
        # compact column segment: per head, the chosen columns in ascending order, padded to whole blocks
        ncol = int(columns.sum(-1).max())
        vp = max(bs, -(-ncol // bs) * bs)
        kpos = torch.arange(nk, device=dev)
        key_of = torch.where(columns, kpos, torch.full_like(kpos, nk))  # unchosen sort last
        colpos = key_of.sort(-1).values[..., :vp]
        if colpos.shape[-1] < vp:
            colpos = F.pad(colpos, (0, vp - colpos.shape[-1]), value=nk)
        g = hq // hk
        gidx = colpos.clamp(max=nk - 1)
        kk = k.repeat_interleave(g, dim=1) if g > 1 else k
        vv = v.repeat_interleave(g, dim=1) if g > 1 else v
        kc = torch.gather(kk, 2, gidx.unsqueeze(-1).expand(b, hq, vp, d))
        vc = torch.gather(vv, 2, gidx.unsqueeze(-1).expand(b, hq, vp, d))
        k2, v2 = torch.cat([kc, kk], 2), torch.cat([vc, vv], 2)
        geo = Geometry(nq, nk, bs, dev)
        diag_blocks = self._diag_blocks(diagonals, geo)  # [b, hq, nqb, nkb]
        first_col = colpos[..., ::bs]  # [b, hq, ncb]: smallest position in each column block
        col_blocks = first_col[:, :, None, :] <= geo.q_hi[None, None, :, None]
        m = torch.cat([col_blocks, diag_blocks], -1)
        # blocks where the rule keeps every pair (FlexAttention skips the mask there): column blocks whose
        # columns are all real and all before the q block; diagonal blocks fully below the causal edge, free of
        # column keys, whose whole distance range is chosen
        last_col = colpos[..., bs - 1 :: bs]
        col_full = (last_col < nk)[:, :, None, :] & (last_col[:, :, None, :] <= geo.q_lo[None, None, :, None])
        csum = F.pad(diagonals.to(torch.int32).cumsum(-1), (1, 0))
        k_lo = geo.kb * bs
        k_hi = torch.clamp(k_lo + bs, max=nk) - 1
        lo = (geo.q_lo[:, None] - k_hi[None, :]).clamp(0, nk)
        hi = (geo.q_hi[:, None] - k_lo[None, :] + 1).clamp(0, nk)
        flat = lambda t: t.reshape(1, 1, -1).expand(b, hq, -1)  # noqa: E731
        n_chosen = (torch.gather(csum, -1, flat(hi)) - torch.gather(csum, -1, flat(lo))).view(b, hq, geo.nqb, -1)
        has_col = F.pad(columns, (0, geo.nkb * bs - nk)).reshape(b, hq, geo.nkb, bs).any(-1)
        diag_full = ((k_hi[None, :] <= geo.q_lo[:, None]) & (hi - lo == (geo.q_hi - geo.q_lo)[:, None] + bs))[None, None]
        diag_full = diag_full & (n_chosen == (hi - lo)[None, None]) & ~has_col[:, :, None, :]
        full = torch.cat([col_full, diag_full], -1)
        nk2 = vp + nk
        kv2 = None
        if key_valid is not None:  # padded keys are never chosen as columns; unused slots fail the rule
            kv2 = torch.cat([torch.ones(b, vp, dtype=torch.bool, device=dev), key_valid.to(torch.bool)], 1)
        is_col = columns

        def fn(bb, hh, qp, kp):
            rq = qp - vp  # the query's real position
            in_col = kp < vp
            cpos = colpos[bb, hh, torch.clamp(kp, max=vp - 1)]
            col_ok = cpos <= rq
            rk = torch.clamp(kp - vp, min=0, max=nk - 1)
            dd = torch.clamp(rq - rk, min=0, max=nk - 1)
            diag_ok = (rk <= rq) & diagonals[bb, hh, dd] & ~is_col[bb, hh, rk]
            return torch.where(in_col, col_ok, diag_ok)

        lay = BlockLayout.from_block_mask(m, block_size=bs, q_len=nq, kv_len=nk2, rule=TokenRule(fn=fn), full=full)
        if stats is not None:
            stats["est_s"] = stats.get("est_s", 0.0) + time.perf_counter() - t0
        return block_sparse_attention(q, k2, v2, lay, causal=False, scale=scale, key_valid=kv2,
                                      backend=self.backend, softcap=softcap, sinks=sinks)

    examples = ({"vertical": 12, "slash": 9, "obs_window": 16, "sink": 3, "window": 4, "block_size": 16},)
    full_example = {"vertical": 200, "slash": 1, "block_size": 16}

    def reference_mask(self, q, k, key_valid=None):
        """Loop by loop, per query head: the softmax of each of the last ``obs_window`` queries over its visible
        keys, summed per key (vertical score) and per distance (slash score); the ``vertical`` best columns plus
        the sinks, the ``slash`` best diagonals plus the ``window`` nearest; a pair is kept on a kept column or
        diagonal."""
        b, hq, nq, d = q.shape
        nk = k.shape[2]
        g = hq // k.shape[1]
        lq = min(self.obs_window, nq)
        m = torch.zeros(b, hq, nq, nk, dtype=torch.bool)
        for bi in range(b):
            f = _slow.first(key_valid, bi)
            for h in range(hq):
                vert = [0.0] * nk
                slash = [0.0] * nk
                for i in range(nq - lq, nq):
                    qp = i + nk - nq
                    keys = [j for j in range(qp + 1) if _slow.valid(key_valid, bi, j)]
                    s = torch.tensor([float(q[bi, h, i].double() @ k[bi, h // g, j].double()) / math.sqrt(d)
                                      for j in keys])
                    for j, pj in zip(keys, torch.softmax(s, 0).tolist()):
                        vert[j] += pj
                        slash[qp - j] += pj
                vs = [float("inf") if f <= j < f + self.sink
                      else (vert[j] if _slow.valid(key_valid, bi, j) else float("-inf")) for j in range(nk)]
                ss = [float("inf") if dd < self.window else slash[dd] for dd in range(nk)]
                ss = [x if dd <= nk - 1 - f else float("-inf") for dd, x in enumerate(ss)]
                cols = _slow.topk_set(vs, self.vertical) | set(range(f, min(f + self.sink, nk)))
                diags = _slow.topk_set(ss, self.slash) | set(range(min(self.window, nk - f)))
                for i in range(nq):
                    qp = i + nk - nq
                    for j in range(qp + 1):
                        m[bi, h, i, j] = j in cols or (qp - j) in diags
        return m
