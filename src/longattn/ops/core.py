"""Small shared attention math: masked softmax attention returning the log-sum-exp."""

from __future__ import annotations

import torch

__all__ = ["masked_attention"]


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [..., n, d]``, ``k, v [..., m, d]`` (broadcastable leading dims), ``allowed`` bool broadcastable to
    ``[..., n, m]`` or None. Computes in float32 (or float64 if given); returns ``(out [..., n, d], lse [..., n])``
    in that compute dtype. Rows with no allowed key: out 0, lse -inf."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    out = torch.matmul(p, v.to(ct))
    return out, lse
