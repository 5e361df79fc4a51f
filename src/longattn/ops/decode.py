"""Decode attention: split-K (flash-decoding / Lean Attention) and attention over selected tokens.

A decode step has one query (or a few) per head over a long cache: too little work along the query to keep a
machine busy, so the kv length is cut into ``splits`` contiguous parts, each part gives a partial output and its
log-sum-exp, and the partials are merged exactly (``merge.merge_attention``). On a GPU each part is a thread
block; here the parts are independent torch ops, the arithmetic and the merge are the same.

``gather_attention`` attends to the tokens a decode selector picked, given as indices ``idx [b, hs, m]`` per kv
head (``hs = kv_heads``) or per query head (``hs = q_heads``). It gathers only the selected ``m`` keys/values
(a copy of ``m x dim``, the budget, never of the cache); the pure-torch backend has no indirect-load kernel that
could skip that small copy.

Layout as ``reference.py``: ``q [b, hq, nq, d]``, ``k, v [b, hk, n, d]``; every cached key is visible to every
query (decode over a cache: the new token is already in the cache), ``key_valid [b, n]`` masks padding.
"""

from __future__ import annotations

import math

import torch

from ..checks import check_int
from .core import add_sinks, buffer_capacity, grouped_sinks, masked_attention
from .merge import merge_attention

__all__ = ["split_k_attention", "gather_attention", "gather_rows", "gather_pages", "page_tokens", "split_bounds"]


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    from ..reference import check_qkv

    return check_qkv(q, k, v)


def gather_rows(x: torch.Tensor, idx: torch.Tensor, kvh: torch.Tensor) -> torch.Tensor:
    """``x [b, hk, n, d]`` at ``idx [b, hs, m]``, row ``h`` of ``idx`` reading kv head ``kvh[h]``:
    ``[b, hs, m, d]``. One ``index_select`` over the flattened cache when it is contiguous or the head of a
    contiguous buffer (the cache layer's room to grow); per row otherwise (a transposed cache would be copied
    whole by the flattening)."""
    b, hk, n, d = x.shape
    hs, m = idx.shape[1], idx.shape[2]
    cap = buffer_capacity(x)
    if cap:  # contiguous, or the head of a contiguous [b, hk, cap, d] buffer (a cache with room to grow)
        full = x.as_strided((b, hk, cap, d), x.stride()) if cap != n else x
        rows = (torch.arange(b, device=idx.device).view(b, 1, 1) * hk + kvh.view(1, hs, 1)) * cap
        return full.reshape(b * hk * cap, d).index_select(0, (rows + idx).reshape(-1)).view(b, hs, m, d)
    heads = kvh.tolist()
    return torch.stack([torch.stack([x[bi, heads[h]].index_select(0, idx[bi, h]) for h in range(hs)])
                        for bi in range(b)])


def gather_pages(x: torch.Tensor, pages: torch.Tensor, page_size: int, kvh: torch.Tensor) -> torch.Tensor | None:
    """``x [b, hk, n, d]`` at whole pages ``pages [b, hs, kp]`` (page ``p``: tokens ``p * page_size`` onwards), row
    ``h`` reading kv head ``kvh[h]``: ``[b, hs, kp * page_size, d]``, one ``index_select`` of ``kp`` rows of
    ``page_size * d`` per row of ``pages`` (a token gather copies the same bytes through ``page_size`` times more
    indices). None when ``x``'s buffer is not a whole number of pages (``gather_rows`` then). Rows past the
    cache's ``n`` tokens (the newest page's tail) hold whatever the buffer holds there: mask them."""
    b, hk, n, d = x.shape
    hs, kp = pages.shape[1], pages.shape[2]
    cap = buffer_capacity(x)
    if not cap or cap % page_size:
        return None
    full = x.as_strided((b, hk, cap, d), x.stride()) if cap != n else x
    per = cap // page_size
    rows = (torch.arange(b, device=pages.device).view(b, 1, 1) * hk + kvh.view(1, hs, 1)) * per
    flat = full.reshape(b * hk * per, page_size * d)
    return flat.index_select(0, (rows + pages).reshape(-1)).view(b, hs, kp * page_size, d)


def page_tokens(pages: torch.Tensor, page_size: int) -> torch.Tensor:
    """Page ids ``[..., kp]`` -> the token indices of those whole pages ``[..., kp * page_size]``."""
    return (pages.unsqueeze(-1) * page_size + torch.arange(page_size, device=pages.device)).flatten(-2)


def _gather_by_pages(k, v, pages, page_size, kvh, valid, need_tokens: bool):
    """``gather_attention``'s page path: ``(kg, vg, token idx or None, valid or None)``. When every row ends with
    the newest, partial page (the selectors that always attend it), its tail past the cache's end is cut off the
    copies: no mask at all. Otherwise the tail is masked (``valid``) and zeroed in the copies (it is buffer room,
    whose bytes may be anything)."""
    check_int(page_size, "page_size")
    if valid is not None:
        raise ValueError("valid: not with page_size (whole pages are attended; the cache's end is masked)")
    n = k.shape[2]
    tail = -n % page_size

    def tokens():
        return page_tokens(pages, page_size)

    kg, vg = gather_pages(k, pages, page_size, kvh), gather_pages(v, pages, page_size, kvh)
    if kg is None or vg is None:  # a buffer of no whole pages: token by token
        idx = tokens()
        if tail:
            valid = idx < n
            idx = torch.where(valid, idx, torch.zeros_like(idx))
        return gather_rows(k, idx, kvh), gather_rows(v, idx, kvh), idx, valid
    if not tail:
        return kg, vg, tokens() if need_tokens else None, None
    if bool((pages[..., -1] == n // page_size).all()):  # every row ends with the newest page: cut its tail
        return kg[:, :, :-tail], vg[:, :, :-tail], tokens()[..., :-tail] if need_tokens else None, None
    idx = tokens()
    valid = idx < n
    kg.masked_fill_(~valid[..., None], 0.0)
    vg.masked_fill_(~valid[..., None], 0.0)
    return kg, vg, torch.where(valid, idx, torch.zeros_like(idx)), valid


def split_bounds(n: int, splits: int) -> list[tuple[int, int]]:
    """``splits`` contiguous ranges covering ``[0, n)``: equal sizes ``ceil(n / splits)``, the last one ragged
    (fewer ranges when ``n < splits``)."""
    check_int(splits, "splits")
    size = max(1, math.ceil(n / splits))
    return [(s, min(s + size, n)) for s in range(0, n, size)] or [(0, 0)]


def split_k_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    splits: int = 4,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over all of ``k, v`` computed in ``splits`` kv parts merged by lse (``softcap`` and
    ``sinks [hq]`` as in ``reference.attention``).

    Returns ``(out [b, hq, nq, d] in q's dtype, lse [b, hq, nq] float32)``; rows with no valid key: 0, -inf."""
    b, hq, hk, nq, n, d = _check(q, k, v)
    if key_valid is not None and tuple(key_valid.shape) != (b, n):
        raise ValueError(f"key_valid: expected shape {(b, n)}, got {tuple(key_valid.shape)}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    g = hq // hk
    qg = q.reshape(b, hk, g * nq, d)
    outs, lses = [], []
    for s, e in split_bounds(n, splits):
        allowed = None if key_valid is None else key_valid[:, None, None, s:e]
        o, lse = masked_attention(qg, k[:, :, s:e], v[:, :, s:e], allowed, scale, softcap)
        outs.append(o)
        lses.append(lse)
    out, lse = merge_attention(outs, lses)
    out, lse = add_sinks(out, lse, grouped_sinks(sinks, hk, g, nq))
    return out.reshape(b, hq, nq, d).to(q.dtype), lse.reshape(b, hq, nq).float()


def gather_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
    splits: int = 1,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    need_lse: bool = True,
    page_size: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of ``q`` over the keys at ``idx [b, hs, m]`` (``hs`` = kv heads: shared by the query heads of
    the group; ``hs`` = q heads: one set per query head). ``valid [b, hs, m]`` masks unused slots (indices there
    must still be in range); ``key_valid [b, n]`` masks padded keys. Indices must be distinct within a row (a
    repeated key would count twice). ``splits`` > 1 cuts the selected set into parts merged by lse.
    ``need_lse=False`` (a decode step that only needs the output): without softcap, sinks or splits the gathered
    rows go through SDPA's fused kernel (the group's queries as one [g, d] block per kv head: no repeated keys)
    and the lse comes back None. ``page_size > 0``: ``idx [b, hs, kp]`` holds page ids (page ``p``: tokens ``p *
    page_size`` to ``(p + 1) * page_size - 1``, the newest page's tail past the cache's end left out; no ``valid``),
    gathered page by page (``gather_pages``) when the cache's buffer is a whole number of pages.

    Returns ``(out [b, hq, nq, d], lse [b, hq, nq] float32 or None)``."""
    b, hq, hk, nq, n, d = _check(q, k, v)
    if idx.dim() != 3 or idx.shape[0] != b or idx.shape[1] not in (hk, hq):
        raise ValueError(f"idx: expected [batch={b}, heads={hk} or {hq}, m], got {tuple(idx.shape)}")
    if valid is not None and valid.shape != idx.shape:
        raise ValueError(f"valid: expected the shape of idx {tuple(idx.shape)}, got {tuple(valid.shape)}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    hs = idx.shape[1]
    idx = idx.long()
    g = hq // hk
    kvh = torch.arange(hs, device=idx.device) // (1 if hs == hk else g)  # the kv head each row of idx reads
    qs = q.reshape(b, hk, g * nq, d) if hs == hk else q
    if page_size:
        kg, vg, idx, valid = _gather_by_pages(k, v, idx, page_size, kvh, valid, need_tokens=key_valid is not None)
    else:
        kg, vg = gather_rows(k, idx, kvh), gather_rows(v, idx, kvh)  # [b, hs, m, d]
    m = kg.shape[2]
    allowed = None if valid is None else valid[:, :, None, :]
    if key_valid is not None:
        kv_ok = key_valid.gather(1, idx.reshape(b, hs * m)).view(b, hs, 1, m)
        allowed = kv_ok if allowed is None else allowed & kv_ok
    if not need_lse and softcap is None and sinks is None and splits == 1:
        ct = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = torch.nn.functional.scaled_dot_product_attention(qs.to(ct), kg.to(ct), vg.to(ct), attn_mask=allowed,
                                                               scale=scale)
        if allowed is not None:  # a row with no allowed key: 0, as masked_attention gives (SDPA: NaN)
            out = out.nan_to_num(0.0)
        return out.reshape(b, hq, nq, d).to(q.dtype), None
    outs, lses = [], []
    for s, e in split_bounds(m, splits):
        a = None if allowed is None else allowed[..., s:e]
        o, lse = masked_attention(qs, kg[:, :, s:e], vg[:, :, s:e], a, scale, softcap)
        outs.append(o)
        lses.append(lse)
    out, lse = merge_attention(outs, lses)
    sink = None
    if sinks is not None:  # rows are (kv head, group member, query) or (query head, query)
        sink = grouped_sinks(sinks, hk, g, nq) if hs == hk else sinks.float().view(1, hq, 1)
    out, lse = add_sinks(out, lse, sink)
    return out.reshape(b, hq, nq, d).to(q.dtype), lse.reshape(b, hq, nq).float()
