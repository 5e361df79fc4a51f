"""Key-norm: keep the keys with the smallest L2 norm.

Paper: "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression" (Devoto et al., EMNLP 2024,
https://arxiv.org/abs/2406.11430). Score = -||k||_2 of the post-RoPE key (RoPE preserves the norm), as
kvpress's ``KnormPress``. Needs no attention at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register
from .base import KVPolicy

__all__ = ["KNorm"]


@register("knorm", "kv", paper="Devoto et al., EMNLP 2024 https://arxiv.org/abs/2406.11430",
          summary="keep the keys of smallest L2 norm")
@dataclass(frozen=True)
class KNorm(KVPolicy):
    """Low key norm = high attention."""

    kvpress_press = "KnormPress"
    examples = ({},)

    def reference_scores(self, q, k, v, key_valid=None, module=None):
        """Loop by loop: minus the L2 norm of each key (low key norm = high attention, Devoto et al.)."""
        b, hk, n, d = k.shape
        out = torch.zeros(b, hk, n, dtype=torch.float64)
        for bi in range(b):
            for h in range(hk):
                for j in range(n):
                    out[bi, h, j] = -sum(float(x) ** 2 for x in k[bi, h, j].double()) ** 0.5
        return out

    def score(self, q, k, v, key_valid, module=None) -> torch.Tensor:
        return -k.float().norm(dim=-1)
