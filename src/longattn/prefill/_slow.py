"""Helpers of the slow, loop-by-loop references of the prefill patterns (``reference_mask``): plain Python over
token and block indices, so that a reference shares no vectorised code with the pattern it checks."""

from __future__ import annotations

import torch

__all__: list[str] = []


def first(kv, bi: int) -> int:
    """Index of row ``bi``'s first real token."""
    return 0 if kv is None else int(kv[bi].to(torch.int8).argmax())


def valid(kv, bi: int, j: int) -> bool:
    return kv is None or bool(kv[bi, j])


def blocks_to_tokens(sel, nq: int, nk: int, off: int, bs: int):
    """``[b, h, nqb, nkb]`` block selection -> ``[b, h, nq, nk]`` token mask (blocks x causal)."""
    b, h = sel.shape[:2]
    m = torch.zeros(b, h, nq, nk, dtype=torch.bool)
    for i in range(nq):
        for j in range(i + off + 1):
            m[:, :, i, j] = sel[:, :, i // bs, j // bs]
    return m


def topk_set(scores, k: int) -> set:
    """Indices of the ``k`` largest finite scores (a Python sort; with random inputs there are no ties)."""
    order = sorted((s, j) for j, s in enumerate(scores) if s != float("-inf"))
    return {j for _, j in order[::-1][:k]}


def pooled(x, n_blocks: int, bs: int, ok=None) -> list:
    """Mean of ``x [n, d]`` over each block of ``bs`` rows (rows with ``ok[t]`` False excluded; None if empty)."""
    out = []
    for c in range(n_blocks):
        rows = [t for t in range(c * bs, min((c + 1) * bs, x.shape[0])) if ok is None or ok[t]]
        out.append(x[rows].double().mean(0) if rows else None)
    return out


def forced_blocks(sink: int, bi: int, kv, nqb: int, nkb: int, off: int, nq: int, bs: int) -> set:
    """The blocks every estimated pattern keeps: the sink blocks (from the row's first real token) and each
    query block's diagonal blocks, causal."""
    f = first(kv, bi)
    sel = set()
    for i in range(nqb):
        q_lo, q_hi = i * bs + off, min((i + 1) * bs, nq) - 1 + off
        for j in range(nkb):
            if j > q_hi // bs:
                continue
            if sink > 0 and f // bs <= j <= (f + sink - 1) // bs:
                sel.add((i, j))
            if q_lo // bs <= j:
                sel.add((i, j))
    return sel


def estimated_blocks(p, q, k, kv, row_blocks):
    """Reference of the block-estimating patterns: per (row, query head) the forced blocks (sinks + diagonal)
    and ``row_blocks(bi, h, qh, kh, ok, off) -> {(q block, kv block)}``, as token pairs (blocks x causal)."""
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    g = hq // k.shape[1]
    bs = p.block_size
    off = nk - nq
    nqb, nkb = -(-nq // bs), -(-nk // bs)
    sel = torch.zeros(b, hq, nqb, nkb, dtype=torch.bool)
    for bi in range(b):
        ok = None if kv is None else kv[bi].tolist()
        for h in range(hq):
            chosen = forced_blocks(p.sink, bi, kv, nqb, nkb, off, nq, bs)
            chosen |= row_blocks(bi, h, q[bi, h], k[bi, h // g], ok, off)
            for i, j in chosen:
                sel[bi, h, i, j] = True
    return blocks_to_tokens(sel, nq, nk, off, bs)


def topk_rows(est, k: int, nq: int, off: int, bs: int) -> set:
    """Per query block ``i`` the ``k`` best causally reachable kv blocks of ``est[i][j]``."""
    chosen = set()
    for i, row in enumerate(est):
        last = (min((i + 1) * bs, nq) - 1 + off) // bs
        vals = [row[j] if j <= last else float("-inf") for j in range(len(row))]
        chosen |= {(i, j) for j in topk_set(vals, k)}
    return chosen
