"""All-gather-KV context parallelism: one all-gather of K/V per layer, local attention of the query shard.

As PyTorch's context-parallel default and Llama 3's long-context training ("The Llama 3 Herd of Models",
https://arxiv.org/abs/2407.21783, section 3.3.2): every rank gathers the whole K/V (one all-gather of the packed
K and V; local lengths may differ: padded to the longest for the collective), then attends its query shard to
it, skipping causal blocks entirely in the future. Backward: the gradients of the gathered K/V are summed and
returned to their owners by one reduce-scatter.

Collectives per call: forward 1 all-gather (+1 of the lengths unless given); backward 1 reduce-scatter.
Volume per rank: ``2 * n_local * kv_heads * dim`` elements sent, ``(P - 1)`` times that received.
"""

from __future__ import annotations

import torch

from .blocks import attend_ranges, backward_ranges
from .comm import all_gather_var, compute_timer, reduce_scatter_var, world
from .ring import prepare

__all__ = ["allgather_kv"]


class _AllGatherKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, lengths, ranges, causal, scale, kernel, sparse):
        r, _ = world(group)
        parts = all_gather_var(torch.stack([k, v]), lengths, 3, "allgather_kv", group)
        kv = torch.cat(parts, 3)  # [2, b, hk, N, d] in rank order
        kranges = [rg for rr in ranges for rg in rr]
        with compute_timer():
            out, lse = attend_ranges(q, kv[0], kv[1], ranges[r], kranges, causal=causal, scale=scale, kernel=kernel,
                                     sparse=sparse)
        ctx.save_for_backward(q, kv, out, lse)
        ctx.cfg = (group, lengths, ranges, kranges, causal, scale, sparse)
        ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, kv, out, lse = ctx.saved_tensors
        group, lengths, ranges, kranges, causal, scale, sparse = ctx.cfg
        r, _ = world(group)
        with compute_timer():
            dq, dk, dv = backward_ranges(q, kv[0], kv[1], out, lse, dout, ranges[r], kranges, causal=causal,
                                         scale=scale, sparse=sparse)
        dkv = reduce_scatter_var(torch.stack([dk, dv]), lengths, 3, "allgather_kv", group)
        return dq.to(q.dtype), dkv[0].to(kv.dtype), dkv[1].to(kv.dtype), None, None, None, None, None, None, None


def allgather_kv(q, k, v, *, group=None, causal: bool = True, layout: str = "contiguous",
                 scale: float | None = None, kernel: str = "eager", lengths: list[int] | None = None,
                 return_lse: bool = False, blocks=None):
    """Sequence-parallel attention by one all-gather of K/V (see the module docstring); arguments as
    ``ring_attention``."""
    lengths, ranges, scale, sparse = prepare(q, k, v, "allgather_kv", group, layout, kernel, lengths, scale, blocks)
    out, lse = _AllGatherKV.apply(q, k, v, group, lengths, ranges, causal, scale, kernel, sparse)
    return (out, lse) if return_lse else out
