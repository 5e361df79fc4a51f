"""PGQA: grouped-query attention whose group outputs are perturbed by noise shaped like themselves.

Paper: "Beyond Uniform Query Distribution: Key-Driven Grouped Query Attention" (Khan et al., 2024,
https://arxiv.org/abs/2408.08454), section on Perturbed GQA, and its reference implementation. Query heads are
grouped uniformly (``heads / kv_heads`` per kv head, as GQA). Each group's attention output ``A [gs, n, d]`` (per
batch row) is flattened to ``gs`` rows of ``n * d`` values; a noise matrix ``N [gs, n * d]`` is drawn uniform in
[0, 1), its diagonal entries ``N[r, r]`` set to zero ("sparse noise"), each row standardized (mean 0, unbiased std
1) and rescaled to the mean and unbiased std of the same row of ``A``; the group's output is ``A - N``. The noise
is drawn once per group and forward and shared by the batch rows (each scaled by its own statistics).

Departures: the perturbation is a regularizer and is applied in training mode only (the reference code also
perturbs at evaluation, which makes inference random); in evaluation PGQA is uniform GQA. Row statistics are
taken over the real tokens only (padding changes nothing real). Bidirectional only: the row statistics see every
position, which a causal layer must not. The noise has no gradient (it is a constant given ``A``'s statistics,
which carry one: the mean and std of ``A`` are differentiated through, as in the reference code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_int
from ..registry import register
from .base import Mixer
from .kdgqa import gqa_proj

__all__ = ["PGQA", "shaped_noise"]


def shaped_noise(a: torch.Tensor, real: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The perturbation of one group: ``a [b, gs, n, d]`` the group's attention output, ``real [b, n]`` bool,
    ``u [gs, n * d]`` uniform draws (diagonal already zeroed). Returns ``[b, gs, n, d]``: ``u`` standardized per
    row and rescaled to the mean / unbiased std of each row of ``a`` over its real entries."""
    b, gs, n, d = a.shape
    us = (u - u.mean(-1, keepdim=True)) / u.std(-1, keepdim=True).masked_fill(u.std(-1, keepdim=True) == 0, 1.0)
    w = real[:, None, :, None].to(a.dtype).expand(b, gs, n, d).reshape(b, gs, n * d)
    flat = a.reshape(b, gs, n * d)
    cnt = w.sum(-1, keepdim=True)
    mean = (flat * w).sum(-1, keepdim=True) / cnt
    std = (((flat - mean) ** 2 * w).sum(-1, keepdim=True) / (cnt - 1).clamp_min(1)).sqrt()
    return (us[None] * std + mean).view(b, gs, n, d)


@register("pgqa", "mixer", paper="Key-Driven GQA (Khan et al., 2024) https://arxiv.org/abs/2408.08454",
          summary="uniform grouped-query attention with each group's output perturbed by noise of its own mean/std")
class PGQA(Mixer):
    """Perturbed grouped-query attention (bidirectional; the noise only in training mode)."""

    supports_causal = (False,)
    examples = ({"kv_heads": 2},)

    def __init__(self, dim: int, heads: int = 4, causal: bool = False, kv_heads: int = 2) -> None:
        super().__init__(dim, heads, causal)
        check_int(kv_heads, "kv_heads", 1)
        if heads % kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        self.kv_heads = kv_heads
        self.group = heads // kv_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    _proj = gqa_proj

    def draws(self, n: int, device, dtype) -> list[torch.Tensor]:
        """One uniform ``[group, n * head_dim]`` matrix per kv group, diagonal zeroed (drawn in group order)."""
        out = []
        for _ in range(self.kv_heads):
            u = torch.rand(self.group, n * self.head_dim, device=device, dtype=dtype)
            r = torch.arange(min(self.group, n * self.head_dim), device=device)
            u[r, r] = 0
            out.append(u)
        return out

    def forward(self, x, mask=None):
        self.check_input(x, mask)
        q, k, v = self._proj(x)
        b, n = x.shape[:2]
        real = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask.bool()
        allowed = real[:, None, None, :]
        kk = k.repeat_interleave(self.group, 1)
        vv = v.repeat_interleave(self.group, 1)
        y = torch.nan_to_num(F.scaled_dot_product_attention(q, kk, vv, attn_mask=allowed))
        if self.training:
            groups = y.view(b, self.kv_heads, self.group, n, self.head_dim)
            noise = torch.stack([shaped_noise(groups[:, g], real, u)
                                 for g, u in enumerate(self.draws(n, x.device, x.dtype))], 1)
            y = (groups - noise).view(b, self.heads, n, self.head_dim)
        return self.masked(self.out(self.merge(y)), mask)

    def reference(self, x, mask=None):
        q, k, v = self._proj(x)
        b, n = x.shape[:2]
        owner = [hh // self.group for hh in range(self.heads)]
        y = self.loop_softmax(q, k, v, mask, kv_head=owner)
        if self.training:
            d = self.head_dim
            for g, u in enumerate(self.draws(n, x.device, x.dtype)):
                for r in range(self.group):
                    row_u = u[r]
                    mu_u, sd_u = row_u.mean(), row_u.std()
                    z = (row_u - mu_u) / (sd_u if float(sd_u) != 0 else 1.0)
                    hh = g * self.group + r
                    for bi in range(b):
                        vals = [y[bi, hh, i, c] for i in range(n) if mask is None or bool(mask[bi, i])
                                for c in range(d)]
                        m = sum(vals) / len(vals)
                        s = (sum((t - m) ** 2 for t in vals) / max(len(vals) - 1, 1)) ** 0.5
                        noise = (z * s + m).view(n, d)
                        y[bi, hh] = y[bi, hh] - noise
        return self.masked(self.out(self.merge(y)), mask)
