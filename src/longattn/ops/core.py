"""Small shared attention math: masked softmax attention returning the log-sum-exp, logit softcap, sinks.

Every kernel honours the attention features transformers hands the attention function: ``scale``, ``softcap``
(Gemma 2: logits become ``softcap * tanh(x / softcap)`` before the softmax) and ``sinks`` (gpt-oss ``s_aux``: one
learned logit per query head joins every row's softmax with no value). A sink only rescales a row by
``sigmoid(lse - s)``, so any kernel that returns the log-sum-exp supports sinks through ``add_sinks``.
"""

from __future__ import annotations

import torch

__all__ = ["masked_attention", "add_sinks", "grouped_sinks", "capped"]


def capped(s: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma 2's logit softcap (identity when ``softcap`` is None)."""
    return s if softcap is None else softcap * torch.tanh(s / softcap)


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, scale: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [..., n, d]``, ``k, v [..., m, d]`` (broadcastable leading dims), ``allowed`` bool broadcastable to
    ``[..., n, m]`` or None. Computes in float32 (or float64 if given); returns ``(out [..., n, d], lse [..., n])``
    in that compute dtype. Rows with no allowed key: out 0, lse -inf."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = capped(torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale, softcap)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    out = torch.matmul(p, v.to(ct))
    return out, lse


def add_sinks(out: torch.Tensor, lse: torch.Tensor, sink: torch.Tensor | None):
    """Attention over the keys (``out [..., n, d]``, ``lse [..., n]``) with one more softmax entry of logit
    ``sink`` (broadcastable to ``lse``) and no value: ``(out * sigmoid(lse - sink), logaddexp(lse, sink))``."""
    if sink is None:
        return out, lse
    s = sink.to(lse.dtype).expand_as(lse)
    total = torch.logaddexp(lse, s)
    w = torch.exp(lse - total).nan_to_num(0.0)  # lse = -inf (no key): the sink takes every weight
    return out * w.unsqueeze(-1).to(out.dtype), total


def grouped_sinks(sinks: torch.Tensor | None, hk: int, g: int, nq: int) -> torch.Tensor | None:
    """Per-query-head sinks ``[hq]`` laid out for grouped queries ``[b, hk, g * nq]`` (query head ``h * g + j``,
    query ``i`` at row ``j * nq + i``)."""
    if sinks is None:
        return None
    return sinks.float().view(1, hk, g, 1).expand(1, hk, g, nq).reshape(1, hk, g * nq)


def buffer_capacity(x: torch.Tensor) -> int:
    """Tokens ``x [b, h, n, d]`` sits in: ``cap`` when it is the first ``n`` tokens of a contiguous ``[b, h, cap, d]``
    tensor (the cache layer's room to grow; ``cap == n`` for a plain contiguous tensor), else 0 (another view)."""
    b, h, n, d = x.shape
    plain = n if x.is_contiguous() else 0
    if x.storage_offset() != 0 or d == 0 or x.stride(3) != 1 or x.stride(2) != d or x.stride(1) % d:
        return plain
    cap = x.stride(1) // d
    if cap < n or x.stride(0) != h * cap * d:
        return plain
    return cap if x.untyped_storage().nbytes() >= b * h * cap * d * x.element_size() else plain
