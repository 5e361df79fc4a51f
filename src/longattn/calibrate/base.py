"""Base of the attention calibrations (the recipe's ``calibrate`` slot).

A calibration replaces the attention of the full-attention layers (sliding-window layers keep theirs) for every
query, prompt and generated tokens alike: ``attend(layer, layer_idx, q, k, v, key_valid, scale, softcap)`` returns
the layer's output ``[b, hq, nq, d]``. Its per-sequence state (ACT's sink positions) lives in the cache layer's
``decode_state``, so it is per generation and freed with the cache. It runs on the full cache, so it is not combined
with a prefill pattern, a KV policy or a decode selector (the recipe refuses those combinations by name).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

__all__ = ["Calibration"]  # the family base (exported)


@dataclass(frozen=True)
class Calibration:
    """Base of the calibrations; subclasses implement ``attend``."""

    kind: ClassVar[str] = "calibrate"
    name: ClassVar[str] = "calibration"
    examples: ClassVar[tuple] = ()

    def prepare(self, model) -> None:
        """Check the model once at ``apply()`` (shapes of a profile, features the method cannot honour)."""

    def install(self, model) -> None:
        """Change the model's modules for the block (head pruning slices projections); ``remove`` undoes it."""

    def remove(self, model) -> None:
        """Undo ``install`` exactly (called on leaving ``apply()``, also after an error)."""

    def attend(self, layer, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_valid: torch.Tensor | None, scale: float, softcap: float | None = None) -> torch.Tensor:
        raise NotImplementedError
