"""KDGQA / DGQA: grouped-query attention whose query heads are shared out by the key heads' norms.

Paper: "Beyond Uniform Query Distribution: Key-Driven Grouped Query Attention" (Khan et al., 2024,
https://arxiv.org/abs/2408.08454). With ``H`` query heads and ``G`` key/value heads, uniform GQA gives every kv
head ``H / G`` queries. KDGQA gives kv head ``g`` a share proportional to the norm of its keys in the current
batch (``kdgqa``, bidirectional: a causal layer must not see the later keys' norms); DGQA (``dgqa``) tracks the
norms through training with an exponential moving average (``momentum``), and a forward uses the average of the
batches before it, so that it is causal too; the counts ``H x norm_g / sum`` are rounded by largest remainders, every kv head
keeps at least one query head, and they sum to ``H``. Query heads are assigned in order: the first ``c_0`` to kv head 0, and so on.

Departures: the allocation is discrete (no gradient flows through it, as in the paper); PGQA's perturbed
grouping is not implemented.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_choice, check_int
from ..registry import register
from .base import Mixer
from .softmax import rope

__all__ = ["KDGQA", "DGQA", "allocate", "gqa_proj"]


def gqa_proj(mixer: Mixer, x: torch.Tensor):
    """``q [b, heads, n, d]``, ``k, v [b, kv_heads, n, d]`` from ``mixer.q`` and ``mixer.kv`` (keys then values),
    rotary positions on q and k: the projections of the grouped-query mixers."""
    b, n, _ = x.shape
    q = rope(mixer.split(mixer.q(x)))
    k, v = mixer.kv(x).view(b, n, 2, mixer.kv_heads, mixer.head_dim).permute(2, 0, 3, 1, 4)
    return q, rope(k), v


def allocate(norms: torch.Tensor, heads: int) -> list[int]:
    """Query heads per kv head ``[G]``: ``heads x norm_g / sum(norms)`` rounded by largest remainders, at least 1
    each (taken from the largest counts), summing to ``heads``."""
    r = norms.double().clamp_min(0)
    share = (r / r.sum() * heads) if float(r.sum()) > 0 else torch.full_like(r, heads / r.numel())
    counts = share.floor().long().clamp_min(1)
    rem = share - share.floor()
    while int(counts.sum()) < heads:  # the largest remainders get one more
        i = int(torch.argmax(torch.where(counts < heads, rem, torch.full_like(rem, -1.0))))
        counts[i] += 1
        rem[i] = -1.0
    while int(counts.sum()) > heads:  # the minimum of one came from the largest groups
        i = int(torch.argmax(torch.where(counts > 1, share - counts.double(), torch.full_like(share, -1e9))))
        counts[i] -= 1
    return counts.tolist()


@register("kdgqa", "mixer", paper="Key-Driven GQA (Khan et al., 2024) https://arxiv.org/abs/2408.08454",
          summary="grouped-query attention with query heads shared out by key-head norms (KDGQA / DGQA)")
class KDGQA(Mixer):
    """Grouped-query attention grouped by this batch's key norms (bidirectional: the norms see every token)."""

    supports_causal = (False,)
    examples = ({"kv_heads": 2},)
    mode_default = "kdgqa"

    def __init__(self, dim: int, heads: int = 4, causal: bool = False, kv_heads: int = 2, mode: str | None = None,
                 momentum: float = 0.9) -> None:
        super().__init__(dim, heads, causal)
        check_int(kv_heads, "kv_heads", 1)
        mode = mode or self.mode_default
        check_choice(mode, "mode", ("kdgqa", "dgqa"))
        if causal and mode == "kdgqa":
            raise ValueError("causal: KDGQA groups by the norms of the whole sequence's keys, which a causal layer "
                             "must not see; use dgqa (running norms of earlier batches)")
        if kv_heads > heads:
            raise ValueError(f"kv_heads ({kv_heads}) must not exceed heads ({heads})")
        self.kv_heads, self.mode, self.momentum = kv_heads, mode, momentum
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.register_buffer("ema", torch.ones(kv_heads))

    def _proj(self, x):
        return gqa_proj(self, x)

    def groups(self, k: torch.Tensor, mask) -> list[int]:
        """This forward's query heads per kv head (from the keys' norms, or their running average)."""
        w = torch.ones(k.shape[0], k.shape[2], device=k.device) if mask is None else mask.to(k.dtype)
        norms = (k.detach().norm(dim=-1) * w[:, None]).sum((0, 2)) / w.sum().clamp_min(1)
        if self.mode == "dgqa":  # the running norms of the batches before this one (this one's come after)
            counts = allocate(self.ema, self.heads)
            if self.training:
                self.ema.mul_(self.momentum).add_((1 - self.momentum) * norms.to(self.ema.dtype))
            return counts
        return allocate(norms, self.heads)

    def _expand(self, k, v, counts):
        idx = torch.repeat_interleave(torch.arange(self.kv_heads, device=k.device),
                                      torch.tensor(counts, device=k.device))
        return k[:, idx], v[:, idx]

    def forward(self, x, mask=None):
        self.check_input(x, mask)
        q, k, v = self._proj(x)
        kk, vv = self._expand(k, v, self.groups(k, mask))
        n = x.shape[1]
        allowed = torch.ones(n, n, dtype=torch.bool, device=x.device)
        allowed = (allowed.tril() if self.causal else allowed)[None, None]
        if mask is not None:
            allowed = allowed & mask[:, None, None, :]
        y = torch.nan_to_num(F.scaled_dot_product_attention(q, kk, vv, attn_mask=allowed))
        return self.masked(self.out(self.merge(y)), mask)

    def reference(self, x, mask=None):
        q, k, v = self._proj(x)
        counts = self.groups(k, mask)
        owner = [g for g, c in enumerate(counts) for _ in range(c)]
        return self.masked(self.out(self.merge(self.loop_softmax(q, k, v, mask, kv_head=owner))), mask)


@register("dgqa", "mixer", paper="Key-Driven GQA (Khan et al., 2024) https://arxiv.org/abs/2408.08454",
          summary="grouped-query attention with query heads shared out by running key-head norms (causal too)")
class DGQA(KDGQA):
    """Grouped-query attention grouped by the running (EMA) key norms of earlier training batches."""

    supports_causal = (True, False)
    examples = ({"kv_heads": 2}, {"kv_heads": 2, "momentum": 0.5})
    mode_default = "dgqa"

    def __init__(self, dim: int, heads: int = 4, causal: bool = True, kv_heads: int = 2, momentum: float = 0.9) -> None:
        super().__init__(dim, heads, causal, kv_heads, "dgqa", momentum)
