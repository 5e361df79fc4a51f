"""``attention_recall``: how much of the true softmax attention mass a sparse layout keeps.

For a query row, recall is the sum of the dense (causal, unpadded) attention probabilities over the token pairs
the layout computes (its blocks, the causal rule and its token rule). 1.0 means the sparse output equals the
dense one; MInference and MoA select patterns by this quantity.
"""

from __future__ import annotations

import math

import torch

from .layout import BlockLayout
from .reference import check_qkv, dense_mask

__all__ = ["attention_recall", "sample_rows"]


def sample_rows(q_len: int, n: int | None, device=None) -> torch.Tensor:
    """``n`` query indices evenly spaced over ``[0, q_len)``, always including the last (all when ``n`` is None
    or >= ``q_len``)."""
    if n is None or n >= q_len:
        return torch.arange(q_len, device=device)
    if n < 1:
        raise ValueError(f"rows must be >= 1, got {n}")
    return torch.linspace(q_len - 1, 0, n, device=device).round().long().flip(0).unique()


def attention_recall(
    layout: BlockLayout,
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    rows: int | torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Per ``(batch, query head)`` mean over query rows of the dense attention mass inside ``layout``.

    ``q [b, hq, nq, d]``, ``k [b, hkv, nk, d]`` (GQA unrepeated). ``rows``: an int samples that many query rows
    evenly (exact per row, so the mean is an unbiased estimate at any N), a tensor gives the indices, None
    uses every row. ``key_valid [b, nk]`` masks padded keys (and rows of padded queries are skipped).
    Returns float32 ``[b, hq]``.
    """
    b, hq, hk, nq, nk, d = check_qkv(q, k, k)
    if layout.q_len != nq or layout.kv_len != nk:
        raise ValueError(f"layout is for q_len={layout.q_len}, kv_len={layout.kv_len}; got {nq}, {nk}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if rows is None or isinstance(rows, int):
        idx = sample_rows(nq, rows, device=q.device)
    else:
        idx = rows.to(q.device).long()
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= nq:
            raise ValueError(f"rows must be query indices in [0, {nq}), got {idx.tolist()[:8]}...")
    g = hq // hk
    kf = k.float()
    total = torch.zeros(b, hq, dtype=torch.float64, device=q.device)
    count = torch.zeros(b, 1, dtype=torch.float64, device=q.device)
    for c in idx.split(chunk):
        s = torch.matmul(q[:, :, c].float().view(b, hk, g, len(c), d), kf.unsqueeze(2).transpose(-1, -2))
        s = s.view(b, hq, len(c), nk) * scale
        allowed = dense_mask(nq, nk, causal=causal, device=q.device)[c][None, None]
        row_ok = torch.ones(b, len(c), dtype=torch.bool, device=q.device)
        if key_valid is not None:
            kvb = key_valid.to(torch.bool)
            allowed = allowed & kvb[:, None, None, :]
            row_ok = kvb[:, c + nk - nq]  # a padded query row has no meaningful attention
        s = s.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        inside = layout.mask_rows(c, causal=causal, heads=hq).to(q.device)
        mass = (p * inside).sum(-1).double()  # [b, hq, r]
        total += (mass * row_ok[:, None, :]).sum(-1)
        count += row_ok.sum(-1, keepdim=True).double()
    return (total / count.clamp_min(1)).float()
