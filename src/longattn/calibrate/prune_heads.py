"""Head pruning by a head profile (the attention half of AMP).

Paper: "AMP: Attention Heads and MLP Pruning" (Mugnaini et al., 2025, https://arxiv.org/abs/2504.21174): rank the
attention heads by importance and remove the least important ones. Here the importance is any head profile
(``longattn profile heads --method amp`` gives AMP's projected-output norm; ``retrieval``, ``attention_influence``,
... work too), one score per kv head, and the unit removed is a kv head with its query heads (a GQA group), so
grouped attention keeps its shape. The ``ratio`` fraction of all groups with the lowest scores is removed (at
least one group stays in every layer).

Removal is real: inside ``apply()`` each attention module's ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj`` are
replaced by ``nn.Linear`` copies holding only the kept heads' rows (columns of ``o_proj``), so the projections, the
attention and the cache of the removed heads are never computed or stored; transformers' attention reshapes by
``-1`` heads, so the modules run unchanged. On exit the original modules are put back (the same objects). Departures:
AMP also prunes MLP neurons and fine-tunes after pruning; neither is done here (training-free, attention only);
the copies cost the kept projections' memory while the originals stay loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..registry import register
from .base import Calibration

__all__ = ["PruneHeads", "kept_groups"]

_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


def kept_groups(scores, ratio: float) -> list[list[int]]:
    """Per layer, the kv heads kept: the ``ratio`` fraction of all (layer, kv head) groups with the lowest scores
    removed, at least one kept per layer (the layer's best, when its groups are all among the lowest)."""
    L, H = len(scores), len(scores[0])
    order = sorted((scores[li][h], li, h) for li in range(L) for h in range(H))
    drop = {(li, h) for _, li, h in order[: int(round(ratio * L * H))]}
    keep = []
    for li in range(L):
        row = [h for h in range(H) if (li, h) not in drop]
        keep.append(row or [max(range(H), key=lambda h: scores[li][h])])
    return keep


def _sliced(lin: nn.Linear, idx: torch.Tensor, dim: int) -> nn.Linear:
    w = lin.weight.index_select(dim, idx)
    out = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None and dim == 0, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if lin.bias is not None:
            if dim == 0:
                out.bias.copy_(lin.bias.index_select(0, idx))
            else:  # o_proj's bias does not depend on the heads
                out.bias = nn.Parameter(lin.bias.detach().clone())
    out.requires_grad_(False)
    return out


@register("prune_heads", "calibrate", paper="AMP: Attention Heads and MLP Pruning (Mugnaini et al., 2025) "
          "https://arxiv.org/abs/2504.21174",
          summary="removes the lowest-scoring kv-head groups of a head profile: their projections, attention and "
                  "cache are never computed (modules sliced inside apply(), restored on exit)")
@dataclass(frozen=True)
class PruneHeads(Calibration):
    """Head pruning. ``ratio``: fraction of all kv-head groups removed; ``profile``: the head profile (a JSON from
    ``longattn profile heads`` or a built-in name) whose lowest scores are removed."""

    ratio: float = 0.25
    profile: str = "smollm2-135m"
    _keep: list | None = field(default=None, init=False, repr=False, compare=False)
    _saved: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    examples: ClassVar[tuple] = ({"ratio": 0.5, "profile": "<profile>"},)

    def __post_init__(self) -> None:
        r = self.ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= float(r) < 1:
            raise ValueError(f"prune_heads: ratio (fraction of the kv-head groups removed) must be in [0, 1), got {r!r}")

    @classmethod
    def write_example_profile(cls, path, **shape) -> str:
        from ..profiles import write_example_profile

        return write_example_profile(path, **shape)

    def prepare(self, model) -> None:
        from ..hf import kv_heads, text_config
        from ..profiles import load_profile

        cfg = text_config(model.config)
        prof = load_profile(self.profile)
        prof.check(cfg.num_hidden_layers, kv_heads(cfg), "prune_heads: profile")
        object.__setattr__(self, "_keep", kept_groups([list(r) for r in prof.scores], self.ratio))

    def _modules(self, model):
        mods = [m for m in model.modules() if all(isinstance(getattr(m, p, None), nn.Linear) for p in _PROJ)
                and getattr(m, "layer_idx", None) is not None]
        if not mods:
            raise ValueError("prune_heads: the model's attention modules have no q_proj/k_proj/v_proj/o_proj to slice")
        return mods

    def install(self, model) -> None:
        from ..hf import kv_heads, text_config

        cfg = text_config(model.config)
        hq, hk = cfg.num_attention_heads, kv_heads(cfg)
        g = hq // hk
        for m in self._modules(model):
            d = m.q_proj.out_features // hq
            keep = self._keep[m.layer_idx]
            kv_rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in keep]).to(m.q_proj.weight.device)
            q_rows = torch.cat([torch.arange(q * d, (q + 1) * d) for h in keep for q in range(h * g, (h + 1) * g)])
            q_rows = q_rows.to(m.q_proj.weight.device)
            self._saved[id(m)] = (m, {p: getattr(m, p) for p in _PROJ})
            m.q_proj = _sliced(m.q_proj, q_rows, 0)
            m.k_proj = _sliced(m.k_proj, kv_rows, 0)
            m.v_proj = _sliced(m.v_proj, kv_rows, 0)
            m.o_proj = _sliced(m.o_proj, q_rows, 1)

    def remove(self, model) -> None:
        for m, orig in self._saved.values():
            for p, mod in orig.items():
                setattr(m, p, mod)
        self._saved.clear()

    def attend(self, layer, layer_idx, q, k, v, key_valid, scale, softcap=None):
        from ..ops.dense import dense_attention

        return dense_attention(q, k, v, key_valid, scale, None, softcap)
