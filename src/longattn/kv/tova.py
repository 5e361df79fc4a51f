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
from .base import KVPolicy, attention_to_keys, slow_probs

__all__ = ["TOVA"]


@register("tova", "kv", paper="TOVA (Oren et al., EMNLP 2024) https://arxiv.org/abs/2401.06104",
          summary="last-token attention averaged over heads")
@dataclass(frozen=True)
class TOVA(KVPolicy):
    """Last-token attention, head-averaged."""

    kvpress_press = "TOVAPress"
    examples = ({},)

    def reference_scores(self, q, k, v, key_valid=None, module=None):
        """Loop by loop: the last query's softmax attention to key j, averaged over every query head of the layer
        (one selection shared by the kv heads); the last token always kept."""
        b, hq, nq, _ = q.shape
        hk, n = k.shape[1], k.shape[2]
        out = torch.zeros(b, hk, n, dtype=torch.float64)
        for bi in range(b):
            acc = [0.0] * n
            for hh in range(hq):
                for j, p in slow_probs(q, k, key_valid, bi, hh, nq - 1, module).items():
                    acc[j] += p / hq
            for h in range(hk):
                for j in range(n):
                    out[bi, h, j] = acc[j]
                out[bi, h, n - 1] = 1e9
        return out

    def score(self, q, k, v, key_valid, module=None) -> torch.Tensor:
        s = attention_to_keys(q, k, key_valid, queries=1, normalize=False, module=module)  # [b, hk, n]
        s = s.mean(1, keepdim=True).expand_as(s).clone()
        s[..., -1] = float("inf")
        return s
