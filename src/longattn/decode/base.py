"""Decode-time selectors: at each generated token, pick the cached tokens each head attends to.

The cache keeps every token (or what a KV policy kept, uniformly per head); a selector returns, per layer and
step, token indices ``idx [b, hs, m]`` into the layer's physical cache (``hs`` = kv heads, shared by the query
heads of each group, or = q heads) and an optional ``valid [b, hs, m]`` mask of used slots;
``ops.decode.gather_attention`` then attends to exactly those tokens. Layers in ``dense_layers`` attend to
everything. A selector's state (page metadata, representatives, selection caches) lives in the cache layer
(``LongattnLayer.decode_state``), so it is per generation and freed with the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..checks import check_int, parse_layers

__all__ = ["DecodeSelector", "Step", "minmax_scores", "page_bounds", "pages_to_tokens", "top_with_forced",
           "page_has_valid"]


@dataclass
class Step:
    """One decode step of one layer, as the selector sees it."""

    q: torch.Tensor  # [b, hq, 1, d]
    k: torch.Tensor  # [b, hk, n, d] every physical token of the layer (the new one last)
    v: torch.Tensor
    key_valid: torch.Tensor | None  # [b, n] physical validity (padding), None = all valid
    layer: Any  # cache.LongattnLayer
    layer_idx: int
    num_layers: int
    scale: float
    shared: dict = field(default_factory=dict)  # per forward (step) state shared across layers
    softcap: float | None = None  # the layer's logit softcap (Gemma 2)
    sinks: torch.Tensor | None = None  # the layer's per-head attention sinks (gpt-oss), [hq]
    module: Any = None  # the attention module (its RoPE, for selectors that rebuild keys: ShadowKV)

    @property
    def state(self) -> dict:
        return self.layer.decode_state

    @property
    def n(self) -> int:
        return self.k.shape[2]

    def grouped_q(self) -> torch.Tensor:
        """``[b, hk, g, d]`` float32 query grouped by kv head."""
        b, hq, _, d = self.q.shape
        hk = self.k.shape[1]
        return self.q.reshape(b, hk, hq // hk, d).float()


@dataclass(frozen=True)
class DecodeSelector:
    """Base of the decode-time selectors. ``budget``: tokens attended per head and step (at most);
    ``dense_layers``: comma-separated layers attended densely (``"0,1"``); ``splits``: split-K parts of the
    selected set (flash-decoding merge)."""

    budget: int = 1024
    dense_layers: str = ""
    splits: int = 1

    #: settings of small instances for the generic tests (a tiny 4-layer model, ~150 tokens): a budget well
    #: below the cache
    examples: ClassVar[tuple[dict, ...]] = ()
    #: settings under which the selector attends to every cached token (it then decodes exactly as dense)
    full_example: ClassVar[dict | None] = None

    #: the selector needs the cache as the prompt filled it (its state indexes all tokens, or spans layers):
    #: it cannot follow a KV policy that drops tokens
    needs_full_cache: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_int(self.budget, "budget")
        check_int(self.splits, "splits")
        object.__setattr__(self, "_dense", parse_layers(self.dense_layers))

    @classmethod
    def write_example_profile(cls, path, **shape) -> str:
        """The head profile an example's ``profile="<profile>"`` stands for (selectors that read one)."""
        from ..profiles import write_example_profile

        return write_example_profile(path, **shape)

    def prepare(self, model) -> None:
        """Check the selector against the model (called by ``apply()``)."""
        n_layers = model.config.num_hidden_layers
        self.check_layers(self._dense, "dense_layers", n_layers)

    @staticmethod
    def check_layers(layers: tuple[int, ...], name: str, n_layers: int) -> None:
        bad = [li for li in layers if li >= n_layers]
        if bad:
            raise ValueError(f"{name}: layer {bad[0]} does not exist; the model has {n_layers} layers (0..{n_layers - 1})")

    def is_dense(self, layer_idx: int) -> bool:
        return layer_idx in self._dense

    def on_prefill(self, layer, layer_idx: int, q: torch.Tensor, k: torch.Tensor,
                   key_valid: torch.Tensor | None) -> None:
        """Called after every multi-token forward of a layer (``k``: all physical keys, ``q``: the new queries)."""

    def reference_select(self, step: Step, prefill_q: torch.Tensor | None = None) -> dict:
        """The tokens the selector's *definition* attends at this step, computed slowly, loop by loop over rows,
        heads, pages and tokens (the truth the tests hold ``select()`` to): ``{(b, h): set of token indices}``
        (``h`` over kv heads, or query heads for per-query-head selectors). ``prefill_q``: the queries the layer's
        prefill saw (selectors whose state comes from them)."""
        raise NotImplementedError  # pragma: no cover - each selector defines it

    def select(self, step: Step) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(idx [b, hs, m] long, valid [b, hs, m] bool or None)`` for this step (a page selector: the tokens of
        its ``select_pages``)."""
        paged = self.select_pages(step)
        if paged is None:  # pragma: no cover - each token-level selector defines select
            raise NotImplementedError
        return pages_to_tokens(paged[0], paged[1], step.n)

    def select_pages(self, step: Step) -> tuple[torch.Tensor, int] | None:
        """Selectors that choose whole pages of consecutive physical tokens: ``(pages [b, hs, kp] ascending,
        page_size)`` (``attend`` then gathers page by page); None: a token-level selector."""
        return None

    def attend(self, step: Step, stats: dict | None = None) -> torch.Tensor:
        """Select, then attend: ``[b, hq, 1, d]``. ``stats["select_s"]`` gets the selection time."""
        import time

        from ..ops.decode import gather_attention

        t0 = time.perf_counter()
        paged = self.select_pages(step)
        idx, valid = self.select(step) if paged is None else (paged[0], None)
        page_size = 0 if paged is None else paged[1]
        if stats is not None:
            stats["select_s"] = stats.get("select_s", 0.0) + time.perf_counter() - t0
            if paged is None:
                used = idx.numel() if valid is None else int(valid.sum())
            else:  # whole pages, less the newest page's tail past the cache's end in the rows that hold it
                tail = -step.n % page_size
                used = idx.numel() * page_size - (int((idx[..., -1] == step.n // page_size).sum()) * tail
                                                   if tail else 0)
            stats["selected"] = stats.get("selected", 0) + used
            stats["possible"] = stats.get("possible", 0) + idx.shape[0] * idx.shape[1] * step.n
        out, _ = gather_attention(step.q, step.k, step.v, idx, valid=valid, key_valid=step.key_valid,
                                  scale=step.scale, splits=self.splits, softcap=step.softcap, sinks=step.sinks,
                                  need_lse=False, page_size=page_size)
        return out


# ---- shared helpers ------------------------------------------------------------------------------------
def minmax_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest's upper bound of ``q . k`` over a page: ``sum_d max(q_d * max_d, q_d * min_d)``, computed as
    ``relu(q) . max + min(q, 0) . min``. ``q [b, hk, g, d]``, ``kmin/kmax [b, hk, p, d]`` -> ``[b, hk, g, p]``."""
    qf = q.float()
    return torch.matmul(qf.clamp_min(0), kmax.float().transpose(-1, -2)) + torch.matmul(
        qf.clamp_max(0), kmin.float().transpose(-1, -2))


def page_bounds(step: Step, page_size: int) -> torch.Tensor:
    """Quest's page score ``[b, hk, pages]`` for pages of ``page_size`` tokens: the max over the group's query
    heads of ``minmax_scores``; -inf for pages holding only padding."""
    meta = step.layer.page_meta(page_size)
    s = minmax_scores(step.grouped_q(), meta.kmin, meta.kmax).amax(2)
    ok = page_has_valid(step.key_valid, page_size, step.n)
    if ok is not None:
        s = s.masked_fill(~ok[:, None, :], float("-inf"))
    return s


def page_has_valid(key_valid: torch.Tensor | None, page_size: int, n: int) -> torch.Tensor | None:
    """``[b, pages]``: the page holds at least one valid (not padded) key."""
    if key_valid is None:
        return None
    pages = -(-n // page_size)
    pad = pages * page_size - n
    kv = torch.nn.functional.pad(key_valid.to(torch.bool), (0, pad), value=False)
    return kv.view(key_valid.shape[0], pages, page_size).any(-1)


def top_with_forced(scores: torch.Tensor, k: int, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (ascending) of the ``k`` best ``scores [..., p]`` per row, ``forced [..., p]`` bool entries first
    (they count in ``k``). ``k >= p`` selects every entry."""
    p = scores.shape[-1]
    if k >= p:
        return torch.arange(p, device=scores.device).expand(*scores.shape[:-1], p)
    s = scores.float()
    if forced is not None:
        s = torch.where(forced, torch.full_like(s, float("inf")), s)
    return torch.topk(s, k, dim=-1).indices.sort(-1).values


def pages_to_tokens(pages: torch.Tensor, page_size: int, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Selected page ids ``[b, h, kp]`` -> token indices ``[b, h, kp * page_size]`` and their validity (the tail
    of the last, partial page is invalid; invalid slots point at token 0)."""
    from ..ops.decode import page_tokens

    tok = page_tokens(pages, page_size)
    if n % page_size == 0:
        return tok, None
    ok = tok < n
    return torch.where(ok, tok, torch.zeros_like(tok)), ok
