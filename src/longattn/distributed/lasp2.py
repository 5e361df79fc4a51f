"""LASP-2: sequence parallelism for linear attention with one all-gather of memory states; LASP-2H hybrid.

Paper: "LASP-2: Rethinking Sequence Parallelism for Linear Attention and Its Hybrid" (Sun et al., 2025,
https://arxiv.org/abs/2502.07563). Rank ``r`` holds the contiguous chunk ``[start_r, end_r)``. It computes its
chunk's memory state ``M_r = sum_s lambda^(end_r - 1 - s) k_s^T v_s`` (``[d_k, d_v]`` per head, independent of
the sequence length); one all-gather gives every rank every state (the local length is packed with it); the
prefix ``S_r = sum_{p < r} lambda^(start_r - end_p) M_p`` is the state entering the chunk, and the local output is
the chunked (Lightning) linear attention started from ``S_r``. Backward: autograd through the all-gather, whose
backward is one all-reduce of the state gradients.

LASP-2H (``hybrid_attention``): in a model mixing linear and softmax layers, linear layers use LASP-2 and
softmax layers all-gather K/V (``allgather_kv``), so each layer costs one collective in the forward.

Collectives per call: forward 1 all-gather (``b * h * d_k * d_v + 1`` elements per rank); backward 1 all-reduce.
"""

from __future__ import annotations

import torch

from ..ops.linear import chunk_state, decay_tensor, lightning_attention
from .allgather import allgather_kv
from .comm import all_gather_equal, all_reduce, compute_timer, world

__all__ = ["lasp2", "hybrid_attention"]


class _GatherStates(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_equal(x, "lasp2", group)

    @staticmethod
    def backward(ctx, grad):
        r, _ = world(ctx.group)
        g = all_reduce(grad.contiguous().clone(), "lasp2", ctx.group)
        return g[r], None


def lasp2(q, k, v, *, group=None, decay=None, block_size: int = 64):
    """Causal linear attention over a sequence sharded contiguously across ranks (see the module docstring).
    ``q, k [b, h, n_local, d_k]``, ``v [b, h, n_local, d_v]`` (GQA kv heads repeated); ``decay`` as
    ``ops.linear``. Local lengths may differ."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[2] != k.shape[2] or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"lasp2: q, k [b, h, n_local, d_k] and v [b, h, n_local, d_v] with one local length, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    r, p = world(group)
    b, h, n, _ = q.shape
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    lam = decay_tensor(decay, h, q.device, ct)
    with compute_timer():
        m = chunk_state(k, v, decay=lam, q_heads=h)  # [b, h, dk, dv]
        packed = torch.cat([m.reshape(-1), torch.tensor([float(n)], dtype=m.dtype, device=m.device)])
    got = _GatherStates.apply(packed, group)  # [P, numel + 1]
    with compute_timer():
        lengths = [int(round(float(x))) for x in got[:, -1].detach()]
        states = got[:, :-1].view(p, *m.shape)
        start = sum(lengths[:r])
        ends = torch.tensor(lengths, dtype=ct, device=q.device).cumsum(0)  # [P]
        gap = (start - ends).clamp_min(0)  # lambda exponent from rank i's end to this rank's start
        w = torch.ones(p, 1, dtype=ct, device=q.device) if lam is None else lam.view(1, h) ** gap.view(p, 1)
        w = w * (torch.arange(p, device=q.device) < r).to(ct).view(p, 1)  # only the ranks before this one
        # every rank's states enter the graph (weight 0 from the later ranks), so every rank runs the backward's
        # collective even when nothing precedes it
        s_in = torch.einsum("ph,pbhkv->bhkv", w.expand(p, h), states)
        return lightning_attention(q, k, v, decay=lam, block_size=block_size, state=s_in)


def hybrid_attention(kind: str, q, k, v, *, group=None, decay=None, block_size: int = 64, scale=None):
    """LASP-2H: ``kind="linear"`` -> ``lasp2``; ``kind="softmax"`` -> ``allgather_kv`` (causal, contiguous)."""
    if kind == "linear":
        return lasp2(q, k, v, group=group, decay=decay, block_size=block_size)
    if kind == "softmax":
        return allgather_kv(q, k, v, group=group, causal=True, scale=scale)
    raise ValueError(f"kind must be one of linear, softmax, got {kind!r}")
