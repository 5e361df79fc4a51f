"""Helpers of the decode selectors' slow references (``reference_select``): plain Python over pages and tokens,
sharing no vectorised code with the selectors they check."""

from __future__ import annotations

import math

__all__: list[str] = []


def first_real(kv, bi: int) -> int:
    """Index of row ``bi``'s first real token."""
    return 0 if kv is None else next((j for j in range(kv.shape[1]) if bool(kv[bi, j])), 0)


def real(kv, bi: int, j: int) -> bool:
    return kv is None or bool(kv[bi, j])


def top(scores: list[float], k: int, forced=()) -> list[int]:
    """The forced entries, then the best others, ``k`` in all (a Python sort)."""
    chosen = list(dict.fromkeys(forced))
    for i in sorted(range(len(scores)), key=lambda i: -scores[i]):
        if len(chosen) >= k:
            break
        if i not in chosen:
            chosen.append(i)
    return chosen[:k] if len(chosen) > k else chosen


def tokens_of(units: list[int], size: int, n: int) -> set[int]:
    return {t for u in units for t in range(u * size, min(n, (u + 1) * size))}


def page_upper_bounds(step, size: int) -> list:
    """Quest's bound per (row, kv head, page): max over the group's query heads of sum_d max(q_d max_d, q_d min_d);
    -inf for a page holding only padding. ``out[b][h][p]``."""
    b, hq = step.q.shape[:2]
    hk, n = step.k.shape[1], step.n
    g = hq // hk
    out = []
    for bi in range(b):
        rows = []
        for h in range(hk):
            pages = []
            for p in range(math.ceil(n / size)):
                seg = step.k[bi, h, p * size : min(n, (p + 1) * size)].double()
                if not any(real(step.key_valid, bi, t) for t in range(p * size, min(n, (p + 1) * size))):
                    pages.append(-math.inf)
                    continue
                mx, mn = seg.amax(0), seg.amin(0)
                pages.append(max(float((step.q[bi, h * g + j, 0].double() * mx).maximum(
                    step.q[bi, h * g + j, 0].double() * mn).sum()) for j in range(g)))
            rows.append(pages)
        out.append(rows)
    return out


def block_means(step, bi: int, h: int, size: int) -> list:
    """Mean key of each block of ``size`` tokens of (row, kv head), None for a padding-only block."""
    n = step.n
    out = []
    for p in range(math.ceil(n / size)):
        seg = range(p * size, min(n, (p + 1) * size))
        out.append(step.k[bi, h, list(seg)].double().mean(0) if any(real(step.key_valid, bi, t) for t in seg) else None)
    return out
