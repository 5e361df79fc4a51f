"""Attention over a compressed cache layer: the kept prefix (uniform, or packed per-head ragged) plus the tokens
appended since, merged by log-sum-exp.

``q [b, hq, nq, d]`` are the newest tokens; every kept prefix token is visible to them, the tail is causal
(aligned to the end). ``key_valid`` is the logical ``[b, seq]`` validity (padding).
"""

from __future__ import annotations

import torch

from .core import add_sinks, grouped_sinks, masked_attention
from .dense import dense_attention
from .merge import merge_attention

__all__ = ["attend_compressed", "ragged_attention"]


def attend_compressed(layer, q, key_valid, scale, softcap=None, sinks=None, window=None):
    """Attention of the newest ``q`` tokens over a compressed ``LongattnLayer`` (``window``: a sliding layer, by
    the tokens' original positions)."""
    kv_phys = layer.physical_key_valid(key_valid)
    if layer.prefix is None:  # uniform budgets: an ordinary, smaller dense cache
        if window is None:
            return dense_attention(q, layer.keys, layer.values, kv_phys, scale, None, softcap, sinks)
        return _uniform_windowed(layer, q, kv_phys, scale, softcap, sinks, window)
    return ragged_attention(layer.prefix, q, layer.keys, layer.values, kv_phys, scale, softcap, sinks, window)


def _uniform_windowed(layer, q, kv_phys, scale, softcap, sinks, window):
    """A uniform compressed sliding layer: the kept prefix (positions per head) and the tail, causal by position
    and inside the window."""
    from .dense import masked_grouped

    b, hq, nq, _ = q.shape
    hk = layer.keys.shape[1]
    g = hq // hk
    kpos = layer.physical_positions().long()  # [b, hk, n]
    qpos = torch.arange(layer.get_seq_length() - nq, layer.get_seq_length(), device=q.device)
    ok = (kpos[:, :, None, :] <= qpos[None, None, :, None]) & (qpos[None, None, :, None] - kpos[:, :, None, :] < window)
    ok = ok.repeat_interleave(g, dim=1)  # [b, hq, nq, n]
    if kv_phys is not None:
        ok = ok & kv_phys[:, None, None, :]
    return masked_grouped(q, layer.keys, layer.values, ok, scale, softcap, sinks)


def ragged_attention(pre, q, k_tail, v_tail, key_valid, scale, softcap=None, sinks=None, window=None):
    """``q`` over a packed ``RaggedKV`` prefix (all visible) and a uniform tail ``k_tail, v_tail [b, hk, t, d]``
    (causal, aligned to the end; ``key_valid [b, t]`` its padding)."""
    b, hq, nq, d = q.shape
    hk = pre.heads
    g = hq // hk
    qg = q.reshape(b, hk, g * nq, d)
    # tail part
    t = k_tail.shape[2]
    qpos = torch.arange(t - nq, t, device=q.device)
    tail_ok = torch.arange(t, device=q.device)[None, :] <= qpos[:, None]
    if window is not None:
        tail_ok = tail_ok & (qpos[:, None] - torch.arange(t, device=q.device)[None, :] < window)
    allowed = tail_ok.repeat(g, 1)  # [g*nq, t]
    allowed = allowed[None, None]
    if key_valid is not None:  # validity of the tail keys
        allowed = allowed & key_valid[:, None, None, :]
    o_t, l_t = masked_attention(qg, k_tail, v_tail, allowed, scale, softcap)
    # prefix part (every kept token is before the queries; a sliding layer also needs it inside the window)
    qabs = (torch.arange(nq, device=q.device) + pre.logical_len + t - nq).repeat(g)  # [g*nq] absolute positions
    if pre.uniform:
        kp, vp, pos = pre.as_uniform()
        ok = None if window is None else (qabs[None, None, :, None] - pos.long()[:, :, None, :] < window)
        o_p, l_p = masked_attention(qg, kp, vp, ok, scale, softcap)
    else:
        o_p = torch.empty(b, hk, g * nq, d, dtype=o_t.dtype, device=q.device)
        l_p = torch.empty(b, hk, g * nq, dtype=l_t.dtype, device=q.device)
        for bi, hi, kr, vr, pr in pre.rows():
            ok = None if window is None else (qabs[:, None] - pr.long()[None, :] < window)
            o, lse = masked_attention(qg[bi, hi], kr, vr, ok, scale, softcap)
            o_p[bi, hi], l_p[bi, hi] = o, lse
    out, lse = merge_attention([o_p, o_t], [l_p, l_t])
    out, _ = add_sinks(out, lse, grouped_sinks(sinks, hk, g, nq))
    return out.reshape(b, hq, nq, d).to(q.dtype)
