"""CCA-Attention as trained: significance-pooled core tokens for the distant past and a local window, one softmax.

Paper: "Core Context Aware Transformers for Long Context Language Modeling" (Chen et al., ICML 2025,
https://arxiv.org/abs/2412.12465). Per head, the sequence is cut into groups of ``group`` tokens. Globality-aware
pooling: group ``c``'s core token is its tokens weighted by their significance, the softmax of the group's last
query against the group's keys, ``w = softmax(q_last . k_j / sqrt(d))``, ``core_k = sum_j w_j k_j``, ``core_v =
sum_j w_j v_j`` (pooling the hidden states and projecting them is the same, the projections being linear).
Locality-preserving attention: the raw keys of the last ``window`` positions. A query ``i`` attends, in one joint
softmax, to the core tokens of the groups that ended before its window (``(c + 1) * group - 1 <= i - window``)
and to the raw keys ``i - window < j <= i``. Gradients flow through the pooling weights.

The training-free prefill pattern of the same paper is ``prefill/core_context.py`` (frozen projections, GQA);
this mixer trains the projections through the same attention. Departures: the pooling query is the group's last
*real* token (padding must not change real outputs; with no padding it is the last token, as the paper); a
group with no real token has no core. Causal only, as the paper (a language model); rotary positions.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..checks import check_int
from ..registry import register
from .base import Mixer
from .softmax import rope_qkv

__all__ = ["CoreContextAttention"]


@register("cca", "mixer", paper="CCA-Attention (Chen et al., ICML 2025) https://arxiv.org/abs/2412.12465",
          summary="significance-pooled core token per group for the past + raw local window, one softmax (causal)")
class CoreContextAttention(Mixer):
    """Core-context aware attention (causal)."""

    supports_causal = (True,)
    examples = ({"group": 3, "window": 4}, {"group": 2, "window": 2})

    def __init__(self, dim: int, heads: int = 4, causal: bool = True, group: int = 16, window: int = 64) -> None:
        super().__init__(dim, heads, causal)
        check_int(group, "group", 1)
        check_int(window, "window", 1)
        self.group, self.window = group, window
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    _qkv = rope_qkv

    def forward(self, x, mask=None):
        self.check_input(x, mask)
        q, k, v = self._qkv(x)
        b, h, n, d = q.shape
        G, W = self.group, self.window
        real = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask.bool()
        ng = n // G
        i = torch.arange(n, device=x.device)
        raw_ok = ((i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < W))[None, None] & real[:, None, None, :]
        s_raw = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~raw_ok, float("-inf"))
        if ng:
            rg = real[:, : ng * G].view(b, ng, G)
            pos = torch.arange(G, device=x.device).expand(b, ng, G)
            last = torch.where(rg, pos, -1).amax(-1).clamp_min(0) + torch.arange(ng, device=x.device) * G  # [b, ng]
            ql = torch.gather(q, 2, last[:, None, :, None].expand(b, h, ng, d))
            kg, vg = k[:, :, : ng * G].reshape(b, h, ng, G, d), v[:, :, : ng * G].reshape(b, h, ng, G, d)
            sw = torch.einsum("bhcd,bhcjd->bhcj", ql, kg) / math.sqrt(d)
            wts = torch.nan_to_num(sw.masked_fill(~rg[:, None], float("-inf")).softmax(-1))
            ck, cv = torch.einsum("bhcj,bhcjd->bhcd", wts, kg), torch.einsum("bhcj,bhcjd->bhcd", wts, vg)
            ends = (torch.arange(ng, device=x.device) + 1) * G - 1
            core_ok = (ends[None, :] <= i[:, None] - W)[None, None] & rg.any(-1)[:, None, None, :]
            s_core = (q @ ck.transpose(-1, -2) / math.sqrt(d)).masked_fill(~core_ok, float("-inf"))
            p = torch.nan_to_num(torch.cat([s_core, s_raw], -1).softmax(-1))
            y = p[..., :ng] @ cv + p[..., ng:] @ v
        else:
            y = torch.nan_to_num(s_raw.softmax(-1)) @ v
        return self.masked(self.out(self.merge(y)), mask)

    def reference(self, x, mask=None):
        q, k, v = self._qkv(x)
        b, h, n, d = q.shape
        G, W = self.group, self.window
        y = torch.zeros_like(q)
        for bi in range(b):
            ok = [mask is None or bool(mask[bi, j]) for j in range(n)]
            for hh in range(h):
                cores = []
                for c in range(n // G):
                    idx = [j for j in range(c * G, (c + 1) * G) if ok[j]]
                    if not idx:
                        cores.append(None)
                        continue
                    ql = q[bi, hh, idx[-1]]
                    w = torch.softmax(torch.stack([ql @ k[bi, hh, j] / math.sqrt(d) for j in idx]), 0)
                    cores.append((sum(wi * k[bi, hh, j] for wi, j in zip(w, idx)),
                                  sum(wi * v[bi, hh, j] for wi, j in zip(w, idx))))
                for i in range(n):
                    keys, vals = [], []
                    for c, cc in enumerate(cores):
                        if cc is not None and (c + 1) * G - 1 <= i - W:
                            keys.append(cc[0])
                            vals.append(cc[1])
                    for j in range(max(i - W + 1, 0), i + 1):
                        if ok[j]:
                            keys.append(k[bi, hh, j])
                            vals.append(v[bi, hh, j])
                    if keys:
                        p = torch.softmax(torch.stack([q[bi, hh, i] @ kk / math.sqrt(d) for kk in keys]), 0)
                        y[bi, hh, i] = sum(pi * vv for pi, vv in zip(p, vals))
        return self.masked(self.out(self.merge(y)), mask)
