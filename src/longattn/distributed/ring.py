"""Ring attention: K/V blocks travel around the ring of ranks, overlapped with the block computation.

Papers: "Ring Attention with Blockwise Transformers for Near-Infinite Context" (Liu et al., ICLR 2024,
https://arxiv.org/abs/2310.01889); the zigzag (load-balanced causal) layout of zhuzilin/ring-flash-attention and
Llama 3's context parallelism. Each rank holds a shard of the sequence (``layout="contiguous"`` or ``"zigzag"``)
for q, k and v. In ``P`` steps every rank computes its queries against the K/V block it holds while, in the
same step, sending that block to the next rank and receiving the previous rank's (one non-blocking
``batch_isend_irecv`` per step); partial outputs are merged by log-sum-exp. Causal blocks entirely in the future
are skipped, so in the zigzag layout every rank does the same work. The backward (``torch.autograd.Function``)
passes K/V around again together with their accumulated gradients, recomputing probabilities from the saved
log-sum-exp; the gradients of each K/V block arrive back at its owner after one more send.

Collectives per call: forward ``P - 1`` ring sends (+1 small all-gather of the lengths unless ``lengths`` is
given); backward ``P`` sends. Volume per rank: forward ``(P - 1) * 2 * n_local * kv_heads * dim`` elements.
"""

from __future__ import annotations

import math

import torch

from ..ops.merge import merge_attention
from .blocks import KERNELS, LAYOUTS, SparseBlocks, attend_ranges, backward_ranges, rank_ranges
from .comm import compute_timer, exchange_lengths, ring_exchange, wait_all, world

__all__ = ["ring_attention", "check_local", "prepare"]


def check_local(q, k, v, method: str) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{method}: q, k, v must be [batch, heads, local_len, dim], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{method}: q, k, v must share batch, local length and dim (k and v the same shape), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{method}: query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")


def prepare(q, k, v, method: str, group, layout: str, kernel: str, lengths, scale, blocks=None):
    """Validate a sequence-parallel call; returns ``(lengths, ranges per rank, scale, sparse)`` (lengths
    exchanged with one small all-gather when not given; ``sparse``: the ``SparseBlocks`` of ``blocks``)."""
    check_local(q, k, v, method)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if lengths is None:
        lengths = exchange_lengths(q.shape[2], method, group, q.device)
    lengths = list(lengths)
    ranges = rank_ranges(lengths, layout)
    sparse = None
    if blocks is not None:
        sparse = SparseBlocks(blocks, sum(lengths))
        sparse.check_ranges(ranges, sum(lengths))
    return lengths, ranges, 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale, sparse


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, ranges, causal, scale, kernel, sparse):
        r, p = world(group)
        b, hk, _, d = k.shape
        cur, src = torch.stack([k, v]), r
        out = lse = None
        for step in range(p):
            reqs = None
            if step < p - 1:
                nsrc = (r - step - 1) % p
                n_next = sum(e - s for s, e in ranges[nsrc])
                reqs, buf = ring_exchange(cur, (2, b, hk, n_next, d), "ring_attention", group)
            with compute_timer():
                o, lz = attend_ranges(q, cur[0], cur[1], ranges[r], ranges[src], causal=causal, scale=scale,
                                      kernel=kernel, sparse=sparse)
                out, lse = (o, lz) if out is None else merge_attention([out, o], [lse, lz])
            if reqs is not None:
                wait_all(reqs, "ring_attention", group)
                cur, src = buf, nsrc
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cfg = (group, ranges, causal, scale, sparse)
        ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        group, ranges, causal, scale, sparse = ctx.cfg
        r, p = world(group)
        b, hk, _, d = k.shape
        ct = out.dtype
        cur = torch.stack([k, v]).to(ct)
        dacc = torch.zeros_like(cur)
        dq = torch.zeros(q.shape, dtype=ct, device=q.device)
        src = r
        for step in range(p):
            with compute_timer():
                dq_, dk_, dv_ = backward_ranges(q, cur[0], cur[1], out, lse, dout, ranges[r], ranges[src],
                                                causal=causal, scale=scale, sparse=sparse)
                dq += dq_
                dacc[0] += dk_
                dacc[1] += dv_
            if step < p - 1:
                nsrc = (r - step - 1) % p
                n_next = sum(e - s for s, e in ranges[nsrc])
                reqs, buf = ring_exchange(torch.cat([cur, dacc]), (4, b, hk, n_next, d), "ring_attention", group)
                wait_all(reqs, "ring_attention", group)
                cur, dacc, src = buf[:2], buf[2:].clone(), nsrc
        if p > 1:  # the gradients of the block held now are complete: send them home (to the next rank)
            reqs, buf = ring_exchange(dacc, (2, b, hk, k.shape[2], d), "ring_attention", group)
            wait_all(reqs, "ring_attention", group)
            dacc = buf
        return dq.to(q.dtype), dacc[0].to(k.dtype), dacc[1].to(v.dtype), None, None, None, None, None, None


def ring_attention(q, k, v, *, group=None, causal: bool = True, layout: str = "contiguous",
                   scale: float | None = None, kernel: str = "eager", lengths: list[int] | None = None,
                   return_lse: bool = False, blocks=None):
    """Sequence-parallel attention by ring (see the module docstring). ``q [b, hq, n_local, d]``, ``k, v
    [b, hk, n_local, d]``: this rank's shard in ``layout``; ``lengths``: every rank's ``n_local`` (exchanged
    when None; local lengths may differ in the contiguous layout); ``blocks``: a ``BlockLayout`` over the whole
    sequence (any prefill pattern's) to compute sparsely, its block size dividing every rank's range
    boundaries. Returns this rank's output (and its log-sum-exp with ``return_lse``)."""
    lengths, ranges, scale, sparse = prepare(q, k, v, "ring_attention", group, layout, kernel, lengths, scale, blocks)
    out, lse = _Ring.apply(q, k, v, group, ranges, causal, scale, kernel, sparse)
    return (out, lse) if return_lse else out
