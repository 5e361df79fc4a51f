"""PoNet: token mixing by multi-granularity pooling, linear in the sequence length.

Paper: "PoNet: Pooling Network for Efficient Token Mixing in Long Sequences" (Tan et al., ICLR 2022,
https://arxiv.org/abs/2110.02442). Six projections of the input, per head:
* global aggregation: ``g = mean_i q_i`` (the real tokens), then ``g' = softmax(g k^T / sqrt(d)) v``;
* segment max-pooling: ``s_c = max_{i in segment c} x^s_i`` over segments of ``segment`` tokens;
* local max-pooling: ``l_i = max_{|j - i| <= window // 2} x^l_j``;
* pooling fusion: ``o_i = (g' + s_{seg(i)}) * x^o_i + l_i`` (element-wise), then the output projection.
Bidirectional only (the paper's encoder); padded tokens take part in no mean, softmax or max.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..checks import check_int
from ..registry import register
from .base import Mixer

__all__ = ["PoNet"]

NEG = -1e30


@register("ponet", "mixer", paper="PoNet (Tan et al., ICLR 2022) https://arxiv.org/abs/2110.02442",
          summary="global aggregation + segment and local max-pooling, fused multiplicatively (bidirectional)")
class PoNet(Mixer):
    """Multi-granularity pooling and pooling fusion."""

    supports_causal = (False,)
    examples = ({"segment": 4, "window": 3}, {"segment": 16, "window": 5})

    def __init__(self, dim: int, heads: int = 4, causal: bool = False, segment: int = 32, window: int = 3) -> None:
        super().__init__(dim, heads, causal)
        check_int(segment, "segment", 1)
        check_int(window, "window", 1)
        self.segment, self.window = segment, window
        self.proj = nn.Linear(dim, 6 * dim)
        self.out = nn.Linear(dim, dim)

    def _parts(self, x):
        return [self.split(t) for t in self.proj(x).chunk(6, -1)]  # q, k, v, s, l, o: [b, h, n, d]

    def forward(self, x, mask=None):
        self.check_input(x, mask)
        q, k, v, xs, xl, xo = self._parts(x)
        b, h, n, d = q.shape
        real = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask.bool()
        w = real[:, None, :, None].to(q.dtype)
        g = (q * w).sum(2) / w.sum(2).clamp_min(1)  # [b, h, d]
        att = torch.einsum("bhd,bhnd->bhn", g, k) / math.sqrt(d)
        att = att.masked_fill(~real[:, None], float("-inf")).softmax(-1)
        g2 = torch.einsum("bhn,bhnd->bhd", att, v)
        segs = -(-n // self.segment)
        pad = segs * self.segment - n
        xs_m = xs.masked_fill(~real[:, None, :, None], NEG)
        sp = torch.nn.functional.pad(xs_m, (0, 0, 0, pad), value=NEG).view(b, h, segs, self.segment, d).amax(3)
        s_tok = sp.repeat_interleave(self.segment, 2)[:, :, :n]
        r = self.window // 2
        xl_m = xl.masked_fill(~real[:, None, :, None], NEG)
        lp = torch.nn.functional.pad(xl_m.transpose(2, 3), (r, self.window - 1 - r), value=NEG)
        loc = lp.unfold(-1, self.window, 1).amax(-1).transpose(2, 3)  # [b, h, n, d]
        o = (g2[:, :, None] + s_tok) * xo + loc
        return self.masked(self.out(self.merge(o)), mask)

    def reference(self, x, mask=None):
        q, k, v, xs, xl, xo = self._parts(x)
        b, h, n, d = q.shape
        out = torch.zeros_like(q)
        for bi in range(b):
            real = [i for i in range(n) if mask is None or bool(mask[bi, i])]
            for hh in range(h):
                g = sum(q[bi, hh, i] for i in real) / len(real)
                sc = torch.stack([g @ k[bi, hh, j] / math.sqrt(d) for j in real])
                p = torch.softmax(sc, 0)
                g2 = sum(p[t] * v[bi, hh, j] for t, j in enumerate(real))
                for i in real:
                    c = i // self.segment
                    seg = [j for j in real if j // self.segment == c]
                    s = torch.stack([xs[bi, hh, j] for j in seg]).amax(0)
                    r = self.window // 2
                    near = [j for j in real if i - r <= j <= i + (self.window - 1 - r)]
                    loc = torch.stack([xl[bi, hh, j] for j in near]).amax(0)
                    out[bi, hh, i] = (g2 + s) * xo[bi, hh, i] + loc
        return self.masked(self.out(self.merge(out)), mask)
