"""Linear-time attention-map estimate with a kernel feature map, then top-k blocks (SEA).

Paper: SEA, "Sparse Linear Attention with Estimated Attention Mask" (Lee et al., ICLR 2024,
https://arxiv.org/abs/2310.01777).

The softmax kernel ``exp(q.k / sqrt(d))`` is approximated with positive random features (FAVOR+, Choromanski
et al., https://arxiv.org/abs/2009.14794): ``phi(x) = exp(w.x - |x|^2 / 2)`` with ``features`` orthogonal Gaussian
``w``, on ``x / d^(1/4)``. The estimated mass of a (query block, kv block) pair is ``(sum_q phi(q)) . (sum_k
phi(k))`` — linear in the sequence length up to the block grid — computed in the log domain; the ``topk`` kv
blocks per query block are kept, plus sinks and the diagonal block.

Departures: SEA trains a small estimator (a linear attention with a learned feature map and a CNN decoder) and
selects top-k per query *row*; this is training-free (random features, fixed seed) and selects per block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import check_int
from ..layout import BlockLayout
from ..registry import register
from . import _slow
from .base import Geometry, PrefillPattern, expand_heads, finish_blocks, topk_mask

__all__ = ["LinearEstimate"]


def _orthogonal_gaussian(m: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(-(-m // d)):
        qm, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
        blocks.append(qm.T)
    w = torch.cat(blocks)[:m]
    norms = torch.randn(m, d, generator=g).norm(dim=1, keepdim=True)
    return w * norms


def _log_block_features(x: torch.Tensor, w: torch.Tensor, bs: int, valid: torch.Tensor | None) -> torch.Tensor:
    """log sum_{tokens of a block} phi(token): ``[b, h, nb, m]`` (-inf for a block without valid tokens)."""
    b, h, n, d = x.shape
    xs = x.float() / d**0.25
    logphi = torch.matmul(xs, w.T.to(x.device)) - 0.5 * (xs * xs).sum(-1, keepdim=True)  # [b, h, n, m]
    if valid is not None:
        logphi = logphi.masked_fill(~valid.to(torch.bool)[:, None, :, None], float("-inf"))
    nb = -(-n // bs)
    lp = F.pad(logphi, (0, 0, 0, nb * bs - n), value=float("-inf")).reshape(b, h, nb, bs, -1)
    return torch.logsumexp(lp, dim=3)


def _log_matmul(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """log(exp(a) @ exp(c)^T) for ``a [..., i, m]``, ``c [..., j, m]`` without overflow."""
    am = a.amax(-1, keepdim=True).clamp_min(-1e30)
    cm = c.amax(-1, keepdim=True).clamp_min(-1e30)
    prod = torch.matmul(torch.exp(a - am), torch.exp(c - cm).transpose(-1, -2))
    return torch.log(prod) + am + cm.transpose(-1, -2)


@register(
    "linear_estimate",
    "prefill",
    paper="SEA (Lee et al., ICLR 2024) https://arxiv.org/abs/2310.01777",
    summary="random-feature (linear-time) estimate of block attention mass; top-k blocks",
)
@dataclass(frozen=True)
class LinearEstimate(PrefillPattern):
    """Top-k kv blocks per query block by a positive-random-feature estimate of the attention mass."""

    topk: int = 16
    features: int = 64
    seed: int = 0
    sink: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.topk, "topk")
        check_int(self.features, "features")
        check_int(self.seed, "seed", 0)
        check_int(self.sink, "sink", 0)

    def layout(self, q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None = None) -> BlockLayout:
        bs = self.block_size
        geo = Geometry(q.shape[2], k.shape[2], bs, q.device)
        w = _orthogonal_gaussian(self.features, q.shape[-1], self.seed)
        lq = _log_block_features(q, w, bs, None)
        lk = _log_block_features(k, w, bs, key_valid)
        est = _log_matmul(lq, expand_heads(lk, q.shape[1]))  # [b, hq, nqb, nkb]
        allowed = geo.causal_blocks()[None, None] & torch.isfinite(est)
        sel = topk_mask(est.nan_to_num(float("-inf")), self.topk, allowed)
        m = finish_blocks(sel, geo, self.sink, key_valid, q)
        return BlockLayout.from_block_mask(m, block_size=bs, q_len=geo.q_len, kv_len=geo.kv_len)

    examples = ({"topk": 3, "features": 24, "block_size": 16},)
    full_example = {"topk": 20, "block_size": 16}

    def reference_mask(self, q, k, key_valid=None):
        """Loop by loop: block mass estimate log(sum_q phi(q) . sum_k phi(k)) with the positive random features
        phi(x) = exp(w x - |x|^2 / 2) of x / d^(1/4) (the same seeded projection w); the ``topk`` best reachable
        blocks, plus the sinks and the diagonal."""
        bs, d, nq, nk = self.block_size, q.shape[-1], q.shape[2], k.shape[2]
        nqb, nkb = -(-nq // bs), -(-nk // bs)
        w = _orthogonal_gaussian(self.features, d, self.seed).double()

        def phi(x):
            x = x.double() / d**0.25
            return torch.exp(w @ x - 0.5 * (x @ x))

        def rows(bi, h, qh, kh, ok, off):
            sq = [sum(phi(qh[t]) for t in range(i * bs, min((i + 1) * bs, nq))) for i in range(nqb)]
            sk = []
            for j in range(nkb):
                ts = [t for t in range(j * bs, min((j + 1) * bs, nk)) if ok is None or ok[t]]
                sk.append(sum(phi(kh[t]) for t in ts) if ts else None)
            est = [[math.log(float(sq[i] @ sk[j])) if sk[j] is not None else float("-inf") for j in range(nkb)]
                   for i in range(nqb)]
            return _slow.topk_rows(est, self.topk, nq, off, bs)

        return _slow.estimated_blocks(self, q, k, key_valid, rows)
