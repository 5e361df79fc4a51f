"""PyramidKV: SnapKV scores with a layer-wise budget pyramid (more tokens low, fewer high).

Paper: "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling" (Cai et al., 2024,
https://arxiv.org/abs/2406.02069). Layer l keeps ``max - l * (max - min) / (L - 1)`` tokens with
``min = avg / beta`` and ``max = 2 * avg - min``, ``avg = int(n * (1 - ratio))``, so the layers keep
``avg`` on average and the whole cache is compressed by ``ratio``. Departures: the budget counts the
observation window (the paper adds it on top), as kvpress's ``PyramidKVPress`` does for its total; budgets
are capped at the sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register
from .base import press_changes
from .snapkv import SnapKV

__all__ = ["PyramidKV"]


@register("pyramidkv", "kv", paper="PyramidKV (Cai et al., 2024) https://arxiv.org/abs/2406.02069",
          summary="SnapKV scores, budgets decreasing with depth")
@dataclass(frozen=True)
class PyramidKV(SnapKV):
    """Pyramid of layer budgets."""

    kvpress_press = "PyramidKVPress"
    examples = ({"obs_window": 8},)

    beta: float = 20.0

    def kvpress_kwargs(self) -> dict | None:
        return press_changes({"window_size": self.obs_window, "kernel_size": self.kernel, "beta": self.beta},
                             {"window_size": 64, "kernel_size": 5, "beta": 20})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.beta, (int, float)) or self.beta < 1:
            raise ValueError(f"beta must be >= 1, got {self.beta!r}")

    def layer_budgets(self, n: int, num_layers: int) -> list[int]:
        """Tokens kept by each layer for a sequence of ``n``; they sum to ``num_layers * int(n * (1 - ratio))``
        (layers that would exceed ``n`` are capped and the excess goes to the others, lowest layers first)."""
        avg = int(n * (1.0 - self.ratio))
        if num_layers == 1:
            return [max(min(avg, n), 1)]
        lo = avg / self.beta
        hi = 2 * avg - lo
        step = (hi - lo) / (num_layers - 1)
        raw = [hi - i * step for i in range(num_layers)]
        out = [min(n, max(1, int(x))) for x in raw]
        deficit = num_layers * max(avg, 1) - sum(out)
        while deficit > 0:
            open_ = [i for i in range(num_layers) if out[i] < n]
            if not open_:
                break
            for i in open_:
                if deficit == 0:
                    break
                out[i] += 1
                deficit -= 1
        while deficit < 0:  # rounding up by the floor of 1: take back from the top layers
            for i in reversed(range(num_layers)):
                if deficit == 0:
                    break
                if out[i] > 1:
                    out[i] -= 1
                    deficit += 1
        return out

    def budgets(self, valid_len, kv_heads, layer_idx=0, num_layers=1):
        keep = torch.tensor([self.layer_budgets(int(n), num_layers)[layer_idx] for n in valid_len.tolist()],
                            device=valid_len.device)
        return keep.view(-1, 1).expand(-1, kv_heads).contiguous()
    def reference_budget(self, n_valid: int, kv_heads: int, layer_idx: int, num_layers: int) -> list[int]:
        """PyramidKV's layer budgets (``layer_budgets``: an arithmetic progression from the bottom layer down to
        ``avg / beta``, capped at the sequence; their own properties are tested apart)."""
        return [self.layer_budgets(n_valid, num_layers)[layer_idx]] * kv_heads

