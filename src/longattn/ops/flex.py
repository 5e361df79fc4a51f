"""Block-sparse attention, ``flex`` backend: torch FlexAttention under ``torch.compile``.

The ``BlockMask`` is built with ``BlockMask.from_kv_blocks`` from the layout's index tensors (never
``create_block_mask`` over N x N); blocks entirely inside the causal region are passed as *full* blocks (no
mask evaluation). On CPU, FlexAttention compiles for inference only and cannot return the log-sum-exp.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch

from ..layout import BlockLayout

__all__ = ["NAME", "can_run", "compile_seconds", "flex_block_attention"]

NAME = "flex"

# Compiled with dynamic shapes: a new sequence length reuses the graph (a static compile costs seconds per new
# length, i.e. per bench sample; ``dynamic=None`` hits an inductor C++ codegen error on CPU in torch 2.13).
# Each distinct (dtype, mask kind, ...) is still one compiled graph; a bench sweeps dozens of them, a per-head
# mixture of patterns (one call per pattern and head count) a few hundred: past the limit dynamo would fall
# back to running FlexAttention eagerly, which is very slow.
_DYNAMO_CACHE_LIMIT = 512
_flex_fns: dict[bool, Callable] = {}
# call kinds whose dynamic-shape compilation failed (inductor bug); they use a static compile from then on
_STATIC_ONLY: set[tuple] = set()
#: seconds this process spent compiling FlexAttention (``compile_seconds()``): a benchmark subtracts the change
#: over a timed region from it and reports it apart
_COMPILE_S = [0.0]


def compile_seconds() -> float:
    """Seconds spent compiling FlexAttention so far in this process: for every call that compiled a new graph,
    its time minus the time of running it again once compiled; plus every failed dynamic-shape compilation."""
    return _COMPILE_S[0]


def _call(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; when the call compiled a graph (dynamo's graph count rose), it runs once more and
    the difference of the two times counts as compilation."""
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    first = time.perf_counter() - t0
    if counters["stats"]["unique_graphs"] != before:
        t1 = time.perf_counter()
        out = fn(*args, **kwargs)
        _COMPILE_S[0] += max(0.0, first - (time.perf_counter() - t1))
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def bucket_len(n: int, block: int) -> int:
    """The length a statically compiled call is padded to: ``n`` rounded up to a multiple of an eighth of the
    next power of two (four buckets per octave, at most 25% padding, padded rows cost nothing) and of ``block``."""
    step = max(block, 1 << max(max(n - 1, 1).bit_length() - 3, 0))
    step = _cdiv(step, block) * block
    return _cdiv(n, step) * step


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


def _pad_rule(rule, n: int):
    """A token rule whose per-position tensors are padded to ``n`` (so that a static compile sees one shape per
    bucket; the padded entries are never read: positions are clamped to the real ones). A rule's ``fn`` keeps the
    tensors it captured (a static compile then still sees their shapes)."""
    import dataclasses

    upd = {}
    for name in ("columns", "diagonals", "q_group", "k_group"):
        t = getattr(rule, name)
        if t is not None and t.shape[-1] < n:
            upd[name] = torch.nn.functional.pad(t, (0, n - t.shape[-1]))
    return dataclasses.replace(rule, **upd) if upd else rule


def _first_error_line(e: Exception) -> str:
    """The line of a (long) compiler message that says what failed, shortened."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    hit = next((ln for ln in lines if "error:" in ln),
               next((ln for ln in lines if "Error" in ln), lines[-1] if lines else ""))
    return hit[:240]


def _fx_config():
    import torch.fx.experimental._config as cfg

    return cfg


def _run_flex(kind: tuple, *args, **kwargs):
    """Run the compiled FlexAttention with dynamic shapes (one graph for every sequence length); a call kind whose
    dynamic compilation fails or whose dynamic kernel trips its own bounds check (torch 2.13's CPU inductor has
    bugs for some masks) is compiled statically, per shape, from then on (a compilation per new length)."""
    if kind not in _STATIC_ONLY:
        import torch._dynamo

        # only the sequence lengths are dynamic: batch, heads and head dim stay static. (With every dim dynamic,
        # torch 2.13's CPU inductor reused a kernel across head counts and returned wrong outputs, silently.)
        for t in args[:3]:
            for dim in (0, 1, 3):
                torch._dynamo.mark_static(t, dim)
        try:
            # no duck sizing: the query and key lengths (equal in self-attention) and the lengths of the tensors a
            # mask captures get symbols of their own. With one shared symbol, torch 2.13's CPU flex template
            # emits C++ that names an undeclared ``cur_qSplitSize`` for a captured tensor's stride (a compile
            # error for every rule that indexes a per-position tensor, e.g. vertical_slash's).
            t0 = time.perf_counter()
            with _fx_config().patch(use_duck_shape=False):
                return _call(_flex(True), *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - inductor raises several exception types
            _COMPILE_S[0] += time.perf_counter() - t0  # the failed compilation
            # compile errors, and the bounds checks of a miscompiled dynamic kernel (RuntimeError "index out
            # of bounds"); anything else is a real error
            name = type(e).__name__
            if not ("Compile" in name or "Inductor" in name or "BackendCompilerFailed" in name
                    or (isinstance(e, RuntimeError) and "out of bounds" in str(e))):
                raise
            _STATIC_ONLY.add(kind)
            warnings.warn(f"longattn: FlexAttention dynamic-shape compilation failed for {kind}; compiling per "
                          f"shape instead ({type(e).__name__}: {_first_error_line(e)})", RuntimeWarning, stacklevel=3)
    return _call(_flex(False), *args, **kwargs)


def can_run(q, k, v, layout, *, return_lse: bool = False, sinks: bool = False) -> tuple[bool, str]:
    """Whether the compiled FlexAttention can compute this call, and if not, why."""
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
    if on_cpu and sinks:
        return False, "attention sinks need the log-sum-exp, which FlexAttention compiled on CPU cannot return"
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False, f"FlexAttention needs float32/bfloat16/float16, got {q.dtype}"
    if q.shape[-1] < 16 or q.shape[-1] & (q.shape[-1] - 1):
        return False, f"FlexAttention needs a power-of-two head dim >= 16, got {q.shape[-1]}"
    return True, ""


def flex_block_attention(q, k, v, layout: BlockLayout, causal, scale, key_valid, window, softcap=None, sinks=None):
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
    kind = (q.device.type, q.dtype, causal, window is not None, key_valid is not None, layout.rule is not None,
            hq, k.shape[1], q.shape[-1], softcap is not None, sinks is not None)
    nq_real, nk_real = nq, nk
    if kind in _STATIC_ONLY and bucket_len(nq, bs) != nq:
        # a static compile per shape: pad to a bucket so that nearby lengths share one graph. Padded queries come
        # last and get no block (no work); padded keys come last (the offset is kept) and are masked by position.
        pad = bucket_len(nq, bs) - nq
        q = torch.nn.functional.pad(q, (0, 0, 0, pad))
        k = torch.nn.functional.pad(k, (0, 0, 0, pad))
        v = torch.nn.functional.pad(v, (0, 0, 0, pad))
        if key_valid is not None:
            key_valid = torch.nn.functional.pad(key_valid.to(torch.bool), (0, pad), value=False)
        nq, nk = nq + pad, nk + pad
        gq, gk = _cdiv(nq, bs) - nqb, _cdiv(nk, bs) - nkb
        part = torch.nn.functional.pad(part, (0, gk, 0, gq), value=False)
        full = torch.nn.functional.pad(full, (0, gk, 0, gq), value=False)

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
        if nq != nq_real:
            rule = _pad_rule(rule, nk)  # bucketed: the rule sees real positions only (it may index per-position tensors)
            q_last, k_last = torch.tensor(nq_real - 1, device=dev), torch.tensor(nk_real - 1, device=dev)

            def mask_mod(bb, hh, qi, ki):
                qc, kc = torch.minimum(qi, q_last), torch.minimum(ki, k_last)
                return base(bb, hh, qc, kc) & rule(bb, hh, qc + offset, kc) & (ki <= k_last)
        else:
            def mask_mod(bb, hh, qi, ki):
                return base(bb, hh, qi, ki) & rule(bb, hh, qi + offset, ki)
    elif nq != nq_real:  # bucketed: padded keys are never seen
        base2, k_last2 = mask_mod, torch.tensor(nk_real - 1, device=dev)

        def mask_mod(bb, hh, qi, ki):
            return base2(bb, hh, qi, ki) & (ki <= k_last2)

    bm = BlockMask.from_kv_blocks(
        pc, pi, fc, fi, BLOCK_SIZE=bs, mask_mod=mask_mod, seq_lengths=(nq, nk)
    )
    with torch.no_grad() if q.device.type == "cpu" else _null():
        extra = {}
        if softcap is not None:
            cap = torch.tensor(float(softcap), device=dev)

            def score_mod(score, bb, hh, qi, ki):
                return cap * torch.tanh(score / cap)

            extra["score_mod"] = score_mod
        if sinks is not None:
            extra["return_lse"] = True
        out = _run_flex(kind, q, k, v, block_mask=bm, scale=scale, enable_gqa=hq != k.shape[1], **extra)
        if sinks is not None:
            from .core import add_sinks

            out, lse = out
            out, _ = add_sinks(out.float(), lse.float(), sinks.view(1, hq, 1))
            out = out.to(q.dtype)
    if key_valid is not None or window is not None or layout.rule is not None:
        # rows that see no key at all (e.g. padded queries) come out as 0 (not NaN) to match the reference
        out = torch.nan_to_num(out, nan=0.0)
    return out[:, :, :nq_real] if nq != nq_real else out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
