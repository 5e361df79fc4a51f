"""Block top-k prefill pattern (MInference block-sparse), with a mass-threshold variant (FlexPrefill/XAttention).

Papers: MInference 1.0 "block-sparse" head pattern (Jiang et al., NeurIPS 2024,
https://arxiv.org/abs/2407.02490); the threshold rule of FlexPrefill (Lai et al., ICLR 2025,
https://arxiv.org/abs/2502.20766) and XAttention (Xu et al., 2025, https://arxiv.org/abs/2503.16428).

Queries and keys are mean-pooled per block; the pooled logits estimate each (query block, kv block) affinity.
``mode="topk"`` keeps the ``topk`` best kv blocks per query block; ``mode="threshold"`` keeps the smallest set
whose estimated mass reaches ``tau``, the mass of a block being estimated as softmax(pooled logit + log(number of
visible keys in the block)). The first ``sink`` real tokens' blocks and the diagonal block are always kept.

Departures: MInference pools with the kernel's 64-token blocks as here; FlexPrefill estimates from the last
query block and XAttention from anti-diagonal sums, both replaced here by mean pooling of every query block. The
complete methods are ``flexprefill`` (per-head pattern choice, vertical-slash lines) and ``xattention``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..checks import check_float, check_int
from ..layout import BlockLayout
from ..registry import register
from . import _slow
from .base import Geometry, PrefillPattern, block_scores, finish_blocks, threshold_mask, topk_mask

__all__ = ["BlockTopK"]

MODES = ("topk", "threshold")


@register(
    "block_topk",
    "prefill",
    paper="MInference block-sparse https://arxiv.org/abs/2407.02490; FlexPrefill threshold "
    "https://arxiv.org/abs/2502.20766",
    summary="mean-pooled block estimate; top-k kv blocks (or mass threshold tau) per query block",
)
@dataclass(frozen=True)
class BlockTopK(PrefillPattern):
    """Top-k (or mass-threshold) kv blocks per query block from mean-pooled q/k."""

    topk: int = 16
    mode: str = "topk"
    tau: float = 0.9
    sink: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.topk, "topk")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        check_float(self.tau, "tau", 0.0, 1.0)
        check_int(self.sink, "sink", 0)

    def layout(self, q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None = None) -> BlockLayout:
        bs = self.block_size
        geo = Geometry(q.shape[2], k.shape[2], bs, q.device)
        s = block_scores(q, k, bs, key_valid)  # [b, hq, nqb, nkb]
        allowed = geo.causal_blocks()[None, None] & torch.isfinite(s)
        if self.mode == "topk":
            sel = topk_mask(s, self.topk, allowed)
        else:
            sel = threshold_mask(s + torch.log(visible_keys(geo, key_valid, q.shape[0])), self.tau, allowed)
        m = finish_blocks(sel, geo, self.sink, key_valid, q)
        return BlockLayout.from_block_mask(m, block_size=bs, q_len=geo.q_len, kv_len=geo.kv_len)

    examples = ({"topk": 3, "sink": 8, "block_size": 16}, {"mode": "threshold", "tau": 0.6, "sink": 0, "block_size": 16})
    full_example = {"topk": 20, "block_size": 16}

    def reference_mask(self, q, k, key_valid=None):
        """Loop by loop: block estimate = pooled-q . pooled-k / sqrt(d) over the real keys; ``topk``: the best
        reachable blocks; ``threshold``: the smallest set of blocks, best first, whose softmax over (estimate +
        log visible keys) reaches ``tau``; plus the sinks and the diagonal."""
        bs, d, nq, nk = self.block_size, q.shape[-1], q.shape[2], k.shape[2]
        nqb, nkb = -(-nq // bs), -(-nk // bs)

        def rows(bi, h, qh, kh, ok, off):
            qp, kp = _slow.pooled(qh, nqb, bs), _slow.pooled(kh, nkb, bs, ok)
            est = [[float(qp[i] @ kp[j]) / math.sqrt(d) if kp[j] is not None else float("-inf")
                    for j in range(nkb)] for i in range(nqb)]
            if self.mode == "topk":
                return _slow.topk_rows(est, self.topk, nq, off, bs)
            chosen = set()
            for i in range(nqb):
                q_hi = min((i + 1) * bs, nq) - 1 + off
                cnt = [sum(1 for t in range(j * bs, min((j + 1) * bs, nk, q_hi + 1)) if ok is None or ok[t])
                       for j in range(nkb)]
                row = [est[i][j] + math.log(max(cnt[j], 1)) if j <= q_hi // bs else float("-inf")
                       for j in range(nkb)]
                pr = torch.softmax(torch.tensor(row, dtype=torch.float64), 0).tolist()
                acc = 0.0
                for pj, j in sorted(((pj, j) for j, pj in enumerate(pr)), reverse=True):
                    if acc < self.tau and pj > 0:
                        chosen.add((i, j))
                    acc += pj
            return chosen

        return _slow.estimated_blocks(self, q, k, key_valid, rows)


def visible_keys(geo: Geometry, key_valid: torch.Tensor | None, batch: int) -> torch.Tensor:
    """``[b, 1, nqb, nkb]`` float: valid keys of each kv block visible to the q block's last query (>= 1)."""
    bs = geo.bs
    kvb = torch.ones(batch, geo.kv_len, device=geo.device) if key_valid is None else key_valid.float()
    cum = torch.nn.functional.pad(kvb.cumsum(-1), (1, 0))  # cum[x] = valid keys < x
    lo = geo.kb * bs
    hi = torch.minimum(torch.clamp(lo + bs, max=geo.kv_len)[None, :], geo.q_hi[:, None] + 1)  # [nqb, nkb]
    hi = torch.maximum(hi, lo[None, :])
    n = cum[:, hi] - cum[:, lo][:, None, :]
    return n.clamp_min(1.0)[:, None]
