"""Block-sparse attention over a ``BlockLayout``: backend choice and dispatch.

Backends (``backend=``), one file each, each with ``can_run()`` giving its reason when it cannot:
- ``flex`` (``flex.py``): torch FlexAttention under ``torch.compile``;
- ``gather`` (``gather.py``): pure torch, gathers the selected key blocks; works everywhere, autograd, lse;
- ``dense`` (``dense.py``): SDPA with the layout expanded to a dense mask; for checking only.

``backend="auto"`` takes ``flex`` when it can run and the query is long enough to amortise a compilation
(``FLEX_MIN_Q``), ``gather`` otherwise. An explicit backend that cannot run raises ValueError with the reason.
"""

from __future__ import annotations

import math

import torch

from ..layout import BlockLayout
from ..reference import check_qkv
from . import dense as _dense_backend
from . import flex as _flex_backend
from . import gather as _gather_backend
from .dense import dense_layout_attention
from .flex import flex_block_attention
from .gather import gather_block_attention

__all__ = ["BACKENDS", "FLEX_MIN_Q", "block_sparse_attention", "can_run", "choose_backend"]

_BACKENDS = {m.NAME: m for m in (_flex_backend, _gather_backend, _dense_backend)}
BACKENDS = tuple(_BACKENDS)
FLEX_MIN_Q = 1024


def can_run(
    backend: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    return_lse: bool = False,
    sinks: bool = False,
) -> tuple[bool, str]:
    """Whether ``backend`` can compute this call (``sinks``: with attention sinks), and if not, why."""
    if backend not in _BACKENDS:
        return False, f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}"
    return _BACKENDS[backend].can_run(q, k, v, layout, return_lse=return_lse, sinks=sinks)


def choose_backend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, *, return_lse: bool = False,
    sinks: bool = False,
) -> tuple[str, str]:
    """Automatic choice: ``(backend, reason)``."""
    ok, why = can_run("flex", q, k, v, layout, return_lse=return_lse, sinks=sinks)
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
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
):
    """Attention of ``q [b, hq, nq, d]`` over ``k, v [b, hkv, nk, d]`` restricted to ``layout``'s blocks.

    ``key_valid [b, nk]`` bool masks padded keys; ``window`` is a sliding window (token level); ``softcap`` caps
    the logits (Gemma 2) and ``sinks [hq]`` adds one value-less softmax entry per head (gpt-oss). Returns the
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
    if sinks is not None and tuple(sinks.shape) != (hq,):
        raise ValueError(f"sinks must be one logit per query head [{hq}], got {tuple(sinks.shape)}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if backend == "auto":
        backend, _ = choose_backend(q, k, v, layout, return_lse=return_lse, sinks=sinks is not None)
    else:
        ok, why = can_run(backend, q, k, v, layout, return_lse=return_lse, sinks=sinks is not None)
        if not ok:
            raise ValueError(f"backend={backend!r} cannot run here: {why}")
    if layout.batch != b or layout.heads != hq:
        layout = BlockLayout(
            layout.kv_indices.expand(b, hq, *layout.kv_indices.shape[2:]),
            layout.kv_counts.expand(b, hq, layout.kv_counts.shape[2]),
            layout.block_size, nq, nk, layout.rule, layout.full,
        )
    if backend == "gather":
        out, lse = gather_block_attention(q, k, v, layout, causal, scale, key_valid, window, need_lse=return_lse,
                                          softcap=softcap, sinks=sinks)
        return (out, lse) if return_lse else out
    if backend == "dense":
        return dense_layout_attention(q, k, v, layout, causal, scale, key_valid, window, softcap, sinks)
    return flex_block_attention(q, k, v, layout, causal, scale, key_valid, window, softcap, sinks)
