"""Softmax attention, the baseline every mixer is compared with.

Paper: "Attention Is All You Need" (Vaswani et al., NeurIPS 2017, https://arxiv.org/abs/1706.03762):
``softmax(q k^T / sqrt(d)) v`` per head, with learned q/k/v/o projections and rotary positions
("RoFormer", Su et al., 2021, https://arxiv.org/abs/2104.09864) so that it can tell positions apart. Causal or
bidirectional; padded keys are never attended.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register
from .base import Mixer

__all__ = ["SoftmaxAttention", "rope", "rope_qkv"]


def rope(x: torch.Tensor, base: float = 10000.0, pos: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary positions on ``x [..., n, d]`` (rotate-half convention) at positions ``pos [n]`` (default 0..n-1)."""
    n, d = x.shape[-2], x.shape[-1]
    half = d // 2
    inv = base ** (-torch.arange(half, dtype=torch.float64, device=x.device) / half)
    pos = torch.arange(n, device=x.device) if pos is None else pos.to(x.device)
    ang = pos.to(torch.float64)[:, None] * inv[None]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    rot = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    return torch.cat([rot, x[..., 2 * half :]], -1)


def rope_qkv(mixer: Mixer, x: torch.Tensor):
    """``(q, k, v) [b, h, n, d]`` from ``mixer.qkv`` (one ``Linear(dim, 3 dim)``), rotary positions on q and k."""
    q, k, v = mixer.qkv(x).chunk(3, -1)
    return rope(mixer.split(q)), rope(mixer.split(k)), mixer.split(v)


@register("softmax", "mixer", paper="Attention Is All You Need (Vaswani et al., NeurIPS 2017) "
          "https://arxiv.org/abs/1706.03762", summary="multi-head softmax attention with rotary positions (baseline)")
class SoftmaxAttention(Mixer):
    """Multi-head softmax attention."""

    def __init__(self, dim: int, heads: int = 4, causal: bool = True) -> None:
        super().__init__(dim, heads, causal)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    _qkv = rope_qkv

    def forward(self, x, mask=None):
        self.check_input(x, mask)
        q, k, v = self._qkv(x)
        n = x.shape[1]
        allowed = torch.ones(n, n, dtype=torch.bool, device=x.device)
        if self.causal:
            allowed = allowed.tril()
        allowed = allowed[None, None]
        if mask is not None:
            allowed = allowed & mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        y = torch.nan_to_num(y)  # a row with no key (padding) gives zeros
        return self.masked(self.out(self.merge(y)), mask)

    def reference(self, x, mask=None):
        q, k, v = self._qkv(x)
        return self.masked(self.out(self.merge(self.loop_softmax(q, k, v, mask))), mask)
