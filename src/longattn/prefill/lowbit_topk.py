"""Low-bit estimated block selection (SALE).

Paper: SALE, "Low-bit Estimation for Efficient Sparse Attention in Long-context LLM Prefilling" (Zhang et
al., 2025, https://arxiv.org/abs/2505.24179).

q and k are quantized to ``bits``-bit integers (symmetric, one scale per head and block of ``block_size``
tokens); the quantized logits estimate the attention map; a kv block is kept for a query block when, for some
estimated query row, the block's best logit is within ``log(1/rel)`` of that row's best logit (the relative
score rule: the block's estimated peak probability is at least ``rel`` times the row's). Sinks and the diagonal
block are always kept.

Departures: the paper estimates every query row with 4-bit tensor-core GEMMs; on a CPU such a full map costs
as much as dense attention, so only ``q_samples`` evenly spaced rows of each query block are estimated (all of
them when ``q_samples >= block_size``), and the integer product is computed in float32 (exactly: small integers
times per-block scales).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import check_float, check_int
from ..layout import BlockLayout
from ..registry import register
from . import _slow
from .base import Geometry, PrefillPattern, finish_blocks

__all__ = ["LowBitTopK", "quantize_blocks"]


def quantize_blocks(x: torch.Tensor, bits: int, bs: int) -> torch.Tensor:
    """Symmetric ``bits``-bit fake-quantization of ``x [b, h, n, d]`` with one scale per (b, h, block)."""
    b, h, n, d = x.shape
    nb = -(-n // bs)
    xp = F.pad(x.float(), (0, 0, 0, nb * bs - n)).reshape(b, h, nb, bs * d)
    qmax = 2 ** (bits - 1) - 1
    scale = xp.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax
    xq = torch.clamp(torch.round(xp / scale), -qmax - 1, qmax) * scale
    return xq.reshape(b, h, nb * bs, d)[:, :, :n]


@register(
    "lowbit_topk",
    "prefill",
    paper="SALE (Zhang et al., 2025) https://arxiv.org/abs/2505.24179",
    summary="4/8-bit quantized q.k estimate on sampled rows; relative-score block rule",
)
@dataclass(frozen=True)
class LowBitTopK(PrefillPattern):
    """Blocks whose low-bit estimated peak probability is >= ``rel`` x the row's peak."""

    bits: int = 4
    rel: float = 0.02
    q_samples: int = 8
    sink: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits!r}")
        check_float(self.rel, "rel", 0.0, 1.0)
        check_int(self.q_samples, "q_samples")
        check_int(self.sink, "sink", 0)

    def sample_rows(self, q_len: int, device=None) -> torch.Tensor:
        """Query indices estimated: ``q_samples`` evenly spaced rows per query block (incl. its last row)."""
        bs = self.block_size
        ns = min(self.q_samples, bs)
        within = torch.linspace(bs - 1, 0, ns, device=device).round().long().flip(0).unique()
        rows = (torch.arange(-(-q_len // bs), device=device)[:, None] * bs + within[None, :]).flatten()
        rows = rows[rows < q_len]
        return torch.unique(torch.cat([rows, torch.tensor([q_len - 1], device=device)]))

    def layout(self, q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None = None) -> BlockLayout:
        bs = self.block_size
        b, hq, nq, d = q.shape
        hk, nk = k.shape[1], k.shape[2]
        g = hq // hk
        geo = Geometry(nq, nk, bs, q.device)
        rows = self.sample_rows(nq, q.device)
        qq = quantize_blocks(q, self.bits, bs)[:, :, rows] / math.sqrt(d)  # [b, hq, r, d], scaled
        kq = quantize_blocks(k, self.bits, bs)
        r = rows.numel()
        kpos = torch.arange(nk, device=q.device)
        pad = geo.nkb * bs - nk
        kqt = F.pad(kq, (0, 0, 0, pad)).transpose(-1, -2)  # [b, hk, d, nkb*bs]
        kv_ok = None if key_valid is None else F.pad(key_valid.to(torch.bool), (0, pad))[:, None, None, :]
        sel = torch.zeros(b, hq, geo.nqb, geo.nkb, dtype=torch.bool, device=q.device)
        step = max(1, (1 << 22) // max(hq * geo.nkb * bs, 1))  # rows per chunk: ~16 MiB of logits
        for c0 in range(0, r, step):
            rr = rows[c0 : c0 + step]
            n_r = rr.numel()
            s = torch.matmul(qq[:, :, c0 : c0 + n_r].reshape(b, hk, g * n_r, d), kqt).view(b, hq, n_r, -1)
            ok = (F.pad(kpos, (0, pad), value=nk)[None, :] <= (rr + geo.off)[:, None])[None, None]
            if kv_ok is not None:
                ok = ok & kv_ok
            s = s.masked_fill(~ok, float("-inf"))
            blockmax = s.view(b, hq, n_r, geo.nkb, bs).amax(-1)
            rowmax = blockmax.amax(-1, keepdim=True)
            keep = (blockmax >= rowmax + math.log(self.rel)) & torch.isfinite(blockmax)  # [b, hq, n_r, nkb]
            qb = (rr // bs).view(1, 1, n_r, 1).expand(b, hq, n_r, geo.nkb)
            sel = sel.scatter_reduce(2, qb, keep, reduce="amax")
        m = finish_blocks(sel, geo, self.sink, key_valid, q)
        return BlockLayout.from_block_mask(m, block_size=bs, q_len=nq, kv_len=nk)

    examples = ({"bits": 4, "rel": 0.3, "q_samples": 4, "block_size": 16},
                {"bits": 8, "rel": 0.3, "q_samples": 16, "block_size": 16})
    full_example = {"rel": 1e-30, "block_size": 16}

    def reference_mask(self, q, k, key_valid=None):
        """Loop by loop: q and k quantized symmetrically per block of ``block_size`` tokens to ``bits`` bits
        (scale = block max |x| / (2^(bits-1) - 1)); on each sampled query row, the block-wise max of the
        quantized scaled scores; a block is kept when its max is >= the row's max + log(rel); plus the sinks and
        the diagonal."""
        bs, d = self.block_size, q.shape[-1]
        qmax = 2 ** (self.bits - 1) - 1

        def quant(x):
            out = x.clone().double()
            for c in range(0, x.shape[0], bs):
                blk = x[c : c + bs].double()
                s = max(float(blk.abs().max()), 1e-12) / qmax
                out[c : c + bs] = torch.clamp(torch.round(blk / s), -qmax - 1, qmax) * s
            return out

        def rows(bi, h, qh, kh, ok, off):
            qq, kq = quant(qh), quant(kh)
            chosen = set()
            for i in sorted(set(self.sample_rows(qh.shape[0]).tolist())):
                qp = i + off
                blockmax = {}
                for j in range(qp + 1):
                    if ok is not None and not ok[j]:
                        continue
                    s = float(qq[i] @ kq[j]) / math.sqrt(d)
                    blockmax[j // bs] = max(blockmax.get(j // bs, float("-inf")), s)
                if not blockmax:  # a padded query row sees no key
                    continue
                top = max(blockmax.values())
                chosen |= {(i // bs, jb) for jb, s in blockmax.items() if s >= top + math.log(self.rel) - 1e-9}
            return chosen

        return _slow.estimated_blocks(self, q, k, key_valid, rows)
