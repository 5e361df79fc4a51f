"""Sequence layouts over ranks and the block kernels shared by the sequence-parallel methods.

A rank holds its tokens as one or more contiguous *ranges* of global positions: one range in the contiguous
layout, two in the zigzag layout (the sequence cut into ``2P`` chunks, rank ``r`` holding chunks ``r`` and
``2P - 1 - r``, which balances causal work). Attention between a query range and a key range is one of: empty
(every key after every query: skipped), full (every key at or before every query: no mask), diagonal (the same
range: the causal triangle), or partial (anything else: an explicit mask). The forward kernel returns the
partial output and its log-sum-exp (merged later by ``ops.merge``); the backward recomputes the probabilities
from the final log-sum-exp (FlashAttention's backward). ``kernel="eager"`` is float32 matmul-softmax-matmul
(``ops.core.masked_attention``); ``kernel="flash"`` uses PyTorch's CPU flash-attention op (which returns the
log-sum-exp) for full and diagonal blocks and eager otherwise; with a global ``BlockLayout`` (``SparseBlocks``)
each pair computes only that layout's blocks through ``block_sparse_attention`` (gather backend, which returns
the log-sum-exp; FlexAttention on CPU does not), so any prefill pattern's layout runs sequence-parallel.

Layout of tensors: ``[batch, heads, local_len, dim]``; GQA (fewer kv heads) is kept unrepeated.
"""

from __future__ import annotations

import torch

from ..ops.core import masked_attention
from ..ops.merge import merge_attention

__all__ = ["LAYOUTS", "KERNELS", "SparseBlocks", "rank_ranges", "shard", "unshard", "split_lengths", "positions", "pair_kind",
           "attend_ranges", "backward_ranges", "pair_work"]

LAYOUTS = ("contiguous", "zigzag")
KERNELS = ("eager", "flash")


def split_lengths(n: int, parts: int) -> list[int]:
    """``n`` tokens into ``parts`` nearly equal parts (the first ones one longer)."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def rank_ranges(lengths: list[int], layout: str) -> list[list[tuple[int, int]]]:
    """Per rank, the global position ranges it holds, from every rank's local length."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    p = len(lengths)
    if layout == "contiguous":
        out, off = [], 0
        for n in lengths:
            out.append([(off, off + n)] if n else [])
            off += n
        return out
    total = sum(lengths)
    sizes = split_lengths(total, 2 * p)
    starts = [sum(sizes[:i]) for i in range(2 * p)]
    out = []
    for r in range(p):
        a, b = r, 2 * p - 1 - r
        if lengths[r] != sizes[a] + sizes[b]:
            raise ValueError(f"layout=zigzag: rank {r} holds {lengths[r]} tokens; the zigzag layout of {total} "
                             f"tokens over {p} ranks gives it {sizes[a] + sizes[b]} (chunks {a} and {b})")
        out.append([(starts[a], starts[a] + sizes[a]), (starts[b], starts[b] + sizes[b])])
    return out


def shard(x: torch.Tensor, layout: str, world: int, rank: int, dim: int = 2,
          lengths: list[int] | None = None) -> torch.Tensor:
    """This rank's part of a full sequence ``x`` (along ``dim``). Contiguous: ``lengths`` per rank (default
    nearly equal); zigzag: the chunk pair."""
    n = x.shape[dim]
    if layout == "zigzag":
        if lengths is not None:
            raise ValueError("lengths: the zigzag layout sets every rank's length itself")
        sizes = split_lengths(n, 2 * world)
        lengths = [sizes[r] + sizes[2 * world - 1 - r] for r in range(world)]
    lengths = lengths or split_lengths(n, world)
    if sum(lengths) != n or len(lengths) != world:
        raise ValueError(f"lengths: {lengths} must be {world} numbers summing to the sequence length {n}")
    ranges = rank_ranges(lengths, layout)[rank]
    return torch.cat([x.narrow(dim, s, e - s) for s, e in ranges], dim) if ranges else x.narrow(dim, 0, 0)


def unshard(parts: list[torch.Tensor], layout: str, dim: int = 2) -> torch.Tensor:
    """The full sequence from every rank's part (inverse of ``shard``)."""
    lengths = [p.shape[dim] for p in parts]
    ranges = rank_ranges(lengths, layout)
    pieces = []
    for part, rr in zip(parts, ranges):
        off = 0
        for s, e in rr:
            pieces.append((s, part.narrow(dim, off, e - s)))
            off += e - s
    return torch.cat([t for _, t in sorted(pieces, key=lambda x: x[0])], dim)


def positions(ranges: list[tuple[int, int]], device=None) -> torch.Tensor:
    if not ranges:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat([torch.arange(s, e, device=device) for s, e in ranges])


def pair_kind(qr: tuple[int, int], kr: tuple[int, int], causal: bool) -> str:
    """``empty``, ``full``, ``diag`` or ``mask`` for query range ``qr`` attending to key range ``kr``."""
    if qr[0] >= qr[1] or kr[0] >= kr[1]:
        return "empty"
    if not causal or kr[1] - 1 <= qr[0]:
        return "full"
    if kr[0] > qr[1] - 1:
        return "empty"
    if qr == kr:
        return "diag"
    return "mask"


def pair_work(qranges, kranges, causal: bool) -> int:
    """Query-key pairs a rank computes for these ranges (empty pairs skipped): the work it does."""
    total = 0
    for qr in qranges:
        for kr in kranges:
            kind = pair_kind(qr, kr, causal)
            nq, nk = qr[1] - qr[0], kr[1] - kr[0]
            if kind == "full":
                total += nq * nk
            elif kind == "diag":
                total += nq * (nq + 1) // 2
            elif kind == "mask":
                qp = torch.arange(*qr)[:, None]
                kp = torch.arange(*kr)[None, :]
                total += int((kp <= qp).sum())
    return total


def _offsets(ranges):
    out, off = [], 0
    for s, e in ranges:
        out.append(off)
        off += e - s
    return out


def _mask(qr, kr, kind, device):
    if kind == "full":
        return None
    qp = torch.arange(*qr, device=device)[:, None]
    kp = torch.arange(*kr, device=device)[None, :]
    return kp <= qp


def _flash(q5, k5, v5, causal: bool, scale: float):
    """CPU flash attention with lse on ``q5 [b, hk, g, n, d]`` (kv repeated to every query head)."""
    b, hk, g, n, d = q5.shape
    q = q5.reshape(b, hk * g, n, d)
    k = k5.expand(-1, -1, g, -1, -1).reshape(b, hk * g, -1, d)
    v = v5.expand(-1, -1, g, -1, -1).reshape(b, hk * g, -1, d)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)[:2]
    return out.float().view(b, hk, g, n, d), lse.float().view(b, hk, g, n)


class SparseBlocks:
    """A global ``BlockLayout`` (the whole sequence, no token rule) cut into the (query range, key range)
    pairs a rank computes: the ``sparse`` block kernel (``block_sparse_attention``, gather backend, with lse)."""

    def __init__(self, layout, n: int) -> None:
        from ..layout import BlockLayout

        if not isinstance(layout, BlockLayout):
            raise ValueError(f"layout must be a BlockLayout over the whole sequence, got {type(layout).__name__}")
        if layout.q_len != n or layout.kv_len != n:
            raise ValueError(f"layout is for {layout.q_len} x {layout.kv_len} tokens; the sequence has {n}")
        if layout.rule is not None:
            raise ValueError("layout: a token rule is not supported by the sequence-parallel sparse kernel")
        self.bs = layout.block_size
        self.mask = layout.to_block_mask()  # [b or 1, h or 1, nqb, nkb]

    def check_ranges(self, ranges, n: int) -> None:
        for rr in ranges:
            for s, e in rr:
                if s % self.bs or (e % self.bs and e != n):
                    raise ValueError(f"layout: block_size {self.bs} must divide every rank's range boundaries; "
                                     f"got range [{s}, {e})")

    def sub(self, qr, kr, nq_total: int):
        from ..layout import BlockLayout

        bs = self.bs
        m = self.mask[..., qr[0] // bs : -(-qr[1] // bs), kr[0] // bs : -(-kr[1] // bs)]
        return BlockLayout.from_block_mask(m, block_size=bs, q_len=qr[1] - qr[0], kv_len=kr[1] - kr[0])


def _pair(qs, ks, vs, qr, kr, kind, scale, kernel, sparse):
    """One (query range, key range) pair: ``(out, lse)`` on ``q5 [b, hk, g, n, d]`` / ``k5 [b, hk, 1, m, d]``."""
    if sparse is not None:
        from ..ops.dispatch import block_sparse_attention

        b, hk, g, n, d = qs.shape
        o, lz = block_sparse_attention(qs.reshape(b, hk * g, n, d), ks[:, :, 0], vs[:, :, 0], sparse.sub(qr, kr, n),
                                       causal=kind == "diag", scale=scale, backend="gather", return_lse=True)
        return o.float().view(b, hk, g, n, d), lz.float().view(b, hk, g, n)
    if kernel == "flash" and kind in ("full", "diag") and qs.dtype != torch.float64:
        return _flash(qs, ks, vs, kind == "diag", scale)
    return masked_attention(qs, ks, vs, _mask(qr, kr, kind, qs.device), scale)


def attend_ranges(q, k, v, qranges, kranges, *, causal: bool, scale: float, kernel: str = "eager",
                  sparse: SparseBlocks | None = None):
    """Attention of the local queries (``q [b, hq, nq, d]`` holding ``qranges``) over keys ``k, v [b, hk, nk, d]``
    holding ``kranges``; with ``sparse`` only the blocks of its global layout. Returns ``(out [b, hq, nq, d]
    float32, lse [b, hq, nq] float32)``; rows that see no key get 0 and ``-inf``."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    b, hq, nq, d = q.shape
    hk = k.shape[1]
    g = hq // hk
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    q5 = q.view(b, hk, g, nq, d)
    k5, v5 = k.unsqueeze(2), v.unsqueeze(2)
    out = torch.zeros(b, hk, g, nq, d, dtype=ct, device=q.device)
    lse = torch.full((b, hk, g, nq), float("-inf"), dtype=ct, device=q.device)
    qoff, koff = _offsets(qranges), _offsets(kranges)
    for qr, qo in zip(qranges, qoff):
        nqs = qr[1] - qr[0]
        qs = q5[:, :, :, qo : qo + nqs]
        outs, lses = [], []
        for kr, ko in zip(kranges, koff):
            kind = pair_kind(qr, kr, causal)
            if kind == "empty":
                continue
            nks = kr[1] - kr[0]
            ks, vs = k5[:, :, :, ko : ko + nks], v5[:, :, :, ko : ko + nks]
            o, lz = _pair(qs, ks, vs, qr, kr, kind, scale, kernel, sparse)
            outs.append(o)
            lses.append(lz)
        if outs:
            o, lz = merge_attention(outs, lses)
            out[:, :, :, qo : qo + nqs] = o
            lse[:, :, :, qo : qo + nqs] = lz
    return out.view(b, hq, nq, d), lse.view(b, hq, nq)


def backward_ranges(q, k, v, out, lse, dout, qranges, kranges, *, causal: bool, scale: float,
                    sparse: SparseBlocks | None = None):
    """Gradients of the attention through this (query ranges, key ranges) part, given the *final* output and
    log-sum-exp of the queries (FlashAttention's recomputation). Returns ``(dq, dk, dv)`` in float32 (or
    float64)."""
    b, hq, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    g = hq // hk
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    q5 = q.to(ct).view(b, hk, g, nq, d)
    k4, v4 = k.to(ct), v.to(ct)
    o5, do5 = out.to(ct).view(b, hk, g, nq, d), dout.to(ct).view(b, hk, g, nq, d)
    l5 = lse.to(ct).view(b, hk, g, nq)
    dq = torch.zeros_like(q5)
    dk = torch.zeros(b, hk, nk, d, dtype=ct, device=q.device)
    dv = torch.zeros_like(dk)
    delta = (o5 * do5).sum(-1)  # [b, hk, g, nq]
    qoff, koff = _offsets(qranges), _offsets(kranges)
    for qr, qo in zip(qranges, qoff):
        nqs = qr[1] - qr[0]
        qs, dos = q5[:, :, :, qo : qo + nqs], do5[:, :, :, qo : qo + nqs]
        ls, ds_ = l5[:, :, :, qo : qo + nqs], delta[:, :, :, qo : qo + nqs]
        safe = torch.where(torch.isinf(ls), torch.zeros_like(ls), ls)
        for kr, ko in zip(kranges, koff):
            kind = pair_kind(qr, kr, causal)
            if kind == "empty":
                continue
            nks = kr[1] - kr[0]
            ks, vs = k4[:, :, None, ko : ko + nks], v4[:, :, None, ko : ko + nks]
            s = torch.matmul(qs, ks.transpose(-1, -2)) * scale
            p = torch.exp(s - safe.unsqueeze(-1))
            m = _mask(qr, kr, kind, q.device)
            if sparse is not None:  # the layout's pairs (causal inside the diagonal pair), per head
                sm = sparse.sub(qr, kr, nqs).to_dense_mask(causal=kind == "diag")  # [b or 1, h or 1, nq, nk]
                sm = sm.view(sm.shape[0], -1, 1, nqs, nks) if sm.shape[1] == 1 else sm.view(sm.shape[0], hk, g, nqs, nks)
                m = sm if m is None else (m & sm)
            if m is not None:
                p = p.masked_fill(~m, 0.0)
            p = p.masked_fill(torch.isinf(ls).unsqueeze(-1), 0.0)
            dv[:, :, ko : ko + nks] += torch.matmul(p.transpose(-1, -2), dos).sum(2)
            dp = torch.matmul(dos, vs.transpose(-1, -2))
            dsc = p * (dp - ds_.unsqueeze(-1))
            dq[:, :, :, qo : qo + nqs] += torch.matmul(dsc, ks) * scale
            dk[:, :, ko : ko + nks] += torch.matmul(dsc.transpose(-1, -2), qs).sum(2) * scale
    return dq.view(b, hq, nq, d), dk, dv
