"""MoA-style per-head budgets: each kv head keeps a share of the cache given by an offline profile.

Paper: "MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression" (Fu et al., 2024,
https://arxiv.org/abs/2406.14909). The profile (JSON: ``num_layers``, ``num_kv_heads``, ``budgets`` =
relative weights per layer and kv head) distributes the model's total budget
``layers * heads * int(n * (1 - ratio))`` in proportion to the weights (capped at ``n``, the excess
redistributed); the inner scorer (default SnapKV) picks the tokens within each head's budget. Departure: MoA
searches elastic *attention spans* (window sizes) per head; here the per-head budgets drive a KV policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..hf import kv_heads
from ..profiles import load_profile
from ..registry import register
from .base import Wrapper, mask_padding, valid_lengths

__all__ = ["MoABudgets", "distribute"]


def distribute(weights: list[float], total: int, cap: int) -> list[int]:
    """Non-negative integers proportional to ``weights``, each at most ``cap``, summing to
    ``min(total, len * cap)``: capped entries are filled first, the rest by largest remainder."""
    n = len(weights)
    w = [max(float(x), 0.0) for x in weights]
    if sum(w) == 0:
        w = [1.0] * n
    left = min(total, n * cap)
    out = [0] * n
    free = list(range(n))
    while left > 0 and free:
        wf = {i: w[i] for i in free}
        if sum(wf.values()) == 0:  # only zero weights left: split evenly
            wf = dict.fromkeys(free, 1.0)
        ws = sum(wf.values())
        share = {i: left * wf[i] / ws for i in free}
        capped = [i for i in free if share[i] >= cap]
        if capped:
            for i in capped:
                left -= cap - out[i]
                out[i] = cap
            free = [i for i in free if i not in capped]
            continue
        floor = {i: int(share[i]) for i in free}
        for i in free:
            out[i] += floor[i]
        rem = left - sum(floor.values())
        for i in sorted(free, key=lambda j: -(share[j] - floor[j]))[:rem]:
            out[i] += 1
        left = 0
    return out


@register("moa_budgets", "kv", paper="MoA (Fu et al., 2024) https://arxiv.org/abs/2406.14909",
          summary="per-head budgets from a profile JSON, inner scorer picks tokens (ragged cache)")
@dataclass(frozen=True)
class MoABudgets(Wrapper):
    """Per-head budgets from a profile."""

    examples = ({"profile": "<profile>"},)

    profile: str = "smollm2-135m"

    def __post_init__(self) -> None:
        super().__post_init__()
        key = "scores"
        from ..profiles import BUILTIN

        if self.profile not in BUILTIN:
            import json
            from pathlib import Path

            p = Path(self.profile)
            if p.is_file():
                try:
                    key = "budgets" if "budgets" in json.loads(p.read_text()) else "scores"
                except ValueError:
                    key = "budgets"
        object.__setattr__(self, "_profile", load_profile(self.profile, key))

    def prepare(self, model) -> None:
        cfg = model.config
        self._profile.check(cfg.num_hidden_layers, kv_heads(cfg), "moa_budgets")

    def head_budgets(self, n: int) -> list[list[int]]:
        p = self._profile
        avg = max(int(n * (1.0 - self.ratio)), 1)
        flat = [max(w, 0.0) for row in p.scores for w in row]
        got = distribute(flat, avg * len(flat), n)
        return [got[i * p.num_kv_heads : (i + 1) * p.num_kv_heads] for i in range(p.num_layers)]

    def reference_keep(self, q, k, v, key_valid=None, module=None, layer_idx: int = 0, num_layers: int = 1):
        """Each head keeps its profile budget (``head_budgets``: proportional to the profile's scores, capped at
        the sequence, summing to the layer total; tested apart) of the inner policy's best reference scores."""
        sc = self.policy.reference_scores(q, k, v, key_valid, module)
        b, hk, n = sc.shape
        out = []
        for bi in range(b):
            real = [j for j in range(n) if key_valid is None or bool(key_valid[bi, j])]
            budget = self.head_budgets(len(real))[layer_idx]
            out.append([set(sorted(real, key=lambda j, h=h: -float(sc[bi, h, j]))[: budget[h]]) for h in range(hk)])
        return out

    def keep(self, q, k, v, key_valid=None, module=None, layer_idx: int = 0, num_layers: int = 1):
        b, hk, n, _ = k.shape
        valid = valid_lengths(k, key_valid)
        scores = mask_padding(self.policy.score(q, k, v, key_valid, module).float(), key_valid)
        lengths = torch.tensor([self.head_budgets(int(nv))[layer_idx] for nv in valid.tolist()], device=k.device)
        return self.top(scores, lengths)
