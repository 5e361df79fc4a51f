"""Base class of sparse prefill patterns and the helpers they share.

A pattern is a frozen dataclass of its settings whose ``layout(q, k, key_valid)`` returns a ``BlockLayout``
(blocks to compute per batch row, query head and query block, plus an optional token rule). ``attend()``
runs the pattern end to end (layout, then ``block_sparse_attention``); a pattern that changes the keys
themselves (core_context) overrides it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..checks import check_block_size
from ..layout import BlockLayout, TokenRule
from ..padding import first_real, sink_tokens

__all__ = ["PrefillPattern"]


@dataclass(frozen=True)
class PrefillPattern:
    """A sparse prefill pattern. Subclasses implement ``layout(q, k, key_valid)``."""

    block_size: int = 64
    backend: str = "auto"

    #: settings of small instances for the generic tests (inputs of ~150 tokens, ``block_size=16``)
    examples: ClassVar[tuple[dict, ...]] = ()
    #: settings under which the pattern computes every causal pair (its output then equals dense attention)
    full_example: ClassVar[dict | None] = None

    def __post_init__(self) -> None:
        check_block_size(self.block_size)
        from ..ops.dispatch import BACKENDS

        if self.backend not in ("auto",) + BACKENDS:
            raise ValueError(f"backend must be one of auto, {', '.join(BACKENDS)}; got {self.backend!r}")

    def layout(self, q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None = None) -> BlockLayout:
        """Blocks to compute for ``q [b, h, nq, d]`` over ``k [b, hkv, nk, d]``; ``key_valid [b, nk]`` marks
        left padding, so that position-based patterns start at each row's first real token."""
        raise NotImplementedError  # pragma: no cover - abstract

    def reference_mask(self, q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """The token pairs the pattern's *definition* selects, computed slowly, loop by loop over tokens and
        blocks (the truth the tests hold ``layout()`` to): bool ``[b or 1, h or 1, q_len, kv_len]``. Pairs with
        padded keys may be either (every kernel masks them)."""
        raise NotImplementedError  # pragma: no cover - each pattern defines it (or reference_output)

    def reference_output(self, q, k, v, key_valid=None) -> torch.Tensor:
        """The output computed slowly from the definition, for patterns that change the keys themselves
        (``core_context``); others are checked as ``reference.attention`` under ``reference_mask``."""
        raise NotImplementedError  # pragma: no cover

    def for_layer(self, layer_idx: int) -> PrefillPattern:
        """The pattern a given layer uses (per-layer patterns such as ``mixed`` override this)."""
        return self

    def is_causal(self) -> bool:
        """Whether the pattern is meant for causal attention (``attend`` default)."""
        return True

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | None = None,
        key_valid: torch.Tensor | None = None,
        window: int | None = None,
        layout: BlockLayout | None = None,
        causal: bool | None = None,
        stats: dict | None = None,
        softcap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sparse attention output ``[b, hq, nq, d]`` (layout computed unless given). ``causal`` defaults to
        ``is_causal()``; ``stats["est_s"]`` accumulates the estimation (layout) seconds; ``softcap`` / ``sinks`` are
        the layer's (applied by the kernel; the estimate ranks raw logits, which the monotonic softcap keeps)."""
        import time

        from ..ops.dispatch import block_sparse_attention

        if layout is None:
            t0 = time.perf_counter()
            layout = self.layout(q, k, key_valid)
            if stats is not None:
                stats["est_s"] = stats.get("est_s", 0.0) + time.perf_counter() - t0
        return block_sparse_attention(
            q, k, v, layout, causal=self.is_causal() if causal is None else causal, scale=scale,
            key_valid=key_valid, window=window, backend=self.backend, softcap=softcap, sinks=sinks,
        )


class Geometry:
    """Block geometry of a (q_len, kv_len) problem, queries aligned to the end of the keys."""

    def __init__(self, q_len: int, kv_len: int, bs: int, device=None):
        self.q_len, self.kv_len, self.bs = q_len, kv_len, bs
        self.off = kv_len - q_len
        self.nqb, self.nkb = -(-q_len // bs), -(-kv_len // bs)
        self.device = device
        qb = torch.arange(self.nqb, device=device)
        self.q_lo = qb * bs + self.off  # absolute position of each q block's first query
        self.q_hi = torch.clamp((qb + 1) * bs, max=q_len) - 1 + self.off  # ... and last query
        self.kb = torch.arange(self.nkb, device=device)
        self.last_kb = self.q_hi // bs  # last kv block a q block reaches (causal)

    def causal_blocks(self) -> torch.Tensor:
        """bool ``[nqb, nkb]``: kv blocks holding at least one key some query of the block may see."""
        return self.kb[None, :] <= self.last_kb[:, None]

    def diagonal_blocks(self) -> torch.Tensor:
        """bool ``[nqb, nkb]``: kv blocks overlapping the q block's own positions (the local diagonal)."""
        return (self.kb[None, :] >= (self.q_lo // self.bs)[:, None]) & (self.kb[None, :] <= self.last_kb[:, None])

    def local_blocks(self, window: int) -> torch.Tensor:
        """bool ``[nqb, nkb]``: kv blocks holding keys within ``window`` tokens before some query of the block."""
        lo = torch.clamp(self.q_lo - window + 1, min=0) // self.bs
        return (self.kb[None, :] >= lo[:, None]) & (self.kb[None, :] <= self.last_kb[:, None])

    def sink_blocks(self, sink: int, key_valid: torch.Tensor | None, batch: int = 1) -> torch.Tensor:
        """bool ``[b, 1, 1, nkb]``: kv blocks holding the first ``sink`` real tokens of each row."""
        if sink <= 0:
            return torch.zeros(batch, 1, 1, self.nkb, dtype=torch.bool, device=self.device)
        first = first_real(key_valid, batch, self.device)
        lo, hi = first // self.bs, (first + sink - 1) // self.bs
        m = (self.kb[None, :] >= lo[:, None]) & (self.kb[None, :] <= hi[:, None])
        return m[:, None, None, :]


def pool_blocks(x: torch.Tensor, bs: int, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``x [b, h, n, d]`` over blocks of ``bs`` positions (padding and invalid positions excluded).
    Returns ``(pooled [b, h, nb, d] float32, has_any [b, 1, nb] bool)``."""
    b, h, n, d = x.shape
    nb = -(-n // bs)
    pad = nb * bs - n
    w = torch.ones(b, n, device=x.device) if valid is None else valid.to(torch.float32)
    w = F.pad(w, (0, pad)).reshape(b, 1, nb, bs, 1)
    xs = F.pad(x.float(), (0, 0, 0, pad)).reshape(b, h, nb, bs, d)
    cnt = w.sum(3)  # [b, 1, nb, 1]
    pooled = (xs * w).sum(3) / cnt.clamp_min(1)
    return pooled, (cnt[..., 0] > 0)


def expand_heads(x: torch.Tensor, hq: int) -> torch.Tensor:
    """Repeat kv heads ``[b, hkv, ...]`` to the query heads (GQA), for estimation tensors."""
    return x if x.shape[1] == hq else x.repeat_interleave(hq // x.shape[1], dim=1)


def topk_mask(scores: torch.Tensor, k: int, allowed: torch.Tensor) -> torch.Tensor:
    """bool mask of the ``k`` highest ``scores`` along the last dim among ``allowed`` entries."""
    k = min(k, scores.shape[-1])
    s = scores.masked_fill(~allowed, float("-inf"))
    idx = s.topk(k, dim=-1).indices
    m = torch.zeros_like(allowed).expand_as(s).clone()
    m.scatter_(-1, idx, True)
    return m & allowed


def block_scores(q: torch.Tensor, k: torch.Tensor, bs: int, key_valid: torch.Tensor | None) -> torch.Tensor:
    """Mean-pooled block affinity ``[b, hq, nqb, nkb]`` (scaled logits); fully padded kv blocks are -inf."""
    hq, d = q.shape[1], q.shape[-1]
    qp, _ = pool_blocks(q, bs)
    kv_valid = key_valid
    kp, has = pool_blocks(k, bs, kv_valid)
    s = torch.matmul(qp, expand_heads(kp, hq).transpose(-1, -2)) / math.sqrt(d)
    return s.masked_fill(~has[:, :, None, :], float("-inf"))


def finish_blocks(
    selected: torch.Tensor, geo: Geometry, sink: int, key_valid: torch.Tensor | None, q: torch.Tensor
) -> torch.Tensor:
    """Selected blocks | forced sinks | the diagonal block, restricted to causally reachable blocks."""
    b = q.shape[0]
    m = selected | geo.sink_blocks(sink, key_valid, b) | geo.diagonal_blocks()
    return m & geo.causal_blocks()


def threshold_mask(logmass: torch.Tensor, tau: float, allowed: torch.Tensor) -> torch.Tensor:
    """Smallest set of entries (last dim) whose softmax(``logmass``) mass over ``allowed`` reaches ``tau``."""
    s = logmass.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    ps, order = p.sort(-1, descending=True)
    before = ps.cumsum(-1) - ps  # mass of the strictly better entries
    keep_sorted = before < tau
    m = torch.zeros_like(keep_sorted)
    m.scatter_(-1, order, keep_sorted)
    return m & allowed


def blocks_from_rule(fn, geo: Geometry, causal: bool = True) -> torch.Tensor:
    """bool ``[nqb, nkb]``: blocks holding at least one pair allowed by a head- and batch-independent token rule
    ``fn(b, h, qp, kp)``, by evaluating it on every pair (chunked; O(N^2) element-wise work)."""
    bs = geo.bs
    dev = geo.device
    out = torch.zeros(geo.nqb, geo.nkb, dtype=torch.bool, device=dev)
    kp = torch.arange(geo.kv_len, device=dev)
    pad = geo.nkb * bs - geo.kv_len
    zero = torch.zeros((), dtype=torch.long, device=dev)
    step = max(1, (1 << 22) // max(geo.kv_len * bs, 1))
    for i0 in range(0, geo.nqb, step):
        i1 = min(i0 + step, geo.nqb)
        qp = torch.arange(i0 * bs, min(i1 * bs, geo.q_len), device=dev) + geo.off
        ok = fn(zero, zero, qp[:, None], kp[None, :])
        if causal:
            ok = ok & (kp[None, :] <= qp[:, None])
        ok = F.pad(ok, (0, pad, 0, (i1 - i0) * bs - qp.numel()))
        out[i0:i1] = ok.view(i1 - i0, bs, geo.nkb, bs).any(3).any(1)
    return out


def group_blocks(q_group: torch.Tensor, k_group: torch.Tensor, geo: Geometry, n_groups: int) -> torch.Tensor:
    """bool ``[B, H, nqb, nkb]``: blocks where some query and some key share a group id (groups ``[B, H, kv_len]``
    indexed by absolute position, ids in ``[0, n_groups)``)."""
    bs = geo.bs
    B, H, n = q_group.shape

    def member(gr: torch.Tensor, start: int, nb: int) -> torch.Tensor:
        x = gr[..., start:]
        pad = nb * bs - x.shape[-1]
        x = F.pad(x, (0, pad), value=n_groups)  # padding goes to a spare group
        m = torch.zeros(B, H, nb, n_groups + 1, device=gr.device)
        m.scatter_(-1, x.view(B, H, nb, bs).long(), 1.0)
        return m[..., :n_groups]

    aq = member(q_group, geo.off, geo.nqb)
    ak = member(k_group, 0, geo.nkb)
    return torch.matmul(aq, ak.transpose(-1, -2)) > 0


def group_layout(gr: torch.Tensor, n_groups: int, geo: Geometry, sink: int, key_valid: torch.Tensor | None,
                 batch: int) -> BlockLayout:
    """Layout of group-local attention (group ids ``gr [b, H, kv_len]``) plus global attention to the first
    ``sink`` real tokens: the blocks where a query and a key share a group or the key is a sink, and the token
    rule that keeps exactly those pairs."""
    m = group_blocks(gr, gr, geo, n_groups)
    columns = None
    if sink > 0:
        columns = sink_tokens(sink, key_valid, batch, geo.kv_len, geo.device)[:, None, :]
        m = m | geo.sink_blocks(sink, key_valid, batch)
    m = m & geo.causal_blocks()
    rule = TokenRule(q_group=gr, k_group=gr, columns=columns)
    return BlockLayout.from_block_mask(m, block_size=geo.bs, q_len=geo.q_len, kv_len=geo.kv_len, rule=rule)
