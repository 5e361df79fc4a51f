"""Shifted group attention (LongLoRA S2-Attn) and its sink-token form (SinkLoRA SF-Attn).

Papers: LongLoRA (Chen et al., ICLR 2024, https://arxiv.org/abs/2309.12307) S2-Attn; SinkLoRA (Zhang, 2024,
https://arxiv.org/abs/2406.05678) SF-Attn.

Tokens are split into groups of ``group`` tokens counted from each row's first real token; attention stays
inside a group (causal). The second half of the heads uses groups shifted by ``group // 2`` so information
flows between neighbouring groups. ``sink > 0`` adds global attention to the first ``sink`` real tokens
(SinkLoRA's SF-Attn).

Departures: LongLoRA rolls the shifted heads' tokens, so the first half group wraps around to the last group
(SinkLoRA points out the resulting leak); here the shifted groups do not wrap (the first ``group // 2`` tokens
form a shorter group), which is SinkLoRA's fix without its extra re-arrangement. Training-free (both papers
fine-tune with the pattern).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..checks import check_int
from ..layout import BlockLayout
from ..padding import first_real
from ..registry import register
from . import _slow
from .base import Geometry, PrefillPattern, group_layout

__all__ = ["ShiftedGroups"]


@register(
    "shifted_groups",
    "prefill",
    paper="LongLoRA S2-Attn (Chen et al., ICLR 2024) https://arxiv.org/abs/2309.12307; SinkLoRA SF-Attn "
    "https://arxiv.org/abs/2406.05678",
    summary="group-local attention, half the heads shifted by half a group; optional sink tokens",
)
@dataclass(frozen=True)
class ShiftedGroups(PrefillPattern):
    """Group-local attention with half the heads shifted by half a group (+ optional sinks)."""

    group: int = 2048
    sink: int = 0
    #: which heads are shifted depends on the head's index among all heads (for per-head mixtures)
    head_dependent: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.group, "group", 2)
        check_int(self.sink, "sink", 0)

    def groups(self, batch: int, heads: int, n: int, key_valid, device) -> torch.Tensor:
        """int ``[b, heads, n]``: group id of each absolute position, per head."""
        first = first_real(key_valid, batch, device)
        rel = (torch.arange(n, device=device)[None, :] - first[:, None]).clamp_min(0)  # [b, n]
        plain = rel // self.group
        shifted = (rel + self.group - self.group // 2) // self.group
        is_shift = (torch.arange(heads, device=device) >= heads // 2) & (heads > 1)  # LongLoRA: heads[h//2:]
        return torch.where(is_shift.view(1, -1, 1), shifted[:, None, :], plain[:, None, :])

    def layout(self, q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None = None) -> BlockLayout:
        b, hq, nq, _ = q.shape
        nk = k.shape[2]
        geo = Geometry(nq, nk, self.block_size, q.device)
        gr = self.groups(b, hq, nk, key_valid, q.device)
        n_groups = nk // self.group + 2
        return group_layout(gr, n_groups, geo, self.sink, key_valid, b)

    examples = ({"group": 40, "block_size": 16}, {"group": 30, "sink": 5, "block_size": 16})
    full_example = {"group": 400, "block_size": 16}

    def reference_mask(self, q, k, key_valid=None):
        """Loop by loop: positions counted from the row's first real token fall in groups of ``group``; the
        second half of the heads (MHA with more than one head) is shifted by half a group; a query sees the keys
        of its own group (causal) and, with ``sink``, the first ``sink`` real tokens."""
        b, hq, nq, nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        off, G = nk - nq, self.group
        m = torch.zeros(b, hq, nq, nk, dtype=torch.bool)
        for bi in range(b):
            f = _slow.first(key_valid, bi)
            for h in range(hq):
                shift = G // 2 if (hq > 1 and h >= hq // 2) else 0
                for i in range(nq):
                    for j in range(i + off + 1):
                        ri, rj = max(i + off - f, 0), max(j - f, 0)
                        gi, gj = (ri + (G - shift) % G) // G, (rj + (G - shift) % G) // G
                        m[bi, h, i, j] = gi == gj or (self.sink > 0 and f <= j < f + self.sink)
        return m
