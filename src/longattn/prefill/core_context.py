"""Core-context aware attention: pooled core tokens for the distant past + a local window (CCA-Attention).

Paper: "Core Context Aware Transformers for Long Context Language Modeling" (Chen et al., ICML 2025,
https://arxiv.org/abs/2412.12465).

Keys are split into groups of ``group`` tokens. Each group is summarised by one *core token*: the keys and values
of the group weighted by their significance, the softmax attention of the group's last query to the group's
keys (averaged over the query heads sharing a kv head). A query attends to the core tokens of every group that
ended before its window, and to the raw keys of its last ``window`` positions; both are fused in one softmax.
Cost per query: ``N / group + window`` keys.

``layout()`` describes the exact (raw-key) part only: the local window; ``attend()`` runs the fused attention
through the block-sparse kernel over ``[core tokens; keys]`` with a token rule.

Departures: CCA-Attention learns how to fuse the two branches (and is fine-tuned); this is training-free, one
joint softmax. Groups are counted from position 0 (left padding shifts them; padded keys get zero weight).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import check_int
from ..layout import BlockLayout, TokenRule
from ..registry import register
from . import _slow
from .base import Geometry, PrefillPattern

__all__ = ["CoreContext"]


@register(
    "core_context",
    "prefill",
    paper="CCA-Attention (Chen et al., ICML 2025) https://arxiv.org/abs/2412.12465",
    summary="significance-pooled core token per group for the past + local window, one fused softmax",
)
@dataclass(frozen=True)
class CoreContext(PrefillPattern):
    """Core tokens (one per ``group`` keys) before the window + raw keys inside the ``window``."""

    group: int = 16
    window: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.group, "group", 2)
        check_int(self.window, "window")

    def layout(self, q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None = None) -> BlockLayout:
        """The raw-key part (local window) over the original keys."""
        geo = Geometry(q.shape[2], k.shape[2], self.block_size, q.device)
        m = geo.local_blocks(self.window)[None, None]
        win = self.window

        def fn(bb, hh, qp, kp):
            return (qp - kp) < win
        return BlockLayout.from_block_mask(m, block_size=self.block_size, q_len=geo.q_len, kv_len=geo.kv_len,
                                           rule=TokenRule(fn=fn))

    def cores(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None):
        """Core keys/values ``[b, hkv, n_groups, d]`` and their validity ``[b, n_groups]`` (complete groups only)."""
        b, hq, nq, d = q.shape
        hk, nk = k.shape[1], k.shape[2]
        G = self.group
        ng = nk // G  # complete groups; the incomplete tail is inside every later query's window anyway
        if ng == 0:
            z = k.new_zeros(b, hk, 0, d)
            return z, z.clone(), torch.zeros(b, 0, dtype=torch.bool, device=k.device)
        kg = k[:, :, : ng * G].float().view(b, hk, ng, G, d)
        vg = v[:, :, : ng * G].float().view(b, hk, ng, G, d)
        # the last query of each group: query index of absolute position (j+1)*G - 1 (if it is a query)
        off = nk - nq
        last = torch.arange(1, ng + 1, device=q.device) * G - 1 - off
        has_q = last >= 0
        ql = q[:, :, last.clamp_min(0)].float().view(b, hk, hq // hk, ng, d)  # [b, hk, g, ng, d]
        s = torch.einsum("bkgnd,bknjd->bkgnj", ql, kg) / math.sqrt(d)
        valid = torch.ones(b, nk, dtype=torch.bool, device=q.device) if key_valid is None else key_valid.bool()
        vmask = valid[:, : ng * G].view(b, 1, 1, ng, G)
        s = s.masked_fill(~vmask, float("-inf"))
        w = torch.softmax(s, -1).nan_to_num(0.0).mean(2)  # [b, hk, ng, G]
        # a group without a query of its own (cross/chunked calls) gets mean pooling
        mean_w = vmask[:, 0, 0].float() / vmask[:, 0, 0].float().sum(-1, keepdim=True).clamp_min(1)
        w = torch.where(has_q.view(1, 1, ng, 1), w, mean_w[:, None])
        ck = (w.unsqueeze(-1) * kg).sum(3).to(k.dtype)
        cv = (w.unsqueeze(-1) * vg).sum(3).to(v.dtype)
        return ck, cv, vmask[:, 0, 0].any(-1)

    def attend(self, q, k, v, *, scale=None, key_valid=None, window=None, layout=None, causal=None, stats=None,
               softcap=None, sinks=None):
        from ..ops.dispatch import block_sparse_attention

        if window is not None:
            raise ValueError("core_context cannot run on sliding-window layers (window must be None)")
        if causal is False:
            raise ValueError("core_context is a causal pattern (causal=False is not supported)")
        t0 = time.perf_counter()
        b, hq, nq, d = q.shape
        nk = k.shape[2]
        bs, G, win = self.block_size, self.group, self.window
        ck, cv, cvalid = self.cores(q, k, v, key_valid)
        ng = ck.shape[2]
        ngp = -(-ng // bs) * bs  # core segment padded to whole blocks
        ck = F.pad(ck, (0, 0, 0, ngp - ng))
        cv = F.pad(cv, (0, 0, 0, ngp - ng))
        k2, v2 = torch.cat([ck, k], 2), torch.cat([cv, v], 2)
        kv_ok = torch.ones(b, nk, dtype=torch.bool, device=q.device) if key_valid is None else key_valid.bool()
        kv2 = torch.cat([F.pad(cvalid, (0, ngp - ng)), kv_ok], 1)
        geo = Geometry(nq, nk, bs, q.device)
        # core block c is needed by q block i if its first core's group ends before the window of i's last query
        first_core = torch.arange(0, ngp, bs, device=q.device)
        core_blk = ((first_core[None, :] + 1) * G - 1) <= (geo.q_hi[:, None] - win)
        m = torch.cat([core_blk, geo.local_blocks(win)], 1)[None, None]

        def fn(bb, hh, qp, kp):
            rq = qp - ngp
            in_core = kp < ngp
            core_ok = (kp + 1) * G - 1 <= rq - win  # the group ended before the window starts
            rk = kp - ngp
            raw_ok = (rk <= rq) & (rq - rk < win)
            return torch.where(in_core, core_ok, raw_ok)

        lay = BlockLayout.from_block_mask(m, block_size=bs, q_len=nq, kv_len=ngp + nk, rule=TokenRule(fn=fn))
        if stats is not None:
            stats["est_s"] = stats.get("est_s", 0.0) + time.perf_counter() - t0
        return block_sparse_attention(q, k2, v2, lay, causal=False, scale=scale, key_valid=kv2, backend=self.backend,
                                      softcap=softcap, sinks=sinks)

    examples = ({"group": 8, "window": 40, "block_size": 16},)
    full_example = {"window": 200, "block_size": 16}

    def reference_output(self, q, k, v, key_valid=None):
        """Loop by loop (float64): each complete group of ``group`` keys gives one core key/value, the keys and
        values weighted by the softmax of the group's last query (averaged over the kv head's query heads) over
        the group's real keys; a query attends, in one softmax, to the cores of the groups that ended before its
        window and to the real raw keys inside its window. (Self-attention: every group has its last query.)"""
        b, hq, nq, d = q.shape
        nk = k.shape[2]
        g = hq // k.shape[1]
        G, W = self.group, self.window
        out = torch.zeros(b, hq, nq, d, dtype=torch.float64)
        for bi in range(b):
            ok = [_slow.valid(key_valid, bi, j) for j in range(nk)]
            for hk_ in range(k.shape[1]):
                cores = []
                for c in range(nk // G):
                    idx = [j for j in range(c * G, (c + 1) * G) if ok[j]]
                    last = (c + 1) * G - 1 - (nk - nq)
                    if not idx:
                        cores.append(None)
                        continue
                    ws = []
                    for hh in range(hk_ * g, (hk_ + 1) * g):
                        s = torch.stack([q[bi, hh, last].double() @ k[bi, hk_, j].double() for j in idx]) / math.sqrt(d)
                        ws.append(torch.softmax(s, 0))
                    w = torch.stack(ws).mean(0)
                    cores.append((sum(wi * k[bi, hk_, j].double() for wi, j in zip(w, idx)),
                                  sum(wi * v[bi, hk_, j].double() for wi, j in zip(w, idx))))
                for hh in range(hk_ * g, (hk_ + 1) * g):
                    for i in range(nq):
                        qp = i + nk - nq
                        keys, vals = [], []
                        for c, cc in enumerate(cores):
                            if cc is not None and (c + 1) * G - 1 <= qp - W:
                                keys.append(cc[0])
                                vals.append(cc[1])
                        for j in range(max(qp - W + 1, 0), qp + 1):
                            if ok[j]:
                                keys.append(k[bi, hk_, j].double())
                                vals.append(v[bi, hk_, j].double())
                        if keys:
                            s = torch.stack(keys) @ q[bi, hh, i].double() / math.sqrt(d)
                            out[bi, hh, i] = torch.softmax(s, 0) @ torch.stack(vals)
        return out.to(q.dtype)
