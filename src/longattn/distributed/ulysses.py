"""DeepSpeed-Ulysses: all-to-all from sequence shards to head shards, full attention per head group, and back.

Paper: "DeepSpeed Ulysses: System Optimizations for Enabling Training of Extreme Long Sequence Transformer
Models" (Jacobs et al., 2023, https://arxiv.org/abs/2309.14509). Each rank holds a sequence shard of all heads;
one all-to-all (q, k and v packed together) gives every rank the whole sequence for ``heads / P`` of the heads,
it computes attention for those heads (causal blocks in the future skipped), and one all-to-all brings the output
back to sequence shards. Backward: the same two all-to-alls in reverse (one for the output gradient, one for the
packed q/k/v gradients). With GQA, kv heads are split across ranks too when ``P`` divides them; otherwise they are
repeated to the query heads first.

``backend="torch"`` (default) is this implementation on ``all_to_all_single``; ``backend="deepspeed"`` hands the
same local attention to DeepSpeed's ``DistributedAttention`` (the optional ``deepspeed`` package: 0.19.8 runs on
CPU with gloo, installed with ``pip install --no-build-isolation deepspeed``; its comm layer is initialised over
the process group already running). DeepSpeed sends q, k and v in three all-to-alls where ours packs them into
one; equal local lengths only. Tested against ours and the reference where deepspeed is installed (skipped else).

Collectives per call: forward 2 all-to-alls (+1 lengths all-gather unless given); backward 2. Volume per rank:
``(P - 1) / P`` of its ``(hq + 2 hk) * n_local * dim`` (in) and ``hq * n_local * dim`` (out) elements.
"""

from __future__ import annotations

import torch

from .blocks import attend_ranges, backward_ranges
from .comm import all_to_all, compute_timer, world
from .ring import prepare

__all__ = ["ulysses", "BACKENDS"]

BACKENDS = ("torch", "deepspeed")


def _scatter_heads(tensors, heads, lengths, group):
    """Sequence shards of several tensors ``[b, h_i, n_local, d]`` -> head shards ``[b, h_i / P, N, d]`` (one
    all-to-all of everything packed)."""
    r, p = world(group)
    b, _, n, d = tensors[0].shape
    send = []
    for j in range(p):
        for t, h in zip(tensors, heads):
            send.append(t[:, j * (h // p) : (j + 1) * (h // p)].reshape(-1))
    per = b * sum(h // p for h in heads) * d
    got = all_to_all(torch.cat(send), [per * n] * p, [per * m for m in lengths], (), "ulysses", group)
    outs = [[] for _ in tensors]
    off = 0
    for m in lengths:
        for i, h in enumerate(heads):
            size = b * (h // p) * m * d
            outs[i].append(got[off : off + size].view(b, h // p, m, d))
            off += size
    return [torch.cat(o, 2) for o in outs]


def _gather_heads(tensors, heads, lengths, group):
    """Inverse of ``_scatter_heads``: head shards ``[b, h_i / P, N, d]`` -> sequence shards ``[b, h_i, n, d]``."""
    r, p = world(group)
    b, _, _, d = tensors[0].shape
    n = lengths[r]
    send = []
    for t in tensors:
        send.append(list(torch.split(t, lengths, 2)))
    flat = []
    for j in range(p):
        for i in range(len(tensors)):
            flat.append(send[i][j].reshape(-1))
    per = b * sum(h // p for h in heads) * d
    got = all_to_all(torch.cat(flat), [per * m for m in lengths], [per * n] * p, (), "ulysses", group)
    outs = [[] for _ in tensors]
    off = 0
    for _j in range(p):
        for i, h in enumerate(heads):
            size = b * (h // p) * n * d
            outs[i].append(got[off : off + size].view(b, h // p, n, d))
            off += size
    return [torch.cat(o, 1) for o in outs]


class _Ulysses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, lengths, ranges, causal, scale, kernel):
        hq, hk = q.shape[1], k.shape[1]
        qh, kh, vh = _scatter_heads([q, k, v], [hq, hk, hk], lengths, group)
        allr = [rg for rr in ranges for rg in rr]
        with compute_timer():
            out, lse = attend_ranges(qh, kh, vh, allr, allr, causal=causal, scale=scale, kernel=kernel)
        (res,) = _gather_heads([out.to(q.dtype)], [hq], lengths, group)
        ctx.save_for_backward(qh, kh, vh, out, lse)
        ctx.cfg = (group, lengths, allr, causal, scale, hq, hk)
        return res

    @staticmethod
    def backward(ctx, dout):
        qh, kh, vh, out, lse = ctx.saved_tensors
        group, lengths, allr, causal, scale, hq, hk = ctx.cfg
        (douth,) = _scatter_heads([dout.contiguous().to(out.dtype)], [hq], lengths, group)
        with compute_timer():
            dq, dk, dv = backward_ranges(qh, kh, vh, out, lse, douth, allr, allr, causal=causal, scale=scale)
        dq, dk, dv = _gather_heads([dq, dk, dv], [hq, hk, hk], lengths, group)
        return dq.to(qh.dtype), dk.to(kh.dtype), dv.to(vh.dtype), None, None, None, None, None, None


def ulysses(q, k, v, *, group=None, causal: bool = True, layout: str = "contiguous", scale: float | None = None,
            kernel: str = "eager", lengths: list[int] | None = None, backend: str = "torch"):
    """Sequence-parallel attention by head all-to-all (see the module docstring); arguments as
    ``ring_attention``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    _, p = world(group)
    hq, hk = q.shape[1], k.shape[1]
    if hq % p:
        raise ValueError(f"ulysses: query heads ({hq}) must be divisible by the number of ranks ({p})")
    lengths, ranges, scale, _ = prepare(q, k, v, "ulysses", group, layout, kernel, lengths, scale)
    if hk % p:  # kv heads cannot be split: repeat them to the query heads (autograd sums the copies back)
        k, v = k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)
    if backend == "deepspeed":
        return _deepspeed(q, k, v, group, ranges, causal, scale, kernel)
    return _Ulysses.apply(q, k, v, group, lengths, ranges, causal, scale, kernel)


def _deepspeed(q, k, v, group, ranges, causal, scale, kernel):
    try:
        from deepspeed.sequence.layer import DistributedAttention
    except ImportError:
        raise ValueError("backend='deepspeed' needs the deepspeed package (pip install deepspeed); allowed "
                         "without it: torch") from None
    lengths = [sum(e - s for s, e in rr) for rr in ranges]
    if len(set(lengths)) != 1:
        raise ValueError("backend='deepspeed': DeepSpeed's all-to-all needs equal local lengths; use backend='torch'")
    allr = [rg for rr in ranges for rg in rr]

    def local(qh, kh, vh, *args, **kwargs):  # DeepSpeed layout here: [b, s, h, d] (scatter heads, gather seq)
        o, _ = attend_ranges(qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2), allr, allr, causal=causal,
                             scale=scale, kernel=kernel)
        return o.to(qh.dtype).transpose(1, 2)

    import deepspeed.comm as ds_comm
    import torch.distributed as dist

    if not ds_comm.is_initialized():  # DeepSpeed's comm layer wraps the process group already running
        ds_comm.init_distributed(dist_backend=dist.get_backend(group), auto_mpi_discovery=False, verbose=False)
    attn = DistributedAttention(local, group if group is not None else dist.group.WORLD, scatter_idx=2, gather_idx=1)
    return attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0).transpose(1, 2)  # batch dim 0
