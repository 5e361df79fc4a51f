"""TokenSelect: token-level selection by per-head q.k criticality with a soft vote across heads, plus the
Selection Cache.

Paper: "TokenSelect: Efficient Long-Context Inference and Length Extrapolation for LLMs via Dynamic Token-Level
KV Cache Selection" (Wu et al., 2024, https://arxiv.org/abs/2411.02886). Each query head scores every cached
token by ``q . k``; the scores are softmax-normalised per head (so no single head dominates) and summed over the
heads — the *soft vote* — and the ``budget`` best tokens are attended by all heads of the layer (one gather).
The Selection Cache: when the new query is similar to the query of the last selection (mean cosine over heads
``>= threshold``) and at most ``recent`` tokens were appended since, the previous selection is reused plus those
tokens (so a reused step attends at most ``budget + recent`` tokens); it is recomputed otherwise.
The first ``sink`` real tokens and the last ``recent`` tokens are always selected (as the paper's init/local
tokens).

Departure: the vote is over all query heads of the layer as in the paper (``vote=layer``), or per kv head over
its group only (``vote=group``: each kv head gets its own selection).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..cache.state import DecodeState
from ..checks import check_float, check_int
from ..padding import sink_tokens
from ..registry import register
from . import _slow
from .base import DecodeSelector, Step, top_with_forced

__all__ = ["TokenSelect", "TokenSelectState"]

VOTES = ("layer", "group")


@dataclass
class TokenSelectState(DecodeState):
    """The Selection Cache: the query and selection of the last selecting step, and hit/miss counts."""

    q: torch.Tensor  # [b, hq, d] float32
    idx: torch.Tensor  # [b, 1 or hk, m] the selection
    n: int  # cache length at that step
    hits: int = 0
    misses: int = 0


@register("token_select", "decode", paper="TokenSelect (Wu et al., 2024) https://arxiv.org/abs/2411.02886",
          summary="token-level q.k criticality, per-head soft vote, selection cache for similar queries")
@dataclass(frozen=True)
class TokenSelect(DecodeSelector):
    """Token-level selection with a per-head soft vote and the Selection Cache."""

    renamed = {"local": "recent"}  # old spellings, accepted with a FutureWarning

    examples = ({"budget": 48, "sink": 4, "recent": 8},)
    full_example = {"budget": 4096}

    sink: int = 16
    recent: int = 64
    threshold: float = 0.9
    vote: str = "layer"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.sink, "sink", 0)
        check_int(self.recent, "recent", 0)
        check_float(self.threshold, "threshold", -1.0, 1.0, lo_open=False)
        if self.vote not in VOTES:
            raise ValueError(f"vote must be one of {', '.join(VOTES)}, got {self.vote!r}")
        if self.budget < self.sink + self.recent + 1:
            raise ValueError(f"budget ({self.budget}) must exceed sink + recent ({self.sink + self.recent})")

    def reference_select(self, step: Step, prefill_q=None) -> dict:
        """Loop by loop (a fresh selection): each query head's softmax over the real tokens of q . k * scale,
        summed over the layer's heads (``vote=layer``, one set) or the kv head's group (``vote=group``); the first
        ``sink`` real and last ``recent`` tokens, then the best others, ``budget`` in all."""
        b, hq = step.q.shape[:2]
        hk, n = step.k.shape[1], step.n
        g = hq // hk
        out = {}
        for bi in range(b):
            for h in range(hk):
                heads = range(hq) if self.vote == "layer" else range(h * g, (h + 1) * g)
                votes = [0.0] * n
                for hh in heads:
                    s = [float(step.q[bi, hh, 0].double() @ step.k[bi, hh // g, t].double()) * step.scale
                         if _slow.real(step.key_valid, bi, t) else -math.inf for t in range(n)]
                    m = max(s)
                    z = sum(math.exp(x - m) for x in s)
                    for t in range(n):
                        votes[t] += math.exp(s[t] - m) / z
                f = _slow.first_real(step.key_valid, bi)
                forced = list(range(f, min(f + self.sink, n))) + list(range(max(n - self.recent, 0), n))
                out[bi, h] = set(_slow.top(votes, min(self.budget, n), forced))
        return out

    def token_scores(self, step: Step) -> torch.Tensor:
        """Soft-vote scores ``[b, 1 or hk, n]``: per-head softmax of ``q . k`` summed over heads."""
        s = torch.matmul(step.grouped_q(), step.k.float().transpose(-1, -2)) * step.scale  # [b, hk, g, n]
        if step.key_valid is not None:
            s = s.masked_fill(~step.key_valid[:, None, None, :], float("-inf"))
        p = s.softmax(-1).sum(2)  # [b, hk, n]
        return p.sum(1, keepdim=True) if self.vote == "layer" else p

    def select(self, step: Step):
        b, hk, n = step.k.shape[0], step.k.shape[1], step.n
        q = step.q[:, :, 0].float()  # [b, hq, d]
        st = step.state.get("token_select")
        if st is not None and self.threshold < 1.0:
            cos = torch.nn.functional.cosine_similarity(q, st.q, dim=-1).mean()
            if float(cos) >= self.threshold and n - st.n <= self.recent:
                new = torch.arange(st.n, n, device=q.device).expand(*st.idx.shape[:2], -1)
                st.hits += 1
                idx = torch.cat([st.idx, new], -1)
                return idx.expand(b, hk, -1) if idx.shape[1] == 1 else idx, None
        s = self.token_scores(step)
        kp = torch.arange(n, device=q.device)
        forced = sink_tokens(self.sink, step.key_valid, b, n, q.device)[:, None, :] | (kp >= n - self.recent)
        idx = top_with_forced(s, min(self.budget, n), forced)
        step.state["token_select"] = TokenSelectState(q, idx, n, st.hits if st else 0, (st.misses if st else 0) + 1)
        return (idx.expand(b, hk, -1) if idx.shape[1] == 1 else idx), None
