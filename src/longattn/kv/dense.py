"""The dense (no-op) policy: keeps the whole cache. The reference row of every benchmark."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register
from .base import KVPolicy

__all__ = ["Dense"]


@register("dense", "kv", paper="-", summary="no compression: full attention, full cache (the reference)")
@dataclass(frozen=True)
class Dense(KVPolicy):
    """No compression (full cache)."""

    examples = ({},)
    no_reference = "keeps every token: nothing to select"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ratio != 0.0:
            raise ValueError(f"ratio must be 0 for dense, got {self.ratio}")

    def score(self, q, k, v, key_valid, module=None) -> torch.Tensor:
        return torch.zeros(k.shape[:3], device=k.device)
