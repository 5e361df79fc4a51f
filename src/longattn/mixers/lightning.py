"""Lightning attention as a layer: linear attention with a per-head decay, tiled (``ops/linear.py``).

Papers: "TransNormerLLM" (Qin et al., 2023, https://arxiv.org/abs/2307.14995) and "Lightning Attention-2" (Qin et
al., 2024, https://arxiv.org/abs/2401.04658). ``o_t = q_t sum_{s<=t} lambda_h^(t-s) k_s^T v_s`` with SiLU feature
maps on q and k, head ``h``'s decay ``lambda_h = exp(-8 (h + 1) / H)`` (TransNormerLLM's fixed schedule), the
per-head output normalised by an RMS norm, then gated by ``silu(x W_u)`` and projected. Bidirectional form: no
decay, ``o = q (sum_s k_s^T v_s)``. Recurrent form: the ``[heads, d, d]`` state, one token at a time.

Departure: TransNormerLLM's SRMSNorm is an RMS norm without a learned gain here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.linear import lightning_attention, linear_decode_step
from ..registry import register
from .base import Mixer

__all__ = ["Lightning"]


@register("lightning", "mixer", paper="TransNormerLLM (Qin et al., 2023) https://arxiv.org/abs/2307.14995; "
          "Lightning Attention-2 https://arxiv.org/abs/2401.04658",
          summary="linear attention with per-head decay, tiled (Lightning), RMS-normed and gated; recurrent step")
class Lightning(Mixer):
    """Linear attention with decay (Lightning Attention-2 tiling)."""

    recurrent = True
    examples = ({}, {"block_size": 8})

    def __init__(self, dim: int, heads: int = 4, causal: bool = True, block_size: int = 64) -> None:
        super().__init__(dim, heads, causal)
        self.block_size = block_size
        self.qkvu = nn.Linear(dim, 4 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.register_buffer("decay", torch.exp(-8.0 * torch.arange(1, heads + 1) / heads), persistent=False)

    def _proj(self, x, mask):
        q, k, v, u = self.qkvu(x).chunk(4, -1)
        q, k, v = F.silu(self.split(q)), F.silu(self.split(k)), self.split(v)
        if mask is not None:  # a padded token writes nothing into the state
            k = k * mask[:, None, :, None].to(k.dtype)
        return q, k, v, u

    def _finish(self, o, u, mask):
        o = o / (o.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
        return self.masked(self.out(self.merge(o) * F.silu(u)), mask)

    def forward(self, x, mask=None):
        self.check_input(x, mask)
        q, k, v, u = self._proj(x, mask)
        o = lightning_attention(q, k, v, decay=self.decay if self.causal else None, causal=self.causal,
                                block_size=self.block_size)
        return self._finish(o, u, mask)

    def reference(self, x, mask=None):
        q, k, v, u = self._proj(x, mask)
        b, h, n, d = q.shape
        o = torch.zeros_like(v)
        for t in range(n):
            for s in range(n):
                if self.causal and s > t:
                    continue
                w = self.decay[None, :, None] ** (t - s) if self.causal else torch.ones(1, h, 1, dtype=q.dtype)
                o[:, :, t] += (q[:, :, t] * k[:, :, s]).sum(-1, keepdim=True) * w * v[:, :, s]
        return self._finish(o, u, mask)

    def init_state(self, batch: int):
        return None

    def step(self, x_t, state):
        """One token ``x_t [b, dim]`` (causal form): ``(y_t [b, dim], state)``."""
        if not self.causal:
            raise ValueError("step: the recurrent form is the causal one")
        q, k, v, u = self._proj(x_t[:, None], None)
        o, state = linear_decode_step(q, k, v, state, decay=self.decay)
        return self._finish(o, u, None)[:, 0], state


