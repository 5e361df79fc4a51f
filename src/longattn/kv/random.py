"""Random eviction: the baseline every policy must beat. Seeded per layer, so runs are reproducible."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register
from .base import KVPolicy

__all__ = ["RandomPolicy"]


@register("random", "kv", paper="baseline (kvpress RandomPress)", summary="keep a random subset (seeded)")
@dataclass(frozen=True)
class RandomPolicy(KVPolicy):
    """Uniformly random scores."""

    kvpress_press = "RandomPress"
    examples = ({},)
    no_reference = "a seeded random subset: its scores are the generator's, there is no formula to check"

    seed: int = 0

    def score(self, q, k, v, key_valid, module=None) -> torch.Tensor:
        layer = getattr(module, "layer_idx", 0) or 0
        g = torch.Generator(device="cpu").manual_seed(self.seed * 100003 + layer)
        return torch.rand(k.shape[:3], generator=g).to(k.device)
