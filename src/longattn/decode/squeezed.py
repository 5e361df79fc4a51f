"""Squeezed Attention: k-means centroids of a fixed context's keys, centroid lookup per query.

Paper: "Squeezed Attention: Accelerating Long Context Length LLM Inference" (Hooper et al., ACL 2025,
https://arxiv.org/abs/2411.09688). The keys of the fixed context (the first prefill of the cache) are clustered
offline, per kv head, into ``ceil(n / cluster_tokens)`` centroids by k-means (``iters`` Lloyd steps on
unit-normalised keys, deterministic init: evenly spaced keys). At each step every centroid is scored by
``q . c`` (max over the group's query heads), and the tokens of the best clusters are attended exactly, in
score order until ``budget`` tokens; the tokens appended after the context (question, generated tokens) are
always attended. ``levels=2`` adds the paper's hierarchical lookup: coarse centroids (k-means over the fine
ones, ``fanout`` fine per coarse) are scored first and only the fine centroids under the best
``coarse_keep`` fraction of coarse ones are scored.

Departures: a fixed token budget instead of the paper's calibrated softmax threshold; GQA handled per kv head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..cache.state import DecodeState
from ..checks import check_float, check_int
from ..registry import register
from . import _slow
from .base import DecodeSelector, Step

__all__ = ["Squeezed", "SqueezedState", "kmeans"]


def kmeans(x: torch.Tensor, clusters: int, iters: int, valid: torch.Tensor | None = None, chunk: int = 16384
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched k-means (Lloyd) of ``x [r, n, d]`` on unit vectors (cosine). Returns ``(centroids [r, c, d],
    assign [r, n] long)``. Init: evenly spaced points. Points with ``valid`` False are assigned but do not move
    centroids. Empty clusters keep their previous centroid; the returned memberships are those of the returned
    centroids. Rows and points are processed in chunks (memory
    ``chunk x clusters`` per step)."""
    r, n, d = x.shape
    init = torch.linspace(0, n - 1, clusters, device=x.device).round().long()
    cents, assigns = [], []
    for ri in range(r):
        xn = torch.nn.functional.normalize(x[ri].float(), dim=-1)
        cent = xn[init].clone()
        w = torch.ones(n, device=x.device) if valid is None else valid[ri].float()
        assign = torch.zeros(n, dtype=torch.long, device=x.device)

        def nearest(cent, xn=xn, assign=assign):
            for c0 in range(0, n, chunk):
                assign[c0 : c0 + chunk] = torch.matmul(xn[c0 : c0 + chunk], cent.T).argmax(-1)

        for _ in range(max(iters, 1)):
            nearest(cent)
            sums = torch.zeros(clusters, d, device=x.device).index_add_(0, assign, xn * w[:, None])
            cnt = torch.zeros(clusters, device=x.device).index_add_(0, assign, w)
            cent = torch.where(cnt[:, None] > 0, torch.nn.functional.normalize(sums, dim=-1), cent)
        nearest(cent)  # the memberships of the final centroids
        cents.append(cent)
        assigns.append(assign)
    return torch.stack(cents), torch.stack(assigns)



@dataclass
class SqueezedState(DecodeState):
    """The clustered context of one cache layer: centroids, each token's cluster and, with ``levels=2``, the
    coarse centroids and each centroid's parent."""

    cent: torch.Tensor  # [b, hk, clusters, d]
    assign: torch.Tensor  # [b, hk, n] cluster of each context token
    n: int  # context tokens clustered
    coarse: torch.Tensor | None = None  # [b, hk, coarse clusters, d]
    parent: torch.Tensor | None = None  # [b, hk, clusters]

@register("squeezed", "decode", paper="Squeezed Attention (Hooper et al., ACL 2025) https://arxiv.org/abs/2411.09688",
          summary="k-means centroids of the fixed context's keys; exact attention on the best clusters' keys")
@dataclass(frozen=True)
class Squeezed(DecodeSelector):
    """Centroid lookup over an offline k-means of the context keys (optionally hierarchical)."""

    examples = ({"budget": 48, "cluster_tokens": 8, "levels": 2},)
    full_example = {"budget": 4096, "levels": 2, "coarse_keep": 1.0}

    cluster_tokens: int = 16
    iters: int = 8
    levels: int = 1
    fanout: int = 8
    coarse_keep: float = 0.25

    needs_full_cache: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.cluster_tokens, "cluster_tokens")
        check_int(self.iters, "iters")
        check_int(self.fanout, "fanout", 2)
        if self.levels not in (1, 2):
            raise ValueError(f"levels must be 1 or 2, got {self.levels!r}")
        check_float(self.coarse_keep, "coarse_keep", 0.0, 1.0)
        if self.budget < self.cluster_tokens:
            raise ValueError(f"budget ({self.budget}) must be >= cluster_tokens ({self.cluster_tokens})")

    def on_prefill(self, layer, layer_idx, q, k, key_valid) -> None:
        """Cluster the context once: the keys of the first prefill of this cache layer."""
        if self.is_dense(layer_idx) or "squeezed" in layer.decode_state:
            return
        b, hk, n, d = k.shape
        c = max(1, -(-n // self.cluster_tokens))
        valid = None if key_valid is None else key_valid[:, None].expand(-1, hk, -1).reshape(b * hk, n)
        cent, assign = kmeans(k.reshape(b * hk, n, d), c, self.iters, valid)
        st = SqueezedState(cent.view(b, hk, c, d), assign.view(b, hk, n), n)
        if self.levels == 2:
            cc = max(1, -(-c // self.fanout))
            coarse, parent = kmeans(cent, cc, self.iters)
            st.coarse, st.parent = coarse.view(b, hk, cc, d), parent.view(b, hk, c)
        layer.decode_state["squeezed"] = st

    def cluster_scores(self, step: Step, st: SqueezedState) -> torch.Tensor:
        """``[b, hk, clusters]``: ``max_g q . c``; with ``levels=2`` -inf outside the best coarse clusters."""
        q = step.grouped_q()
        s = torch.matmul(q, st.cent.transpose(-1, -2)).amax(2)
        if self.levels == 2:
            sc = torch.matmul(q, st.coarse.transpose(-1, -2)).amax(2)  # [b, hk, cc]
            keep = max(1, round(self.coarse_keep * sc.shape[-1]))
            best = torch.zeros_like(sc, dtype=torch.bool).scatter_(-1, sc.topk(keep, -1).indices, True)
            s = s.masked_fill(~torch.gather(best, -1, st.parent), float("-inf"))
        return s

    def reference_select(self, step: Step, prefill_q=None) -> dict:
        """Loop by loop, from the layer's clusters (k-means of the context, tested on its own): a cluster scores
        the best q . centroid over the group (``levels=2``: only inside the best ``coarse_keep`` coarse
        clusters); the ``budget`` context tokens of the best clusters, plus every token appended since."""
        st = step.state["squeezed"]
        b, hq = step.q.shape[:2]
        hk, n = step.k.shape[1], step.n
        g, nc = hq // hk, st.n
        out = {}
        for bi in range(b):
            for h in range(hk):
                qs = [step.q[bi, h * g + j, 0].double() for j in range(g)]
                cs = [max(float(qq @ st.cent[bi, h, c].double()) for qq in qs) for c in range(st.cent.shape[2])]
                if self.levels == 2:
                    cc = [max(float(qq @ st.coarse[bi, h, c].double()) for qq in qs) for c in range(st.coarse.shape[2])]
                    best = set(_slow.top(cc, max(1, round(self.coarse_keep * len(cc)))))
                    cs = [x if int(st.parent[bi, h, c]) in best else -math.inf for c, x in enumerate(cs)]
                tok = [cs[int(st.assign[bi, h, t])] if _slow.real(step.key_valid, bi, t) else -math.inf
                       for t in range(nc)]
                chosen = [t for t in _slow.top(tok, min(self.budget, nc)) if tok[t] > -math.inf]
                out[bi, h] = set(chosen) | set(range(nc, n))
        return out

    def select(self, step: Step):
        st = step.state.get("squeezed")
        if st is None:
            raise RuntimeError("squeezed: no clustered context in this cache layer (the prompt was not prefilled "
                               "inside longattn.apply)")
        b, hk, n = step.k.shape[0], step.k.shape[1], step.n
        nc = st.n
        tok_score = torch.gather(self.cluster_scores(step, st), -1, st.assign)  # [b, hk, nc]
        if step.key_valid is not None:
            tok_score = tok_score.masked_fill(~step.key_valid[:, None, :nc], float("-inf"))
        # tokens of one cluster share its score: ties go to the earlier token (a stable sort), deterministically
        ctx = torch.sort(tok_score, dim=-1, descending=True, stable=True).indices[..., : min(self.budget, nc)]
        ctx = ctx.sort(-1).values
        valid = None
        if self.levels == 2 or step.key_valid is not None:  # slots whose token scored -inf were filler
            valid = torch.isfinite(torch.gather(tok_score, -1, ctx))
        tail = torch.arange(nc, n, device=step.k.device).expand(b, hk, -1)
        idx = torch.cat([ctx, tail], -1)
        if valid is not None:
            valid = torch.cat([valid, torch.ones_like(tail, dtype=torch.bool)], -1)
        return idx, valid
