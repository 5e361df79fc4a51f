"""DistAttention-style decode: one request's KV cache split across ranks, partial attention merged by lse.

Paper: "Infinite-LLM: Efficient LLM Service for Long Context with DistAttention and Distributed KVCache" (Lin et
al., 2024, https://arxiv.org/abs/2401.02669). Each rank holds a slice of the cache (any lengths, even empty);
the decode query is replicated; every rank computes attention of the query over its slice (output and
log-sum-exp), one all-gather of the packed ``(out, lse)`` gives every rank all partials, and the log-sum-exp
merge gives exactly the attention over the whole cache. Forward only (decoding).

Collectives per call: 1 all-gather of ``b * hq * nq * (d + 1)`` elements per rank, independent of the cache.
"""

from __future__ import annotations

import math

import torch

from ..ops.core import masked_attention
from ..ops.merge import merge_attention
from .comm import all_gather_equal, compute_timer

__all__ = ["dist_decode"]


def dist_decode(q, k, v, *, group=None, key_valid: torch.Tensor | None = None, scale: float | None = None,
                return_lse: bool = False, allowed: torch.Tensor | None = None):
    """``q [b, hq, nq, d]`` (the same on every rank), ``k, v [b, hk, n_local, d]`` this rank's cache slice,
    ``key_valid [b, n_local]`` its padding, ``allowed [nq, n_local]`` which of its keys each query may see (e.g.
    causality among several new tokens). Every rank returns the attention over the whole cache."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[1] % k.shape[1]:
        raise ValueError(f"dist_decode: q [b, hq, nq, d] and k, v [b, hk, n_local, d] with hq a multiple of hk, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, hq, nq, d = q.shape
    hk = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if allowed is not None and tuple(allowed.shape) != (nq, k.shape[2]):
        raise ValueError(f"dist_decode: allowed must be [nq, n_local] = [{nq}, {k.shape[2]}], got {tuple(allowed.shape)}")
    with compute_timer():
        mask = None if key_valid is None else key_valid[:, None, None, :]
        if allowed is not None:  # query-major rows repeated per query head of a kv group: [g * nq, n_local]
            rows = allowed.repeat(hq // hk, 1)[None, None]
            mask = rows if mask is None else mask & rows
        o, lse = masked_attention(q.reshape(b, hk, hq // hk * nq, d), k, v, mask, scale)
        packed = torch.cat([o, lse.unsqueeze(-1)], -1).float()  # [b, hk, g*nq, d + 1]
    got = all_gather_equal(packed, "dist_decode", group)  # [P, ...]
    with compute_timer():
        out, total = merge_attention(list(got[..., :d]), list(got[..., d]))
    out = out.reshape(b, hq, nq, d).to(q.dtype)
    return (out, total.reshape(b, hq, nq)) if return_lse else out
