"""Composition of two scorers: the first prunes, the second scores the survivors (kvpress's ``ComposedPress``).

``first`` keeps ``int(n * (1 - r1))`` tokens with ``(1 - r1) = sqrt(1 - ratio)``; ``second`` scores those
survivors (in their order, so position-based scorers see them compacted) and keeps exactly
``int(n * (1 - ratio))`` of them, so the composition removes ``ratio`` of the cache. Only scorers compose
(policies that choose their own per-head budgets are refused). Departure from kvpress: kvpress applies each
press with its own ratio one after the other; here the total ratio is split evenly in the square-root sense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register
from .base import KVPolicy, inner_policy, valid_lengths

__all__ = ["Compose"]


@register("compose", "kv", paper="kvpress ComposedPress", summary="apply two policies one after the other")
@dataclass(frozen=True)
class Compose(KVPolicy):
    """``first`` keeps ``int(n * (1 - r1))`` tokens with ``(1 - r1) = sqrt(1 - ratio)``; ``second`` scores
    those survivors (in their order: position-based scorers see them compacted) and keeps exactly
    ``int(n * (1 - ratio))`` of them, so the composition removes ``ratio`` of the cache."""

    first: str = "knorm"
    second: str = "snapkv"
    examples = ({},)

    def __post_init__(self) -> None:
        super().__post_init__()
        part = 1.0 - (1.0 - self.ratio) ** 0.5
        object.__setattr__(self, "_a", inner_policy(self.first, part))
        object.__setattr__(self, "_b", inner_policy(self.second, part))
        for name, p in (("first", self._a), ("second", self._b)):
            if type(p).keep is not KVPolicy.keep:
                raise ValueError(f"compose: {name}={p.name!r} chooses its own budgets; compose scorers only "
                                 "(snapkv, knorm, tova, h2o, streaming_llm, random, novelty)")

    def prepare(self, model) -> None:
        self._a.prepare(model)
        self._b.prepare(model)

    def score(self, q, k, v, key_valid, module=None):  # pragma: no cover - keep() is overridden
        raise NotImplementedError

    def reference_keep(self, q, k, v, key_valid=None, module=None, layer_idx: int = 0, num_layers: int = 1):
        """Loop by loop: ``first`` keeps its reference top ``int(n (1 - r1))``; ``second`` scores the survivors
        (compacted, in order) and the composed budget ``int(n (1 - ratio))`` of them is kept."""
        first = self._a.reference_keep(q, k, v, key_valid, module, layer_idx, num_layers)
        b, hk, n, d = k.shape
        out = []
        for bi in range(b):
            real = [j for j in range(n) if key_valid is None or bool(key_valid[bi, j])]
            want = max(1, int(len(real) * (1 - self.ratio)))
            row = []
            for h in range(hk):
                surv = sorted(first[bi][h])
                ks, vs = k[bi : bi + 1, :, surv], v[bi : bi + 1, :, surv]
                sc = self._b.reference_scores(q[bi : bi + 1], ks, vs, None, module)[0, h]
                order = sorted(range(len(surv)), key=lambda t: -float(sc[t]))
                row.append({surv[t] for t in order[: min(want, len(surv))]})
            out.append(row)
        return out

    def keep(self, q, k, v, key_valid=None, module=None, layer_idx: int = 0, num_layers: int = 1):
        b, hk, n, d = k.shape
        idx_a, len_a = self._a.keep(q, k, v, key_valid, module, layer_idx, num_layers)
        valid = valid_lengths(k, key_valid)
        want = torch.clamp((valid.double() * (1 - self.ratio)).floor().long(), min=1)
        rows_idx, rows_len = [], []
        for bi in range(b):  # rows may keep different numbers (left padding); heads of a row keep the same
            m = int(len_a[bi, 0])
            ia = idx_a[bi : bi + 1, :, :m]
            g = ia.unsqueeze(-1).expand(-1, -1, -1, d)
            k2, v2 = torch.gather(k[bi : bi + 1], 2, g), torch.gather(v[bi : bi + 1], 2, g)
            # the second scores the survivors; keep exactly the composed budget int(n_valid * (1 - ratio))
            scores_b = self._b.score(q[bi : bi + 1], k2, v2, None, module).float()
            idx_b, len_b = self.top(scores_b, torch.full((1, hk), min(int(want[bi]), m), device=k.device))
            rows_idx.append(torch.gather(ia, -1, idx_b)[0])
            rows_len.append(len_b[0])
        width = max(r.shape[-1] for r in rows_idx)
        idx = torch.stack([torch.nn.functional.pad(r, (0, width - r.shape[-1])) for r in rows_idx])
        return idx, torch.stack(rows_len)
