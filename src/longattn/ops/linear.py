"""Linear attention (Lightning Attention-1/2, TransNormerLLM): chunked causal form, references, recurrent decode.

Papers: "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language Models"
(Qin et al., 2024, https://arxiv.org/abs/2401.04658); "TransNormerLLM" (Qin et al., 2023,
https://arxiv.org/abs/2307.14995) for the per-head decay.

Causal linear attention with a per-head decay ``lambda`` in (0, 1] (1 = no decay):

    o_t = sum_{s <= t} lambda^(t - s) (q_t . k_s) v_s

``lightning_attention`` computes it with the tiling of Lightning Attention-2: the sequence is cut into blocks of
``block_size``; inside a block the conventional (masked, decayed) product ``((Q K^T) * D) V``, across blocks the
kernel trick with a running state ``S = sum_s lambda^(end - s) k_s^T v_s`` (``[d_k, d_v]`` per head), so the cost
is ``O(N * block * d + N * d^2)``: constant per token. The forward is plain torch ops, so autograd gives the
backward. ``linear_attention_naive`` (the quadratic masked product) and ``linear_attention_recurrent`` (one token
at a time) are the references; ``linear_decode_step`` continues a prefill from its final state in O(1).
Non-causal (``causal=False``: ``Q (K^T V)``, no decay) and cross (queries and keys of different lengths,
non-causal) forms are supported. No normalisation is applied (TransNormerLLM normalises the output afterwards).

Layout: ``q, k [b, h, n, d_k]``, ``v [b, h, n, d_v]``; GQA (fewer kv heads) is repeated per group. ``decay``:
``None``, a float, or a ``[h]`` tensor.
"""

from __future__ import annotations

import torch

from ..checks import check_int

__all__ = ["lightning_attention", "linear_attention_naive", "linear_attention_recurrent", "linear_decode_step",
           "decay_tensor", "chunk_state"]


def _expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v: expected [batch, heads, seq, dim], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    hq, hk = q.shape[1], k.shape[1]
    if k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0]:
        raise ValueError(f"q, k, v: batch/heads/seq/dim mismatch {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if hk == 0 or hq % hk:
        raise ValueError(f"q heads ({hq}) must be a multiple of kv heads ({hk})")
    if hq != hk:
        k, v = k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)
    return k, v


def decay_tensor(decay, heads: int, device=None, dtype=torch.float32) -> torch.Tensor | None:
    """``None`` (no decay), a float or a ``[heads]`` tensor, each in (0, 1] -> ``[heads]`` tensor or None."""
    if decay is None:
        return None
    lam = torch.as_tensor(decay, dtype=dtype, device=device)
    if lam.dim() == 0:
        lam = lam.expand(heads)
    if lam.shape != (heads,):
        raise ValueError(f"decay: expected a float or a [{heads}] tensor, got shape {tuple(lam.shape)}")
    if not bool(((lam > 0) & (lam <= 1)).all()):
        raise ValueError(f"decay: every value must be in (0, 1], got {lam.tolist()}")
    return lam


def _pow(lam: torch.Tensor | None, e: torch.Tensor) -> torch.Tensor:
    """``lam[h] ** e`` as ``[h, *e.shape]`` (ones when there is no decay)."""
    if lam is None:
        return torch.ones((1, *e.shape), dtype=torch.float32 if e.dtype not in (torch.float64,) else e.dtype,
                          device=e.device)
    return lam.view(-1, *([1] * e.dim())) ** e.to(lam.dtype).unsqueeze(0)


def _ct(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def linear_attention_naive(q, k, v, *, decay=None, causal: bool = True) -> torch.Tensor:
    """The quadratic reference: ``((Q K^T) * M) V`` with ``M[t, s] = lambda^(t - s)`` for ``s <= t`` (causal) or
    ``M = 1`` (non-causal, no decay; queries and keys may differ in length)."""
    k, v = _expand_kv(q, k, v)
    ct = _ct(q)
    h, n, m = q.shape[1], q.shape[2], k.shape[2]
    lam = decay_tensor(decay, h, q.device, ct)
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2))
    if causal:
        if n != m:
            raise ValueError(f"causal linear attention needs q and k of the same length, got {n} and {m}")
        t = torch.arange(n, device=q.device)
        dist = t[:, None] - t[None, :]
        mask = _pow(lam, dist.clamp_min(0)) * (dist >= 0)
        s = s * mask.to(ct).unsqueeze(0)
    elif lam is not None:
        raise ValueError("decay: only the causal form has a decay (causal=True)")
    return torch.matmul(s, v.to(ct)).to(q.dtype)


def linear_attention_recurrent(q, k, v, *, decay=None, state: torch.Tensor | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrent reference, one token at a time: ``S = lambda S + k_t^T v_t``, ``o_t = q_t S``.
    Returns ``(out, final state [b, h, d_k, d_v])``."""
    k, v = _expand_kv(q, k, v)
    out = []
    for t in range(q.shape[2]):
        o, state = linear_decode_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state, decay=decay)
        out.append(o)
    return torch.cat(out, 2), state


def linear_decode_step(q, k, v, state: torch.Tensor | None, *, decay=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One generated token: ``q, k [b, h, 1, d_k]``, ``v [b, h, 1, d_v]``, ``state [b, h, d_k, d_v]`` (None =
    zeros). O(1) in the sequence length. Returns ``(out [b, h, 1, d_v], new state)``."""
    k, v = _expand_kv(q, k, v)
    if q.shape[2] != 1:
        raise ValueError(f"linear_decode_step: one token per call, got q of length {q.shape[2]}")
    ct = _ct(q)
    b, h, _, dk = q.shape
    lam = decay_tensor(decay, h, q.device, ct)
    kv = torch.matmul(k.to(ct).transpose(-1, -2), v.to(ct))  # [b, h, dk, dv]
    if state is None:
        state = torch.zeros_like(kv)
    new = (state.to(ct) * lam.view(1, h, 1, 1) if lam is not None else state.to(ct)) + kv
    return torch.matmul(q.to(ct), new).to(q.dtype), new


def chunk_state(k, v, *, decay=None, q_heads: int | None = None) -> torch.Tensor:
    """The memory state of a whole chunk, ``sum_s lambda^(n - 1 - s) k_s^T v_s`` (``[b, h, d_k, d_v]``): what a
    chunk hands to the next one (LASP-2's per-rank state). ``q_heads`` repeats GQA kv heads."""
    if q_heads is not None and q_heads != k.shape[1]:
        k, v = k.repeat_interleave(q_heads // k.shape[1], 1), v.repeat_interleave(q_heads // k.shape[1], 1)
    ct = _ct(k)
    n = k.shape[2]
    lam = decay_tensor(decay, k.shape[1], k.device, ct)
    w = _pow(lam, torch.arange(n - 1, -1, -1, device=k.device)).to(ct)  # [h or 1, n]
    return torch.matmul((k.to(ct) * w.unsqueeze(0).unsqueeze(-1)).transpose(-1, -2), v.to(ct))


def lightning_attention(q, k, v, *, decay=None, causal: bool = True, block_size: int = 64,
                        state: torch.Tensor | None = None, return_state: bool = False):
    """Linear attention by Lightning Attention-2's tiling (see the module docstring).

    ``state``: a ``[b, h, d_k, d_v]`` state of the tokens before ``q`` (a previous chunk, another rank's prefix);
    ``return_state``: also return the final state (for ``linear_decode_step`` or the next chunk)."""
    check_int(block_size, "block_size")
    k, v = _expand_kv(q, k, v)
    ct = _ct(q)
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    qf, kf, vf = q.to(ct), k.to(ct), v.to(ct)
    lam = decay_tensor(decay, h, q.device, ct)
    if not causal:
        if lam is not None:
            raise ValueError("decay: only the causal form has a decay (causal=True)")
        kv = torch.matmul(kf.transpose(-1, -2), vf)
        if state is not None:
            kv = kv + state.to(ct)
        out = torch.matmul(qf, kv).to(q.dtype)
        return (out, kv) if return_state else out
    if k.shape[2] != n:
        raise ValueError(f"causal linear attention needs q and k of the same length, got {n} and {k.shape[2]}")
    s = torch.zeros(b, h, dk, dv, dtype=ct, device=q.device) if state is None else state.to(ct)
    outs = []
    for c0 in range(0, n, block_size):
        c1 = min(n, c0 + block_size)
        bl = c1 - c0
        qi, ki, vi = qf[:, :, c0:c1], kf[:, :, c0:c1], vf[:, :, c0:c1]
        a = torch.arange(bl, device=q.device)
        dist = a[:, None] - a[None, :]
        d_intra = (_pow(lam, dist.clamp_min(0)) * (dist >= 0)).to(ct)  # [h or 1, bl, bl]
        intra = torch.matmul(torch.matmul(qi, ki.transpose(-1, -2)) * d_intra.unsqueeze(0), vi)
        q_decay = _pow(lam, a + 1).to(ct).unsqueeze(0).unsqueeze(-1)  # lambda^(a+1): [1, h or 1, bl, 1]
        inter = torch.matmul(qi * q_decay, s)
        outs.append(intra + inter)
        k_decay = _pow(lam, bl - 1 - a).to(ct).unsqueeze(0).unsqueeze(-1)  # lambda^(bl-1-a)
        block_decay = _pow(lam, torch.tensor(bl, device=q.device)).to(ct).view(1, -1, 1, 1)
        s = s * block_decay + torch.matmul((ki * k_decay).transpose(-1, -2), vi)
    out = torch.cat(outs, 2).to(q.dtype) if outs else qf.new_zeros(b, h, 0, dv).to(q.dtype)
    return (out, s) if return_state else out
