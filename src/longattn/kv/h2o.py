"""H2O: keep the heavy hitters, the keys that received the most attention during prefill.

Paper: "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models" (Zhang et al.,
NeurIPS 2023, https://arxiv.org/abs/2306.14048). Score of key j = attention it received, summed over all
prefill queries, divided by the number of queries that can see it (as kvpress's ``ObservedAttentionPress``;
the paper sums without normalising, which favours early tokens), averaged over the query heads of its GQA
group. Departures: applied once at the end of prefill (the paper evicts greedily while generating; see
``decode_budget``, not implemented: a clear error); the attention is recomputed in float32 chunks of queries,
so H2O costs about one extra attention pass of the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register
from .base import KVPolicy, attention_to_keys

__all__ = ["H2O"]


@register("h2o", "kv", paper="H2O (Zhang et al., NeurIPS 2023) https://arxiv.org/abs/2306.14048",
          summary="heavy hitters: mean attention received over all prefill queries")
@dataclass(frozen=True)
class H2O(KVPolicy):
    """Accumulated (observed) attention of every prefill query."""

    n_recent: int = 0  # recent tokens always kept (the paper keeps a recent window besides the heavy hitters)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.n_recent, int) or self.n_recent < 0:
            raise ValueError(f"n_recent must be an int >= 0, got {self.n_recent!r}")

    def score(self, q, k, v, key_valid, module=None) -> torch.Tensor:
        s = attention_to_keys(q, k, key_valid)
        if self.n_recent:
            n = k.shape[2]
            r = min(self.n_recent, n)
            s[..., n - r :] = s.amax() + 1.0 + torch.arange(r, device=s.device, dtype=s.dtype)
        return s
