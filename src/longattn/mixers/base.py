"""The mixer interface and what every mixer shares.

A mixer is a ``torch.nn.Module`` built as ``cls(dim, heads=..., causal=..., **settings)`` and called as
``mixer(x, mask=None)``: ``x [b, n, dim]``, ``mask [b, n]`` bool (True = a real token; padding may sit anywhere),
output ``[b, n, dim]`` with zeros at padded positions; a padded token never influences a real one. Causal mixers
let position ``i`` see ``j <= i`` only. ``reference(x, mask)`` is the paper's equations written loop by loop (the
tests hold ``forward`` to it, outputs and gradients); mixers with a recurrent form implement ``init_state(b)`` and
``step(x_t [b, dim], state) -> (y_t, state)``, equal to the parallel form token by token.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from ..checks import check_int

__all__ = ["Mixer"]


class Mixer(nn.Module):
    """Base of the token mixers (see the module docstring)."""

    #: settings of small instances for the generic tests (``dim=16``, ``heads=4`` are given by the tests)
    examples: ClassVar[tuple[dict, ...]] = ({},)
    #: the forms the paper has: True (causal), False (bidirectional)
    supports_causal: ClassVar[tuple[bool, ...]] = (True, False)
    #: the mixer has a recurrent form (``init_state`` / ``step``)
    recurrent: ClassVar[bool] = False

    def __init__(self, dim: int, heads: int = 4, causal: bool = True) -> None:
        super().__init__()
        check_int(dim, "dim", 1)
        check_int(heads, "heads", 1)
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        if causal not in self.supports_causal:
            raise ValueError(f"{type(self).__name__}: causal={causal} is not a form of this mixer (the paper has "
                             f"{', '.join('causal' if c else 'bidirectional' for c in self.supports_causal)})")
        self.dim, self.heads, self.causal = dim, heads, causal
        self.head_dim = dim // heads

    # helpers ----------------------------------------------------------------------------------------------------
    def split(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, n, dim] -> [b, heads, n, head_dim]``."""
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        b, h, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, h * d)

    @staticmethod
    def masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return x if mask is None else x * mask[..., None].to(x.dtype)

    def check_input(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [batch, seq, dim={self.dim}], got {tuple(x.shape)}")
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"mask must be [batch, seq] = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")

    def loop_softmax(self, q, k, v, mask=None, kv_head=None) -> torch.Tensor:
        """Softmax attention written loop by loop (``q, k, v [b, h, n, d]``, scale ``1/sqrt(d)``): each query
        attends to the real keys it may see (``j <= i`` when causal); query head ``hh`` reads kv head
        ``kv_head[hh]`` (default: its own). A query that sees no key gives zeros. For the mixers' references."""
        b, h, n, d = q.shape
        own = list(range(h)) if kv_head is None else kv_head
        y = torch.zeros_like(q)
        for bi in range(b):
            for hh in range(h):
                for i in range(n):
                    keys = [j for j in range(n) if (not self.causal or j <= i) and (mask is None or bool(mask[bi, j]))]
                    if not keys:
                        continue
                    s = torch.stack([q[bi, hh, i] @ k[bi, own[hh], j] / math.sqrt(d) for j in keys])
                    p = torch.softmax(s, 0)
                    y[bi, hh, i] = sum(p[t] * v[bi, own[hh], j] for t, j in enumerate(keys))
        return y

    def reference(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def init_state(self, batch: int):  # pragma: no cover - recurrent mixers only
        raise NotImplementedError

    def step(self, x_t: torch.Tensor, state):  # pragma: no cover - recurrent mixers only
        raise NotImplementedError
