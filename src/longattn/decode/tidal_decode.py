"""TidalDecode: position-persistent sparse attention — a few layers select tokens, all others reuse them.

Paper: "TidalDecode: Fast and Accurate LLM Decoding with Position Persistent Sparse Attention" (Yang et al.,
ICLR 2025, https://arxiv.org/abs/2410.05076). Within one decode step, the first layers attend densely; at each
*token-selection layer* the step attends densely and picks the ``budget`` tokens with the highest attention
(summed over all query heads: one set of positions for the layer); every following layer attends only to those
positions until the next selection layer re-selects (the paper re-selects once, in a middle layer).
``select_layers=auto``: the first layer after ``dense_layers`` and the layer at 40% of the depth (layers 2 and
13 of the paper's 32-layer Llama).

Departure: none in the algorithm. The positions index the cache as the prompt filled it, identical in every
layer: TidalDecode cannot follow a KV policy that drops tokens per layer (refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..checks import parse_layers
from ..registry import register
from .base import DecodeSelector, Step, top_with_forced

__all__ = ["TidalDecode"]


@register("tidal_decode", "decode", paper="TidalDecode (Yang et al., ICLR 2025) https://arxiv.org/abs/2410.05076",
          summary="dense token selection on a few layers; all other layers reuse those positions")
@dataclass(frozen=True)
class TidalDecode(DecodeSelector):
    """Position-persistent sparse attention: few selection layers, positions reused by the others."""

    examples = ({"budget": 48, "dense_layers": "0", "select_layers": "1"},)
    full_example = {"budget": 4096, "dense_layers": "0", "select_layers": "1"}

    dense_layers: str = "0,1"
    select_layers: str = "auto"

    needs_full_cache: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.select_layers != "auto":
            sel = parse_layers(self.select_layers, "select_layers")
            if not sel:
                raise ValueError("select_layers: give at least one layer index ('2,13') or 'auto'")
            overlap = set(sel) & set(self._dense)
            if overlap:
                raise ValueError(f"select_layers: layer {min(overlap)} is also in dense_layers")

    def selection_layers(self, num_layers: int) -> tuple[int, ...]:
        if self.select_layers != "auto":
            return parse_layers(self.select_layers, "select_layers")
        first = max(self._dense, default=-1) + 1
        return tuple(sorted({min(first, num_layers - 1), max(first, round(0.4 * num_layers))}))

    def prepare(self, model) -> None:
        super().prepare(model)
        n_layers = model.config.num_hidden_layers
        sel = self.selection_layers(n_layers)
        self.check_layers(sel, "select_layers", n_layers)
        sparse = sorted(set(range(n_layers)) - set(self._dense))
        if sparse and sparse[0] < min(sel):
            # that layer would have no positions to reuse
            raise ValueError(f"select_layers: layer {sparse[0]} is neither dense nor after a selection layer; "
                             f"the first selection layer must be <= {sparse[0]}")

    def attend(self, step: Step, stats: dict | None = None) -> torch.Tensor:
        import time

        if step.layer_idx not in self.selection_layers(step.num_layers):
            return super().attend(step, stats)
        t0 = time.perf_counter()
        q = step.grouped_q()  # [b, hk, g, d]
        s = torch.matmul(q, step.k.float().transpose(-1, -2)) * step.scale  # [b, hk, g, n]
        if step.key_valid is not None:
            s = s.masked_fill(~step.key_valid[:, None, None, :], float("-inf"))
        p = s.softmax(-1)
        out = torch.matmul(p, step.v.float())  # dense attention at the selection layer
        score = p.sum(dim=(1, 2)).unsqueeze(1)  # [b, 1, n]: attention summed over every query head
        idx = top_with_forced(score, min(self.budget, step.n))
        step.shared["tidal"] = (idx, step.n)
        if stats is not None:
            stats["select_s"] = stats.get("select_s", 0.0) + time.perf_counter() - t0
            stats["selected"] = stats.get("selected", 0) + idx.shape[0] * step.k.shape[1] * step.n
            stats["possible"] = stats.get("possible", 0) + idx.shape[0] * step.k.shape[1] * step.n
        b, hq, _, d = step.q.shape
        return out.reshape(b, hq, 1, d).to(step.q.dtype)

    def select(self, step: Step):
        got = step.shared.get("tidal")
        if got is None or got[1] != step.n:
            raise RuntimeError(f"tidal_decode: layer {step.layer_idx} runs before any selection layer of this step")
        idx = got[0]
        return idx.expand(step.k.shape[0], step.k.shape[1], -1), None
