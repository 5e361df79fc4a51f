"""Lightning attention as a layer: linear attention with a per-head decay, tiled (``ops/linear.py``).

Papers: "TransNormerLLM" (Qin et al., 2023, https://arxiv.org/abs/2307.14995) and "Lightning Attention-2" (Qin et
al., 2024, https://arxiv.org/abs/2401.04658). ``o_t = q_t sum_{s<=t} lambda_h^(t-s) k_s^T v_s`` with SiLU feature
maps on q and k, the per-head output normalised by an RMS norm, then gated by ``silu(x W_u)`` and projected.
Decay (TransNormerLLM's schedule as its reference code builds it): ``lambda_h = exp(-s_h (1 - l / (L - 1) +
1e-5))`` with ``s_h`` head ``h``'s ALiBi slope (``2^(-8 (h + 1) / H)`` for ``H`` a power of two; ALiBi's
interleave otherwise), ``l`` the layer's index among ``L`` (``layer_idx`` / ``num_layers``, set by the trainer):
the first layer's heads forget at rates from ``exp(-2^(-8/H))`` down to nearly none, and the last layer does not
decay at all (``lambda = exp(-1e-5 s_h)``). Bidirectional form: no decay, ``o = q (sum_s k_s^T v_s)``. Recurrent
form: the ``[heads, d, d]`` state, one token at a time.

Departure: TransNormerLLM's SRMSNorm is an RMS norm without a learned gain here. (Until this version the decay
was ``exp(-8 (h + 1) / H)`` — the paper's ``8h/H`` read as the slope itself, which forgets a token within one
or two steps on every head; the model then sat at chance on MQAR.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.linear import lightning_attention, linear_decode_step
from ..registry import register
from .base import Mixer

__all__ = ["Lightning", "alibi_slopes"]


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al., 2022): ``2^(-8 (h + 1) / H)`` for ``H`` a power of two; otherwise
    those of the largest power of two below ``H`` followed by every other slope of twice that."""
    def pow2(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    if heads & (heads - 1) == 0:
        return torch.tensor(pow2(heads), dtype=torch.float64).float()
    p = 1 << (heads.bit_length() - 1)
    return torch.tensor(pow2(p) + pow2(2 * p)[0::2][: heads - p], dtype=torch.float64).float()


@register("lightning", "mixer", paper="TransNormerLLM (Qin et al., 2023) https://arxiv.org/abs/2307.14995; "
          "Lightning Attention-2 https://arxiv.org/abs/2401.04658",
          summary="linear attention with per-head decay, tiled (Lightning), RMS-normed and gated; recurrent step")
class Lightning(Mixer):
    """Linear attention with decay (Lightning Attention-2 tiling)."""

    recurrent = True
    examples = ({}, {"block_size": 8})

    def __init__(self, dim: int, heads: int = 4, causal: bool = True, block_size: int = 64, layer_idx: int = 0,
                 num_layers: int = 1) -> None:
        super().__init__(dim, heads, causal)
        if not 0 <= layer_idx < num_layers:
            raise ValueError(f"lightning: layer_idx must be in [0, num_layers), got {layer_idx} of {num_layers}")
        self.block_size = block_size
        self.qkvu = nn.Linear(dim, 4 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        depth = 1.0 - layer_idx / (num_layers - 1) + 1e-5 if num_layers > 1 else 1.0 + 1e-5
        self.register_buffer("decay", torch.exp(-alibi_slopes(heads) * depth), persistent=False)

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


