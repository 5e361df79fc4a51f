"""AdaKV-style adaptive per-head budgets: a global top-k across the kv heads of a layer, with a floor.

Paper: "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM Inference"
(Feng et al., 2024, https://arxiv.org/abs/2407.11550). The layer keeps ``heads * int(n * (1 - ratio))``
tokens in all; each head first gets ``alpha`` of its even share (the safeguard), the rest goes to the best
scores of any head. Heads thus keep different numbers of tokens; the cache stores them ragged (no padding),
so the memory freed is exactly ``ratio``. The inner scorer (default SnapKV) must give scores comparable
across heads (attention probabilities are).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register
from .base import Wrapper, mask_padding, valid_lengths

__all__ = ["AdaptiveHeads"]


@register("adaptive_heads", "kv", paper="Ada-KV (Feng et al., 2024) https://arxiv.org/abs/2407.11550",
          summary="global top-k over a layer's kv heads with a per-head floor (ragged cache)")
@dataclass(frozen=True)
class AdaptiveHeads(Wrapper):
    """Adaptive per-head budgets around an inner scorer."""

    examples = ({},)

    alpha: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha (share of each head's budget guaranteed) must be in [0, 1], got {self.alpha!r}")

    def reference_keep(self, q, k, v, key_valid=None, module=None, layer_idx: int = 0, num_layers: int = 1):
        """Loop by loop (Ada-KV): the layer's heads share ``heads x budget`` tokens; each head first gets its
        ``alpha x budget`` best, then the rest goes to the best remaining scores of any head (the inner policy's
        reference scores)."""
        sc = self.policy.reference_scores(q, k, v, key_valid, module)
        b, hk, n = sc.shape
        out = []
        for bi in range(b):
            real = [j for j in range(n) if key_valid is None or bool(key_valid[bi, j])]
            share = self.policy.reference_budget(len(real), hk, layer_idx, num_layers)[0]
            floor = int(self.alpha * share)
            kept = [set(sorted(real, key=lambda j, h=h: -float(sc[bi, h, j]))[:floor]) for h in range(hk)]
            rest = sorted(((float(sc[bi, h, j]), h, j) for h in range(hk) for j in real if j not in kept[h]),
                          reverse=True)
            for _, h, j in rest[: share * hk - floor * hk]:
                kept[h].add(j)
            out.append(kept)
        return out

    def keep(self, q, k, v, key_valid=None, module=None, layer_idx: int = 0, num_layers: int = 1):
        b, hk, n, _ = k.shape
        scores = mask_padding(self.policy.score(q, k, v, key_valid, module).float(), key_valid)
        per_head = self.policy.budgets(valid_lengths(k, key_valid), hk, layer_idx, num_layers)  # [b, hk]
        lengths = torch.empty(b, hk, dtype=torch.long, device=k.device)
        for bi in range(b):
            share = int(per_head[bi, 0])
            total = share * hk
            floor = int(self.alpha * share)
            s = scores[bi].clone()  # [hk, n]
            order = torch.argsort(s, dim=-1, descending=True)
            # reserve each head's floor, then the global top of what is left
            taken = torch.zeros_like(s, dtype=torch.bool)
            if floor:
                taken.scatter_(1, order[:, :floor], True)
            rest = s.masked_fill(taken, float("-inf")).flatten()
            extra = total - floor * hk
            if extra > 0:
                pick = torch.topk(rest, extra).indices
                taken.view(-1)[pick] = True
            lengths[bi] = taken.sum(-1)
        return self.top(scores, lengths)
