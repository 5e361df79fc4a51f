"""GAAM: multi-head Gaussian adaptive attention, learnable means and variances over the sequence's statistics.

Paper: "Gaussian Adaptive Attention is All You Need: Robust Contextual Representations Across Multiple
Modalities" (Ioannides, Chadha & Elkins, 2024, https://arxiv.org/abs/2401.11143). Per head (a slice of
``head_dim`` features) and per feature ``f``, over the real tokens ``i`` of the sequence:

* ``mu_f = mean_i x_if``, ``var_f = var_i x_if + eps`` (unbiased variance, as the reference code);
* for each of the head's ``gaussians`` Gaussians ``g`` with learnable mean offset ``delta_g`` and scale ``c_g``:
  ``z = (x_if - (mu_f + delta_g)) / sqrt(var_f)``, ``G_g = exp(-z^2 / (2 c_g^2)) / sqrt(2 pi c_g^2)``;
* the mixture ``M_if = prod_g G_g`` is normalized over the sequence, ``A_if = M_if / max(sum_j M_jf, eps)``;
* the output is ``y_if = x_if * A_if``: each feature of each token reweighted by how typical it is of the sequence
  (a density-based attention over positions, one distribution per feature, no query-key products).

Departures: heads split the feature axis (the reference code splits its normalization axis, which along the
sequence would tie a head to a fixed range of positions); padded tokens take part in no statistic and get zero
output (the reference passes them through unchanged); ``c`` starts at 2 (the reference's later default; its
first version drew ``c`` from a standard normal, which can start near 0). Bidirectional only, as the paper (an
encoder mechanism; the statistics see the whole sequence). The module has no projections: its parameters are the
offsets and scales alone, as in the paper ("a marginal increase in learnable parameters").
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..checks import check_int
from ..registry import register
from .base import Mixer

__all__ = ["GAAM"]


@register("gaam", "mixer", paper="Gaussian Adaptive Attention (Ioannides et al., 2024) https://arxiv.org/abs/2401.11143",
          summary="per-feature Gaussian densities over the sequence's mean and variance, learnable offsets and scales "
                  "(bidirectional)")
class GAAM(Mixer):
    """Multi-head Gaussian adaptive attention (bidirectional)."""

    supports_causal = (False,)
    examples = ({"gaussians": 1}, {"gaussians": 3})

    def __init__(self, dim: int, heads: int = 4, causal: bool = False, gaussians: int = 2, eps: float = 1e-8) -> None:
        super().__init__(dim, heads, causal)
        check_int(gaussians, "gaussians", 1)
        self.gaussians, self.eps = gaussians, eps
        self.offset = nn.Parameter(torch.zeros(heads, gaussians))
        self.c = nn.Parameter(torch.full((heads, gaussians), 2.0))
        with torch.no_grad():  # distinct starting points, so that every parameter matters in the tests
            self.offset.add_(0.1 * torch.randn(heads, gaussians))
            self.c.add_(0.1 * torch.randn(heads, gaussians))

    def forward(self, x, mask=None):
        self.check_input(x, mask)
        b, n, _ = x.shape
        real = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask.bool()
        w = real[..., None].to(x.dtype)  # [b, n, 1]
        cnt = w.sum(1, keepdim=True)
        mu = (x * w).sum(1, keepdim=True) / cnt
        var = ((x - mu) ** 2 * w).sum(1, keepdim=True) / (cnt - 1).clamp_min(1) + self.eps
        xh = x.view(b, n, self.heads, 1, self.head_dim)
        mu_h = mu.view(b, 1, self.heads, 1, self.head_dim)
        sd_h = var.sqrt().view(b, 1, self.heads, 1, self.head_dim)
        off = self.offset.view(1, 1, self.heads, self.gaussians, 1)
        c2 = (self.c ** 2).view(1, 1, self.heads, self.gaussians, 1)
        z = (xh - (mu_h + off)) / sd_h
        dens = torch.exp(-(z ** 2) / (2 * c2)) / torch.sqrt(2 * math.pi * c2)
        mix = dens.prod(3).reshape(b, n, self.dim) * w
        att = mix / mix.sum(1, keepdim=True).clamp_min(self.eps)
        return self.masked(x * att, mask)

    def reference(self, x, mask=None):
        b, n, _ = x.shape
        y = torch.zeros_like(x)
        for bi in range(b):
            real = [i for i in range(n) if mask is None or bool(mask[bi, i])]
            for f in range(self.dim):
                h = f // self.head_dim
                vals = [x[bi, i, f] for i in real]
                mu = sum(vals) / len(vals)
                var = sum((v - mu) ** 2 for v in vals) / max(len(vals) - 1, 1) + self.eps
                mixture = {}
                for i in real:
                    m = 1.0
                    for g in range(self.gaussians):
                        c = self.c[h, g]
                        z = (x[bi, i, f] - (mu + self.offset[h, g])) / torch.sqrt(var)
                        m = m * torch.exp(-z * z / (2 * c * c)) / torch.sqrt(2 * math.pi * c * c)
                    mixture[i] = m
                total = sum(mixture.values())
                total = torch.clamp(total, min=self.eps)
                for i in real:
                    y[bi, i, f] = x[bi, i, f] * mixture[i] / total
        return y
