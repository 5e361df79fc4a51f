"""Dense attention paths: ``dense_attention`` (the SDPA call transformers' ``sdpa`` path makes, with padding and a
sliding window) and the block-sparse ``dense`` backend (the layout expanded to a dense mask; for checking only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import BlockLayout

__all__ = ["NAME", "can_run", "dense_attention", "dense_layout_attention"]

NAME = "dense"


def can_run(q, k, v, layout, *, return_lse: bool = False) -> tuple[bool, str]:
    if return_lse:
        return False, "dense (SDPA) backend does not return the log-sum-exp"
    return True, ""


def dense_attention(q, k, v, key_valid, scale, window):
    """Dense SDPA of ``q`` over ``k, v`` (queries aligned to the end of the keys, causal), the same call
    transformers' ``sdpa`` path makes when nothing is padded; ``key_valid [b, nk]`` masks padding, ``window``
    is a sliding window. Rows that see no key come out as 0."""
    nq, nk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if key_valid is None and window is None and (nq == nk or nq == 1):
        return F.scaled_dot_product_attention(q, k, v, is_causal=nq > 1, scale=scale, enable_gqa=gqa)
    qpos = torch.arange(nk - nq, nk, device=q.device)[:, None]
    kpos = torch.arange(nk, device=q.device)[None, :]
    m = kpos <= qpos
    if window is not None:
        m = m & (qpos - kpos < window)
    m = m[None, None]
    if key_valid is not None:
        m = m & key_valid[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale, enable_gqa=gqa)
    return torch.where(m.any(-1, keepdim=True), out, torch.zeros_like(out))


def dense_layout_attention(q, k, v, layout: BlockLayout, causal, scale, key_valid, window):
    m = layout.to_dense_mask(causal=causal, window=window)
    if key_valid is not None:
        m = m & key_valid.to(torch.bool)[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return torch.where(m.any(-1, keepdim=True), out, torch.zeros_like(out))
