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

    def score(self, q, k, v, key_valid, module=None) -> torch.Tensor:
        return -k.float().norm(dim=-1)
