"""Attention over a compressed cache layer: the kept prefix (uniform, or packed per-head ragged) plus the tokens
appended since, merged by log-sum-exp.

``q [b, hq, nq, d]`` are the newest tokens; every kept prefix token is visible to them, the tail is causal
(aligned to the end). ``key_valid`` is the logical ``[b, seq]`` validity (padding).
"""

from __future__ import annotations

import torch

from .core import masked_attention
from .dense import dense_attention
from .merge import merge_attention

__all__ = ["attend_compressed", "ragged_attention"]


def attend_compressed(layer, q, key_valid, scale):
    """Attention of the newest ``q`` tokens over a compressed ``LongattnLayer``."""
    kv_phys = layer.physical_key_valid(key_valid)
    if layer.prefix is None:  # uniform budgets: an ordinary, smaller dense cache
        return dense_attention(q, layer.keys, layer.values, kv_phys, scale, None)
    return ragged_attention(layer.prefix, q, layer.keys, layer.values, kv_phys, scale)


def ragged_attention(pre, q, k_tail, v_tail, key_valid, scale):
    """``q`` over a packed ``RaggedKV`` prefix (all visible) and a uniform tail ``k_tail, v_tail [b, hk, t, d]``
    (causal, aligned to the end; ``key_valid [b, t]`` its padding)."""
    b, hq, nq, d = q.shape
    hk = pre.heads
    g = hq // hk
    qg = q.reshape(b, hk, g * nq, d)
    # tail part
    t = k_tail.shape[2]
    qpos = torch.arange(t - nq, t, device=q.device)
    allowed = (torch.arange(t, device=q.device)[None, :] <= qpos[:, None]).repeat(g, 1)  # [g*nq, t]
    allowed = allowed[None, None]
    if key_valid is not None:  # validity of the tail keys
        allowed = allowed & key_valid[:, None, None, :]
    o_t, l_t = masked_attention(qg, k_tail, v_tail, allowed, scale)
    # prefix part
    if pre.uniform:
        kp, vp, _ = pre.as_uniform()
        o_p, l_p = masked_attention(qg, kp, vp, None, scale)
    else:
        o_p = torch.empty(b, hk, g * nq, d, dtype=o_t.dtype, device=q.device)
        l_p = torch.empty(b, hk, g * nq, dtype=l_t.dtype, device=q.device)
        for bi, hi, kr, vr, _ in pre.rows():
            o, lse = masked_attention(qg[bi, hi], kr, vr, None, scale)
            o_p[bi, hi], l_p[bi, hi] = o, lse
    out, _ = merge_attention([o_p, o_t], [l_p, l_t])
    return out.reshape(b, hq, nq, d).to(q.dtype)
