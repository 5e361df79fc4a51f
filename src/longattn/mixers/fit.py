"""FIT: local groups of tokens interleaved with a few global latent tokens per group.

Paper: "FIT: Far-reaching Interleaved Transformers" (Chen & Li, 2023, https://arxiv.org/abs/2305.12689). The
data tokens are cut into groups of ``group`` tokens and each group gets ``latents`` latent tokens. A FIT block:

1. local attention: every data token attends to the data tokens of its group (softmax, its own projections);
2. read: the group's latents, from a learnable initialisation ``z0`` (one set, shared by every group, plus a
   learnable embedding of the latent's index), attend to the group's data tokens, ``z = z0 + Read(z0, x_group)``;
3. global attention among the latents of every group, ``z' = z + Global(z)``;
4. write: every data token attends to its group's latents, and the output is ``Local(x) + Write(x, z'_group)``.

Cost per layer: ``n * group`` (local) ``+ n * latents`` (read, write) ``+ (n / group * latents)^2`` (global).

Departures (the interface keeps ``[b, n, dim]``): in the paper the latents are a second stream carried from one
FIT block to the next; a mixer cannot carry them, so every layer reads its latents afresh from ``z0``. Bidirectional
only, as the paper (images and video; the global step lets every group see every other). Padded tokens are read
by no latent and attend to nothing; a group with no real token has no latents in the global step. No positions
inside the attentions (the group structure and the latent index embeddings are the only positional signal).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_int
from ..registry import register
from .base import Mixer

__all__ = ["FIT"]


class _Attn(nn.Module):
    """Multi-head softmax attention with its own projections, ``q [b, m, dim]`` over ``kv [b, n, dim]``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)

    def forward(self, xq, xkv, allowed):
        """``allowed [b, m, n]`` bool; a query with no allowed key gets zeros (before ``o``)."""
        b, m, _ = xq.shape
        n = xkv.shape[1]
        q = self.q(xq).view(b, m, self.heads, self.hd).transpose(1, 2)
        k, v = (t.view(b, n, self.heads, self.hd).transpose(1, 2) for t in self.kv(xkv).chunk(2, -1))
        y = torch.nan_to_num(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None]))
        return self.o(y.transpose(1, 2).reshape(b, m, -1))

    def loop(self, xq, xkv, keys):
        """One query row ``xq [dim]`` over the rows ``keys`` of ``xkv [n, dim]``, loop by loop (before ``o``)."""
        q = (xq @ self.q.weight.T).view(self.heads, self.hd)
        kv = xkv @ self.kv.weight.T
        k, v = kv[:, : self.heads * self.hd], kv[:, self.heads * self.hd :]
        out = []
        for hh in range(self.heads):
            sl = slice(hh * self.hd, (hh + 1) * self.hd)
            if not keys:
                out.append(torch.zeros(self.hd, dtype=xq.dtype))
                continue
            s = torch.stack([q[hh] @ k[j, sl] / math.sqrt(self.hd) for j in keys])
            p = torch.softmax(s, 0)
            out.append(sum(p[t] * v[j, sl] for t, j in enumerate(keys)))
        return torch.cat(out) @ self.o.weight.T


@register("fit", "mixer", paper="FIT (Chen & Li, 2023) https://arxiv.org/abs/2305.12689",
          summary="local attention inside groups + latent tokens per group that read, attend globally and write "
                  "(bidirectional)")
class FIT(Mixer):
    """Far-reaching interleaved attention (bidirectional)."""

    supports_causal = (False,)
    examples = ({"group": 4, "latents": 2}, {"group": 3, "latents": 1})

    def __init__(self, dim: int, heads: int = 4, causal: bool = False, group: int = 64, latents: int = 4) -> None:
        super().__init__(dim, heads, causal)
        check_int(group, "group", 1)
        check_int(latents, "latents", 1)
        self.group, self.latents = group, latents
        self.local, self.read, self.glob, self.write = (_Attn(dim, heads) for _ in range(4))
        self.z0 = nn.Parameter(torch.randn(dim) / math.sqrt(dim))
        self.z_index = nn.Parameter(torch.randn(latents, dim) / math.sqrt(dim))

    def forward(self, x, mask=None):
        self.check_input(x, mask)
        b, n, dim = x.shape
        G, L = self.group, self.latents
        ng = -(-n // G)
        real = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask.bool()
        grp = torch.arange(n, device=x.device) // G
        same = (grp[:, None] == grp[None, :])[None] & real[:, None, :] & real[:, :, None]
        local = self.local(x, x, same)
        z0 = (self.z0 + self.z_index).repeat(ng, 1)[None].expand(b, ng * L, dim)  # latent r of group c: c * L + r
        lat_grp = torch.arange(ng * L, device=x.device) // L
        reads = (lat_grp[:, None] == grp[None, :])[None] & real[:, None, :]  # [b, ng L, n]
        z = z0 + self.read(z0, x, reads)
        alive = reads.any(-1)  # [b, ng L]: the group has a real token
        z = z + self.glob(z, z, alive[:, :, None] & alive[:, None, :])
        writes = (grp[:, None] == lat_grp[None, :])[None] & real[:, :, None] & alive[:, None, :]
        return self.masked(local + self.write(x, z, writes), mask)

    def reference(self, x, mask=None):
        b, n, dim = x.shape
        G, L = self.group, self.latents
        ng = -(-n // G)
        y = torch.zeros_like(x)
        for bi in range(b):
            ok = [mask is None or bool(mask[bi, j]) for j in range(n)]
            members = [[j for j in range(c * G, min((c + 1) * G, n)) if ok[j]] for c in range(ng)]
            z = {}
            for c in range(ng):
                if not members[c]:
                    continue
                for r in range(L):
                    z0 = self.z0 + self.z_index[r]
                    z[(c, r)] = z0 + self.read.loop(z0, x[bi], members[c])
            order = sorted(z)
            zs = torch.stack([z[key] for key in order]) if order else x.new_zeros(0, dim)
            z2 = {key: z[key] + self.glob.loop(z[key], zs, list(range(len(order)))) for key in order}
            for i in range(n):
                if not ok[i]:
                    continue
                c = i // G
                loc = self.local.loop(x[bi, i], x[bi], members[c])
                mine = [key for key in order if key[0] == c]
                zc = torch.stack([z2[key] for key in mine])
                y[bi, i] = loc + self.write.loop(x[bi, i], zc, list(range(len(mine))))
        return y
