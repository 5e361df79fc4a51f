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

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..checks import parse_layers
from ..registry import register
from . import _slow
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

    def _probs(self, step: Step) -> torch.Tensor:
        """``[b, hk, g, n]`` softmax attention of every query head over the real tokens (softcap and sinks as the
        layer's: a sink takes its share of every row)."""
        from ..ops.core import capped

        s = capped(torch.matmul(step.grouped_q(), step.k.float().transpose(-1, -2)) * step.scale, step.softcap)
        if step.key_valid is not None:
            s = s.masked_fill(~step.key_valid[:, None, None, :], float("-inf"))
        if step.sinks is None:
            return s.softmax(-1)
        b, hk, g, n = s.shape
        sink = step.sinks.float().view(1, hk, g, 1).expand(b, hk, g, 1)
        return torch.cat([s, sink], -1).softmax(-1)[..., :n]

    def positions(self, step: Step, p: torch.Tensor | None = None) -> torch.Tensor:
        """At a selection layer: the ``budget`` tokens with the most attention summed over every query head
        (``[b, 1, m]``), recorded for the following layers of this step."""
        p = self._probs(step) if p is None else p
        idx = top_with_forced(p.sum(dim=(1, 2)).unsqueeze(1), min(self.budget, step.n))
        step.shared["tidal"] = (idx, step.n)
        return idx

    def attend(self, step: Step, stats: dict | None = None) -> torch.Tensor:
        import time

        if step.layer_idx not in self.selection_layers(step.num_layers):
            return super().attend(step, stats)
        t0 = time.perf_counter()
        p = self._probs(step)
        out = torch.matmul(p, step.v.float())  # dense attention at the selection layer
        idx = self.positions(step, p)
        if stats is not None:
            stats["select_s"] = stats.get("select_s", 0.0) + time.perf_counter() - t0
            stats["selected"] = stats.get("selected", 0) + idx.shape[0] * step.k.shape[1] * step.n
            stats["possible"] = stats.get("possible", 0) + idx.shape[0] * step.k.shape[1] * step.n
        b, hq, _, d = step.q.shape
        return out.reshape(b, hq, 1, d).to(step.q.dtype)

    def select(self, step: Step):
        if step.layer_idx in self.selection_layers(step.num_layers):
            idx = self.positions(step)
        else:
            got = step.shared.get("tidal")
            if got is None or got[1] != step.n:
                raise RuntimeError(f"tidal_decode: layer {step.layer_idx} runs before any selection layer of this "
                                   "step")
            idx = got[0]
        return idx.expand(step.k.shape[0], step.k.shape[1], -1), None

    def reference_select(self, step: Step, prefill_q=None) -> dict:
        """Loop by loop at a selection layer: each query head's softmax over the real tokens, summed over every
        head of the layer; the ``budget`` best, shared by all kv heads (and reused by the later layers)."""
        b, hq = step.q.shape[:2]
        hk, n = step.k.shape[1], step.n
        g = hq // hk
        out = {}
        for bi in range(b):
            tot = [0.0] * n
            for hh in range(hq):
                s = [float(step.q[bi, hh, 0].double() @ step.k[bi, hh // g, t].double()) * step.scale
                     if _slow.real(step.key_valid, bi, t) else -math.inf for t in range(n)]
                m = max(s)
                z = sum(math.exp(x - m) for x in s)
                for t in range(n):
                    tot[t] += math.exp(s[t] - m) / z
            chosen = set(_slow.top(tot, min(self.budget, n)))
            for h in range(hk):
                out[bi, h] = chosen
        return out
