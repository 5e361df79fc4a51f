"""Merge partial attention results by their log-sum-exp (flash-decoding / ring attention combine)."""

from __future__ import annotations

import torch

__all__ = ["merge_attention"]


def merge_attention(
    outs: list[torch.Tensor] | tuple[torch.Tensor, ...], lses: list[torch.Tensor] | tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine partials ``out_i [..., n, d]`` with ``lse_i [..., n]`` computed over disjoint key sets.

    Returns ``(out, lse)`` equal to attention over the union of the key sets. Partials with ``lse = -inf``
    (no visible key) contribute nothing; a row empty in every partial gets output 0 and lse ``-inf``.
    """
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(f"outs and lses: need the same non-zero number of partials, got {len(outs)}, {len(lses)}")
    if len(outs) == 1:
        return outs[0], lses[0]
    ct = torch.float64 if lses[0].dtype == torch.float64 else torch.float32
    lse = torch.stack([x.to(ct) for x in lses], 0)  # [p, ..., n]
    m = lse.amax(0)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(lse - m_safe)  # exp(-inf) = 0 for empty partials
    denom = w.sum(0)
    total = m_safe + torch.log(denom)
    total = torch.where(denom > 0, total, torch.full_like(total, float("-inf")))
    w = w / denom.clamp_min(torch.finfo(w.dtype).tiny)
    out = sum(wi.unsqueeze(-1) * o.to(ct) for wi, o in zip(w, outs))
    return out.to(outs[0].dtype), total
