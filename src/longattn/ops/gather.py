"""Block-sparse attention, pure-torch ``gather`` backend: for a chunk of query blocks, gather the selected key
blocks and compute the masked softmax (fused SDPA, or float32 with the log-sum-exp). Works on every device and
dtype, with autograd."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import BlockLayout
from .core import add_sinks, masked_attention

__all__ = ["NAME", "can_run", "gather_block_attention"]

NAME = "gather"


def can_run(q, k, v, layout, *, return_lse: bool = False, sinks: bool = False) -> tuple[bool, str]:
    """Always: the gather backend has no limits (autograd, lse, any dtype)."""
    return True, ""


def gather_block_attention(q, k, v, layout: BlockLayout, causal, scale, key_valid, window, need_lse=True,
                           softcap=None, sinks=None):
    """``(out, lse or None)``; with ``softcap`` or ``sinks`` the explicit float32 path runs (the fused SDPA can
    apply neither) and the returned lse includes the sink."""
    explicit = need_lse or softcap is not None or sinks is not None
    b, hq, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    group = hq // hk
    bs = layout.block_size
    nkb, nqb = layout.num_kv_blocks, layout.num_q_blocks
    off = nk - nq
    dev = q.device
    kp = F.pad(k, (0, 0, 0, nkb * bs - nk)).view(b, hk, nkb, bs, d)
    vp = F.pad(v, (0, 0, 0, nkb * bs - nk)).view(b, hk, nkb, bs, d)
    qp = F.pad(q, (0, 0, 0, nqb * bs - nq)).view(b, hq, nqb, bs, d)
    kvalid = torch.arange(nkb * bs, device=dev) < nk
    kvalid = kvalid.unsqueeze(0).expand(b, -1)
    if key_valid is not None:
        kvalid = kvalid & F.pad(key_valid.to(torch.bool), (0, nkb * bs - nk))
    max_k_all = max(layout.kv_indices.shape[-1], 1)
    counts_qb = layout.kv_counts.amax(dim=(0, 1)).tolist()  # per query block, the most kv blocks of any head
    bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
    hi = (torch.arange(hq, device=dev) // group).view(1, hq, 1, 1)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(b, hq, nqb * bs, d, dtype=ct, device=dev)
    lse = torch.empty(b, hq, nqb * bs, dtype=ct, device=dev) if explicit else None
    within = torch.arange(bs, device=dev)
    hq_idx = torch.arange(hq, device=dev).view(1, hq, 1, 1, 1)
    budget = 128 << 20  # bound the transient scores tensor to ~128 MiB
    c0 = 0
    while c0 < nqb:
        # grow the chunk of query blocks while its padded scores fit the budget
        c1, max_k = c0 + 1, max(int(counts_qb[c0]), 1)
        while c1 < nqb:
            mk = max(max_k, int(counts_qb[c1]))
            if b * hq * (c1 + 1 - c0) * bs * mk * bs * 4 > budget:
                break
            c1, max_k = c1 + 1, mk
        max_k = min(max_k, max_k_all)
        c = c1 - c0
        slot = torch.arange(max_k, device=dev)
        idx = layout.kv_indices[:, :, c0:c1, :max_k].long()
        slot_ok = slot < layout.kv_counts[:, :, c0:c1].unsqueeze(-1)  # [b, hq, c, mk]
        idx = idx * slot_ok  # padding slots read block 0 (masked out below)
        kg = kp[bi, hi, idx].reshape(b, hq, c, max_k * bs, d)
        vg = vp[bi, hi, idx].reshape(b, hq, c, max_k * bs, d)
        kpos = (idx.unsqueeze(-1) * bs + within).reshape(b, hq, c, max_k * bs)
        ok = slot_ok.unsqueeze(-1).expand(-1, -1, -1, -1, bs).reshape(b, hq, c, max_k * bs)
        ok = ok & torch.gather(kvalid.unsqueeze(1).unsqueeze(1).expand(b, hq, c, -1), 3, kpos)
        allowed = ok.unsqueeze(-2)  # [b, hq, c, 1, m]
        qpos = (torch.arange(c0, c1, device=dev).view(c, 1) * bs + within).view(1, 1, c, bs, 1) + off
        if causal:
            allowed = allowed & (kpos.unsqueeze(-2) <= qpos)
        if window is not None:
            allowed = allowed & (qpos - kpos.unsqueeze(-2) < window)
        if layout.rule is not None:
            allowed = allowed & layout.rule(bi.unsqueeze(-1), hq_idx, qpos, kpos.unsqueeze(-2))
        if explicit:
            o, l_ = masked_attention(qp[:, :, c0:c1], kg, vg, allowed, scale, softcap)
            lse[:, :, c0 * bs : c1 * bs] = l_.reshape(b, hq, c * bs)
        else:
            # fused SDPA over the gathered blocks (flash kernel on CPU); rows with no key come out as 0 below
            m = max_k * bs
            allowed = allowed.expand(b, hq, c, bs, m).reshape(b * hq, c, bs, m)
            o = F.scaled_dot_product_attention(  # 4-D, so the CPU flash kernel takes it
                qp[:, :, c0:c1].reshape(b * hq, c, bs, d), kg.reshape(b * hq, c, m, d),
                vg.reshape(b * hq, c, m, d), attn_mask=allowed, scale=scale,
            )
            if o.device.type != "cpu":  # the CPU flash kernel already gives 0 for rows with no key
                o = torch.where(allowed.any(-1, keepdim=True), o, torch.zeros_like(o))
        out[:, :, c0 * bs : c1 * bs] = o.reshape(b, hq, c * bs, d).to(ct)
        c0 = c1
    out, lse = out[:, :, :nq], (lse[:, :, :nq] if explicit else None)
    if sinks is not None:
        out, lse = add_sinks(out, lse, sinks.view(1, hq, 1))
    return out.to(q.dtype), (lse.float() if need_lse else None)
