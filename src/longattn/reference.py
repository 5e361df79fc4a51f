"""Dense attention that is obviously right: the truth every fast path is tested against.

Layout: ``q [batch, q_heads, q_len, dim]``, ``k, v [batch, kv_heads, kv_len, dim]`` (GQA: ``q_heads`` is a
multiple of ``kv_heads``; query head ``h`` reads kv head ``h // (q_heads // kv_heads)``).

Queries are aligned to the *end* of the keys: query ``i`` sits at absolute position ``kv_len - q_len + i``
(self-attention when ``q_len == kv_len``; a chunk of new tokens over a cache otherwise). ``causal`` lets a
query see keys at positions ``<=`` its own; ``window`` (sliding window) further restricts it to the last
``window`` positions. ``mask`` (bool, True = attend) is broadcast to ``[batch, q_heads, q_len, kv_len]``
and intersected with the above. ``softcap`` (Gemma 2) caps the scaled logits: ``softcap * tanh(x / softcap)``.
``sinks`` (gpt-oss ``s_aux``, one logit per query head) join each row's softmax as one more entry with no value:
``p_j = e^{x_j} / (sum_i e^{x_i} + e^{s_h})``; the returned lse is over the keys and the sink. A query row that
sees no key (and has no sink) gets output 0 and lse ``-inf``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention", "dense_mask", "check_qkv"]


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """Validate shapes; return (batch, q_heads, kv_heads, q_len, kv_len, dim)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v: expected 4-D tensors [batch, heads, seq, dim], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, hq, nq, d = q.shape
    bk, hk, nk, dk = k.shape
    if k.shape != v.shape[:3] + (dk,) or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k, v: batch/heads/seq must match, got {tuple(k.shape)} and {tuple(v.shape)}")
    if bk != b or dk != d:
        raise ValueError(f"q, k: batch and head dim must match, got {tuple(q.shape)} and {tuple(k.shape)}")
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of kv heads ({hk}) (GQA)")
    return b, hq, hk, nq, nk, d


def dense_mask(
    q_len: int,
    kv_len: int,
    *,
    causal: bool = True,
    window: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``[q_len, kv_len]`` bool: which key each query may see (queries aligned to the end of the keys)."""
    if q_len > kv_len and causal:
        raise ValueError(f"q_len ({q_len}) must be <= kv_len ({kv_len}) for causal attention aligned to the end")
    qpos = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    kpos = torch.arange(kv_len, device=device)[None, :]
    m = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if causal:
        m &= kpos <= qpos
    if window is not None:
        if window <= 0:
            raise ValueError(f"window must be a positive int or None, got {window}")
        m &= (qpos - kpos) < window
    return m


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    mask: torch.Tensor | None = None,
    window: int | None = None,
    scale: float | None = None,
    float64: bool = True,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out [b, hq, nq, d] in q's dtype, lse [b, hq, nq] float32 (float64 with float64=True))``.

    Computed in float64 by default (the truth); ``float64=False`` computes in float32.
    """
    b, hq, hk, nq, nk, d = check_qkv(q, k, v)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    ct = torch.float64 if float64 else torch.float32
    group = hq // hk
    kk = k.to(ct).repeat_interleave(group, dim=1)
    vv = v.to(ct).repeat_interleave(group, dim=1)
    s = torch.matmul(q.to(ct), kk.transpose(-1, -2)) * scale  # [b, hq, nq, nk]
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    allowed = dense_mask(nq, nk, causal=causal, window=window, device=q.device)[None, None]
    if mask is not None:
        allowed = allowed & mask.to(torch.bool)
    allowed = allowed.expand(b, hq, nq, nk)
    s = s.masked_fill(~allowed, float("-inf"))
    if sinks is not None:  # one more softmax entry per head, with no value
        sink = sinks.to(ct).view(1, hq, 1, 1).expand(b, hq, nq, 1)
        s = torch.cat([s, sink], -1)
        allowed = torch.cat([allowed, torch.ones_like(allowed[..., :1])], -1)
        vv = torch.cat([vv, torch.zeros_like(vv[:, :, :1])], 2)
    lse = torch.logsumexp(s, dim=-1)  # -inf for empty rows
    p = torch.exp(s - lse.unsqueeze(-1).masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0))
    p = p.masked_fill(~allowed, 0.0)
    out = torch.matmul(p, vv)
    return out.to(q.dtype), (lse if float64 else lse.float())
