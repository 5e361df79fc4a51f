"""Block-sparse attention over a ``BlockLayout``.

Backends (``backend=``):
- ``flex``: torch FlexAttention under ``torch.compile``; the ``BlockMask`` is built with
  ``BlockMask.from_kv_blocks`` from the layout's index tensors (never ``create_block_mask`` over N x N),
  blocks entirely inside the causal region are passed as *full* blocks (no mask evaluation).
  On CPU, FlexAttention compiles for inference only and cannot return the log-sum-exp.
- ``gather``: pure torch; for a chunk of query blocks, gathers the selected key blocks and computes the
  masked softmax in float32. Works everywhere, with autograd, returns lse.
- ``dense``: SDPA with the layout expanded to a dense ``[b, h, N, N]`` mask; for checking only.

``backend="auto"`` takes ``flex`` when ``can_run`` allows it and the query is long enough to amortise a
compilation (``FLEX_MIN_Q``), ``gather`` otherwise. An explicit backend that cannot run raises ValueError with
the reason.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..layout import BlockLayout
from ..reference import check_qkv
from .core import masked_attention

__all__ = ["BACKENDS", "FLEX_MIN_Q", "block_sparse_attention", "can_run", "choose_backend"]

BACKENDS = ("flex", "gather", "dense")
FLEX_MIN_Q = 1024
# Compiled with dynamic shapes: a new sequence length reuses the graph (a static compile costs seconds per new
# length, i.e. per bench sample; ``dynamic=None`` hits an inductor C++ codegen error on CPU in torch 2.13).
# Each distinct (dtype, mask kind, ...) is still one compiled graph; a bench sweeps dozens of them, a per-head
# mixture of patterns (one call per pattern and head count) a few hundred: past the limit dynamo would fall
# back to running FlexAttention eagerly, which is very slow.
_DYNAMO_CACHE_LIMIT = 512
_flex_fns: dict[bool, Callable] = {}
# call kinds whose dynamic-shape compilation failed (inductor bug); they use a static compile from then on
_STATIC_ONLY: set[tuple] = set()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _flex(dynamic: bool = True):
    if dynamic not in _flex_fns:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, _DYNAMO_CACHE_LIMIT)
        lim = getattr(torch._dynamo.config, "accumulated_cache_size_limit", None)
        if lim is not None:
            torch._dynamo.config.accumulated_cache_size_limit = max(lim, 4 * _DYNAMO_CACHE_LIMIT)
        _flex_fns[dynamic] = torch.compile(flex_attention, dynamic=dynamic)
    return _flex_fns[dynamic]


def _run_flex(kind: tuple, *args, **kwargs):
    """Run the compiled FlexAttention with dynamic shapes (one graph for every sequence length); a call kind whose
    dynamic compilation fails or whose dynamic kernel trips its own bounds check (torch 2.13's CPU inductor has
    bugs for some masks) is compiled statically, per shape, from then on (a compilation per new length)."""
    if kind not in _STATIC_ONLY:
        try:
            return _flex(True)(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - inductor raises several exception types
            # compile errors, and the bounds checks of a miscompiled dynamic kernel (RuntimeError "index out
            # of bounds"); anything else is a real error
            name = type(e).__name__
            if not ("Compile" in name or "Inductor" in name or "BackendCompilerFailed" in name
                    or (isinstance(e, RuntimeError) and "out of bounds" in str(e))):
                raise
            _STATIC_ONLY.add(kind)
            warnings.warn(f"longattn: FlexAttention dynamic-shape compilation failed for {kind}; compiling per "
                          f"shape instead ({type(e).__name__})", RuntimeWarning, stacklevel=3)
    return _flex(False)(*args, **kwargs)


def can_run(
    backend: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    return_lse: bool = False,
) -> tuple[bool, str]:
    """Whether ``backend`` can compute this call, and if not, why."""
    if backend not in BACKENDS:
        return False, f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}"
    if backend == "gather":
        return True, ""
    if backend == "dense":
        if return_lse:
            return False, "dense (SDPA) backend does not return the log-sum-exp"
        return True, ""
    # flex
    try:
        from torch.nn.attention.flex_attention import BlockMask  # noqa: F401
    except Exception as e:  # pragma: no cover - old torch
        return False, f"FlexAttention unavailable in this torch ({e})"
    on_cpu = q.device.type == "cpu"
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if on_cpu and needs_grad:
        return False, "FlexAttention compiled on CPU supports inference only (run under torch.no_grad())"
    if on_cpu and return_lse:
        return False, "FlexAttention compiled on CPU cannot return the log-sum-exp"
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False, f"FlexAttention needs float32/bfloat16/float16, got {q.dtype}"
    if q.shape[-1] < 16 or q.shape[-1] & (q.shape[-1] - 1):
        return False, f"FlexAttention needs a power-of-two head dim >= 16, got {q.shape[-1]}"
    return True, ""


def choose_backend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, *, return_lse: bool = False
) -> tuple[str, str]:
    """Automatic choice: ``(backend, reason)``."""
    ok, why = can_run("flex", q, k, v, layout, return_lse=return_lse)
    if ok and q.shape[2] >= FLEX_MIN_Q:
        return "flex", "flex can run"
    if ok:
        return "gather", f"q_len {q.shape[2]} < {FLEX_MIN_Q}: a compilation would cost more than it saves"
    return "gather", why


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    causal: bool = True,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    window: int | None = None,
    backend: str = "auto",
    return_lse: bool = False,
):
    """Attention of ``q [b, hq, nq, d]`` over ``k, v [b, hkv, nk, d]`` restricted to ``layout``'s blocks.

    ``key_valid [b, nk]`` bool masks padded keys; ``window`` is a sliding window (token level). Returns the
    output ``[b, hq, nq, d]`` (and the lse ``[b, hq, nq]`` float32 with ``return_lse=True``).
    """
    b, hq, hk, nq, nk, d = check_qkv(q, k, v)
    if not isinstance(layout, BlockLayout):
        raise ValueError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    if layout.q_len != nq or layout.kv_len != nk:
        raise ValueError(f"layout is for q_len={layout.q_len}, kv_len={layout.kv_len}; got q_len={nq}, kv_len={nk}")
    if layout.batch not in (1, b) or layout.heads not in (1, hq):
        raise ValueError(f"layout batch/heads {layout.batch}/{layout.heads} do not broadcast to {b}/{hq}")
    if key_valid is not None and tuple(key_valid.shape) != (b, nk):
        raise ValueError(f"key_valid must be [batch, kv_len] = [{b}, {nk}], got {tuple(key_valid.shape)}")
    if causal and nq > nk:
        raise ValueError(f"causal attention needs q_len <= kv_len, got {nq} > {nk}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if backend == "auto":
        backend, _ = choose_backend(q, k, v, layout, return_lse=return_lse)
    else:
        ok, why = can_run(backend, q, k, v, layout, return_lse=return_lse)
        if not ok:
            raise ValueError(f"backend={backend!r} cannot run here: {why}")
    if layout.batch != b or layout.heads != hq:
        layout = BlockLayout(
            layout.kv_indices.expand(b, hq, *layout.kv_indices.shape[2:]),
            layout.kv_counts.expand(b, hq, layout.kv_counts.shape[2]),
            layout.block_size, nq, nk, layout.rule, layout.full,
        )
    if backend == "gather":
        out, lse = _gather(q, k, v, layout, causal, scale, key_valid, window, need_lse=return_lse)
        return (out, lse) if return_lse else out
    if backend == "dense":
        return _dense(q, k, v, layout, causal, scale, key_valid, window)
    return _flex_attention(q, k, v, layout, causal, scale, key_valid, window)


# ---------------------------------------------------------------------------------------------------------
def _gather(q, k, v, layout: BlockLayout, causal, scale, key_valid, window, need_lse=True):
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
    lse = torch.empty(b, hq, nqb * bs, dtype=ct, device=dev) if need_lse else None
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
        if need_lse:
            o, l_ = masked_attention(qp[:, :, c0:c1], kg, vg, allowed, scale)
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
    return out[:, :, :nq].to(q.dtype), (lse[:, :, :nq].float() if need_lse else None)


def _dense(q, k, v, layout: BlockLayout, causal, scale, key_valid, window):
    m = layout.to_dense_mask(causal=causal, window=window)
    if key_valid is not None:
        m = m & key_valid.to(torch.bool)[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return torch.where(m.any(-1, keepdim=True), out, torch.zeros_like(out))


def _flex_attention(q, k, v, layout: BlockLayout, causal, scale, key_valid, window):
    from torch.nn.attention.flex_attention import BlockMask

    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    bs = layout.block_size
    nqb, nkb = layout.num_q_blocks, layout.num_kv_blocks
    dev = q.device
    off = nk - nq
    # which (q block, kv block) pairs need the token-level mask; the others are "full" blocks
    q_lo = torch.arange(nqb, device=dev) * bs + off  # smallest query position in the block
    q_hi = torch.clamp(torch.arange(1, nqb + 1, device=dev) * bs, max=nq) - 1 + off
    k_lo = torch.arange(nkb, device=dev) * bs
    k_hi = torch.clamp(k_lo + bs, max=nk) - 1
    partial = torch.zeros(nqb, nkb, dtype=torch.bool, device=dev)
    if causal:
        partial |= k_hi[None, :] > q_lo[:, None]
    if window is not None:
        partial |= (q_hi[:, None] - k_lo[None, :]) >= window
    partial |= (k_hi - k_lo + 1 < bs)[None, :]  # last, incomplete kv block
    partial |= (q_hi - q_lo + 1 < bs)[:, None]  # last, incomplete q block
    if key_valid is not None:
        partial |= torch.ones_like(partial)
    if layout.rule is not None:  # the rule is evaluated everywhere except where the pattern promises it is all-true
        rule_full = layout.full if layout.full is not None else torch.zeros(1, 1, nqb, nkb, dtype=torch.bool, device=dev)
        partial = partial | ~rule_full.to(dev)

    sel = layout.to_block_mask()  # [b, h, nqb, nkb]
    part = sel & partial
    full = sel & ~partial

    def _to_idx(m):
        cnt = m.sum(-1).to(torch.int32)
        idx = torch.sort((~m).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
        return cnt.contiguous(), idx.contiguous()

    pc, pi = _to_idx(part)
    fc, fi = _to_idx(full)
    offset = torch.tensor(off, device=dev)
    if key_valid is not None:
        kv_ok = key_valid.to(torch.bool)
    win = torch.tensor(window if window is not None else 0, device=dev)

    if causal and window is None and key_valid is None:
        def mask_mod(bb, hh, qi, ki):
            return qi + offset >= ki
    elif key_valid is None:
        def mask_mod(bb, hh, qi, ki):
            ok = (qi + offset - ki) < win if window is not None else qi >= 0
            if causal:
                ok = ok & (qi + offset >= ki)
            return ok
    else:
        def mask_mod(bb, hh, qi, ki):
            ok = kv_ok[bb, ki]
            if causal:
                ok = ok & (qi + offset >= ki)
            if window is not None:
                ok = ok & ((qi + offset - ki) < win)
            return ok

    if layout.rule is not None:
        rule, base = layout.rule, mask_mod

        def mask_mod(bb, hh, qi, ki):
            return base(bb, hh, qi, ki) & rule(bb, hh, qi + offset, ki)

    bm = BlockMask.from_kv_blocks(
        pc, pi, fc, fi, BLOCK_SIZE=bs, mask_mod=mask_mod, seq_lengths=(nq, nk)
    )
    with torch.no_grad() if q.device.type == "cpu" else _null():
        kind = (q.device.type, q.dtype, causal, window is not None, key_valid is not None, layout.rule is not None,
                hq, k.shape[1], q.shape[-1])
        out = _run_flex(kind, q, k, v, block_mask=bm, scale=scale, enable_gqa=hq != k.shape[1])
    if key_valid is not None or window is not None or layout.rule is not None:
        # rows that see no key at all (e.g. padded queries) come out as 0 (not NaN) to match the reference
        out = torch.nan_to_num(out, nan=0.0)
    return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
