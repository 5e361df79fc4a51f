"""KV-cache policies applied once at the end of prefill: score every cached token, keep a budget per head.

A policy is a frozen dataclass with ``score()``; ``keep()`` turns scores into kept indices. The cache then
holds only the kept tokens (``cache.RaggedKV``): the memory is really freed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["KVPolicy", "ScorerPolicy", "check_ratio"]


def check_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0.0 <= float(ratio) < 1.0):
        raise ValueError(f"ratio (fraction of the cache removed) must be in [0, 1), got {ratio!r}")
    return float(ratio)


@dataclass(frozen=True)
class KVPolicy:
    """Base of every KV policy. ``ratio`` is the fraction of the prefill's tokens removed (0 keeps all)."""

    ratio: float = 0.0

    def __post_init__(self) -> None:
        check_ratio(self.ratio)

    @property
    def is_noop(self) -> bool:
        return self.ratio == 0.0

    def budgets(self, valid_len: torch.Tensor, kv_heads: int, layer_idx: int = 0, num_layers: int = 1):
        """Tokens kept per (batch row, kv head): ``int(valid_len * (1 - ratio))``, at least 1 (as kvpress)."""
        keep = torch.clamp((valid_len.double() * (1.0 - self.ratio)).floor().long(), min=1)
        keep = torch.minimum(keep, valid_len.long())
        return keep.view(-1, 1).expand(-1, kv_heads).contiguous()

    def score(self, q, k, v, key_valid, module=None) -> torch.Tensor:  # pragma: no cover - abstract
        """``[b, kv_heads, kv_len]`` float; higher = keep."""
        raise NotImplementedError

    def keep(self, q, k, v, key_valid=None, module=None, layer_idx: int = 0, num_layers: int = 1):
        """Kept token indices per (b, kv head): ``(idx [b, hkv, max_keep] long ascending, lengths [b, hkv])``.
        Entries past ``lengths`` are padding. Padded keys (``key_valid`` False) are never kept."""
        b, hk, n, _ = k.shape
        scores = self.score(q, k, v, key_valid, module).float()
        if scores.shape != (b, hk, n):
            raise RuntimeError(f"{type(self).__name__}.score returned {tuple(scores.shape)}, expected {(b, hk, n)}")
        valid_len = torch.full((b,), n, device=k.device) if key_valid is None else key_valid.sum(-1)
        if key_valid is not None:
            scores = scores.masked_fill(~key_valid.to(torch.bool)[:, None, :], float("-inf"))
        lengths = self.budgets(valid_len, hk, layer_idx, num_layers).to(k.device)
        max_keep = int(lengths.max())
        top = torch.topk(scores, max_keep, dim=-1, sorted=True).indices  # best first
        slot = torch.arange(max_keep, device=k.device)
        in_budget = slot < lengths.unsqueeze(-1)
        # sort the kept ones ascending by position; padding slots go to the end
        key = torch.where(in_budget, top, torch.full_like(top, n))
        idx = torch.sort(key, dim=-1).values
        idx = torch.where(idx < n, idx, torch.zeros_like(idx))
        return idx, lengths


@dataclass(frozen=True)
class ScorerPolicy(KVPolicy):
    """A policy defined by its ``score()`` alone."""
