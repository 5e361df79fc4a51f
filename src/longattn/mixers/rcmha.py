"""RCMHA: relative convolutional multi-head attention.

Paper: "RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling" (Sugiharto et al.,
2023, https://arxiv.org/abs/2308.03429): multi-head attention whose query, key and value inputs pass through a
depth-wise convolution over the sequence, scored with Transformer-XL's relative positions (Dai et al., ACL 2019,
https://arxiv.org/abs/1901.02860). Per head, with ``q = DW_q(W_q x)``, ``k = DW_k(W_k x)``, ``v = DW_v(W_v x)``
(``DW``: one kernel of ``kernel`` taps per channel; causal: taps on ``i - kernel + 1 .. i``; bidirectional:
centred) and ``R_r`` the sinusoidal embedding of the signed distance ``r = i - j`` projected by ``W_r``:

``s_ij = ((q_i + u) . k_j + (q_i + w) . W_r R_{i-j}) / sqrt(d)``, ``y_i = sum_j softmax_j(s_ij) v_j``

with learnable ``u, w`` per head (Transformer-XL's content and position biases), then the output projection.

Departures: padded tokens enter the convolutions as zeros (so that their content changes nothing real); the
convolution has no bias (the projections' biases play that part).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_int
from ..registry import register
from .base import Mixer

__all__ = ["RCMHA", "rel_shift", "sinusoid"]


def sinusoid(r: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding ``[..., dim]`` of (signed, real-valued) distances ``r`` (Vaswani et al.)."""
    half = dim // 2
    inv = 10000.0 ** (-torch.arange(half, dtype=r.dtype, device=r.device) * 2 / dim)
    ang = r[..., None] * inv
    out = torch.stack([ang.sin(), ang.cos()], -1).flatten(-2)
    return F.pad(out, (0, dim - 2 * half))


def rel_shift(pos_all: torch.Tensor) -> torch.Tensor:
    """``[..., n, n]`` with ``out[..., i, j] = pos_all[..., i, n - 1 - i + j]`` from a contiguous ``[..., n, 2n - 1]``
    (Transformer-XL's relative shift): a strided view, element ``(i, j)`` at offset ``i (2n - 2) + n - 1 + j`` of
    its row block, so neither an ``[n, n]`` index tensor nor a gather (nor its scatter backward) is needed."""
    *lead, n, r = pos_all.shape
    if r != 2 * n - 1 or not pos_all.is_contiguous():
        raise ValueError(f"rel_shift: expected a contiguous [..., n, 2n - 1] tensor, got {tuple(pos_all.shape)}")
    if n == 1:
        return pos_all
    flat = pos_all.reshape(-1, n * r)
    out = flat.as_strided((flat.shape[0], n, n), (n * r, r - 1, 1), flat.storage_offset() + n - 1)
    return out.reshape(*lead, n, n)


@register("rcmha", "mixer", paper="RCMHA (Sugiharto et al., 2023) https://arxiv.org/abs/2308.03429",
          summary="depth-wise convolved q/k/v with Transformer-XL relative-position scores")
class RCMHA(Mixer):
    """Relative convolutional multi-head attention."""

    examples = ({"kernel": 3}, {"kernel": 1})

    def __init__(self, dim: int, heads: int = 4, causal: bool = True, kernel: int = 3) -> None:
        super().__init__(dim, heads, causal)
        check_int(kernel, "kernel", 1)
        self.kernel = kernel
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.conv = nn.Parameter(torch.randn(3 * dim, kernel) / math.sqrt(kernel))  # depth-wise taps
        self.rel = nn.Linear(dim, dim, bias=False)
        self.u = nn.Parameter(0.1 * torch.randn(heads, self.head_dim))
        self.w = nn.Parameter(0.1 * torch.randn(heads, self.head_dim))
        self.out = nn.Linear(dim, dim, bias=False)

    def _left(self) -> int:
        """Taps before the current position (causal: all but one; bidirectional: half)."""
        return self.kernel - 1 if self.causal else (self.kernel - 1) // 2

    def _qkv(self, x, mask):
        z = self.masked(self.qkv(x), mask).transpose(1, 2)  # [b, 3 dim, n]
        left = self._left()
        z = F.pad(z, (left, self.kernel - 1 - left))
        z = F.conv1d(z, self.conv[:, None], groups=z.shape[1]).transpose(1, 2)
        q, k, v = z.chunk(3, -1)
        return self.split(q), self.split(k), self.split(v)

    def _rel(self, n, x):
        """``[heads, 2n - 1, head_dim]``: the projected embeddings of distances ``n - 1 .. -(n - 1)``."""
        r = torch.arange(n - 1, -n, -1, dtype=x.dtype, device=x.device)
        return self.rel(sinusoid(r, self.dim)).view(2 * n - 1, self.heads, self.head_dim).transpose(0, 1)

    def forward(self, x, mask=None):
        self.check_input(x, mask)
        q, k, v = self._qkv(x, mask)
        b, h, n, d = q.shape
        scale = 1.0 / math.sqrt(d)  # on the queries (n x d), not on the n x n scores
        rel = self._rel(n, x)  # index n - 1 - (i - j) holds distance i - j
        content = torch.einsum("bhid,bhjd->bhij", (q + self.u[None, :, None]) * scale, k)
        # a broadcast matmul lays the result out as [b, h, n, 2n - 1] directly (an einsum folds b into n and
        # permutes after: a copy of the largest tensor here, and another in the backward)
        pos_all = torch.matmul((q + self.w[None, :, None]) * scale, rel.transpose(1, 2)[None]).contiguous()
        s = content + rel_shift(pos_all)  # [b, h, n, n]
        allowed = torch.ones(n, n, dtype=torch.bool, device=x.device)
        allowed = (allowed.tril() if self.causal else allowed)[None, None]
        if mask is not None:
            allowed = allowed & mask[:, None, None, :].bool()
        # the most negative float, not -inf: a row with no allowed key (a padded query) gets some average instead
        # of NaN, and its output is zeroed by the mask below; every real query attends at least to itself
        p = s.masked_fill(~allowed, torch.finfo(s.dtype).min).softmax(-1)
        return self.masked(self.out(self.merge(p @ v)), mask)

    def reference(self, x, mask=None):
        b, n, _ = x.shape
        z = self.qkv(x)
        left = self._left()
        conv = torch.zeros_like(z)
        for bi in range(b):
            for i in range(n):
                for t in range(self.kernel):
                    j = i - left + t
                    if 0 <= j < n and (mask is None or bool(mask[bi, j])):
                        conv[bi, i] = conv[bi, i] + self.conv[:, t] * z[bi, j]
        q, k, v = (self.split(t) for t in conv.chunk(3, -1))
        d = self.head_dim
        y = torch.zeros_like(q)
        for bi in range(b):
            for hh in range(self.heads):
                for i in range(n):
                    keys = [j for j in range(n) if (not self.causal or j <= i) and (mask is None or bool(mask[bi, j]))]
                    if not keys:
                        continue
                    sc = []
                    for j in keys:
                        r = self.rel(sinusoid(torch.tensor(float(i - j), dtype=x.dtype), self.dim))
                        r = r.view(self.heads, d)[hh]
                        sc.append(((q[bi, hh, i] + self.u[hh]) @ k[bi, hh, j] + (q[bi, hh, i] + self.w[hh]) @ r)
                                  / math.sqrt(d))
                    p = torch.softmax(torch.stack(sc), 0)
                    y[bi, hh, i] = sum(p[t] * v[bi, hh, j] for t, j in enumerate(keys))
        return self.masked(self.out(self.merge(y)), mask)
