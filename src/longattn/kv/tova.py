"""TOVA: keep the keys the last token attends to most.

Paper: "Transformers are Multi-State RNNs" (Oren et al., EMNLP 2024, https://arxiv.org/abs/2401.06104).
Score = attention of the last prompt token, averaged over all query heads of the layer (so every kv head
keeps the same positions, as in the paper and kvpress's ``TOVAPress``); the last token itself is always kept.
Departure: applied once at the end of prefill with budget ``int(n * (1 - ratio))`` instead of evicting one
token per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register
from .base import KVPolicy, attention_to_keys

__all__ = ["TOVA"]


@register("tova", "kv", paper="TOVA (Oren et al., EMNLP 2024) https://arxiv.org/abs/2401.06104",
          summary="last-token attention averaged over heads")
@dataclass(frozen=True)
class TOVA(KVPolicy):
    """Last-token attention, head-averaged."""

    kvpress_press = "TOVAPress"
    examples = ({},)

    def score(self, q, k, v, key_valid, module=None) -> torch.Tensor:
        s = attention_to_keys(q, k, key_valid, queries=1, normalize=False)  # [b, hk, n]
        s = s.mean(1, keepdim=True).expand_as(s).clone()
        s[..., -1] = float("inf")
        return s
