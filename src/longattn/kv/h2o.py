"""H2O: keep the heavy hitters, the keys that received the most attention during prefill.

Paper: "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models" (Zhang et al.,
NeurIPS 2023, https://arxiv.org/abs/2306.14048). Score of key j = attention it received, summed over all
prefill queries, divided by the number of queries that can see it (as kvpress's ``ObservedAttentionPress``;
the paper sums without normalising, which favours early tokens), averaged over the query heads of its GQA
group. The paper's greedy eviction while generating is ``decode_budget=B``: each decode step adds its
attention to the kept tokens' scores, and once a kv head holds more than ``B`` tokens the lowest-scored one
goes (the ``recent`` newest are protected; at least 1). Departures: the prefill compression uses the
normalised mean and decoding adds raw per-step attention to it; the attention is recomputed in float32 chunks
of queries, so H2O's prefill costs about one extra attention pass of the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int
from ..registry import register
from .base import KVPolicy, attention_to_keys, slow_probs

__all__ = ["H2O"]


@register("h2o", "kv", paper="H2O (Zhang et al., NeurIPS 2023) https://arxiv.org/abs/2306.14048",
          summary="heavy hitters: mean attention received over all prefill queries")
@dataclass(frozen=True)
class H2O(KVPolicy):
    """Accumulated (observed) attention of every prefill query."""

    renamed = {"n_recent": "recent"}  # old spellings, accepted with a FutureWarning

    kvpress_press = "ObservedAttentionPress"
    examples = ({}, {"recent": 8})

    recent: int = 0  # recent tokens always kept (the paper keeps a recent window besides the heavy hitters)
    decode_budget: int = 0  # > 0: evict while generating so that each kv head holds at most this many tokens

    def kvpress_kwargs(self) -> dict | None:
        return None if self.recent or self.decode_budget else {}  # ObservedAttentionPress has neither

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.recent, "recent", 0)
        check_int(self.decode_budget, "decode_budget", 0, hint="0: no eviction while generating")
        if self.decode_budget and self.decode_budget <= max(self.recent, 1):
            raise ValueError(f"decode_budget must exceed recent ({self.recent}), got {self.decode_budget}")

    @property
    def is_noop(self) -> bool:
        return self.ratio == 0.0 and not self.decode_budget

    @property
    def acts_at_decode(self) -> bool:
        return bool(self.decode_budget)

    def compress_layer(self, layer, q, k, v, key_valid, module=None, layer_idx: int = 0, num_layers: int = 1) -> None:
        """With ``decode_budget``: the kept tokens' scores seed the accumulator that decoding adds to."""
        if not self.decode_budget:
            return super().compress_layer(layer, q, k, v, key_valid, module, layer_idx, num_layers)
        sc = self.score(q, k, v, key_valid, module).float()
        idx, lengths = self.keep(q, k, v, key_valid, module, layer_idx, num_layers, scores=sc)
        if self.ratio == 0.0:
            idx = torch.arange(k.shape[2], device=idx.device).expand(*k.shape[:2], -1)
            lengths = torch.full(k.shape[:2], k.shape[2], device=idx.device)
        layer.compress(idx, lengths)
        if layer.prefix is not None:
            raise ValueError("h2o decode_budget: rows keep different numbers of tokens (padding); use batch 1 "
                             "or equal lengths")
        layer.scores = torch.gather(sc, -1, idx[..., : layer.physical_len])

    def decode_attend(self, layer, q, key_valid, scale, features=None, module=None):
        """One decode step that also adds each kept token's attention to its score, then evicts down to
        ``decode_budget`` (the ``recent`` newest, at least 1, protected)."""
        from ..ops.core import capped

        b, hq, _, d = q.shape
        hk = layer.keys.shape[1]
        g = hq // hk
        kv_phys = layer.physical_key_valid(key_valid)
        softcap = getattr(features, "softcap", None)
        sinks = getattr(features, "sinks", None)
        s = capped(torch.matmul(q.reshape(b, hk, g, d).float(), layer.keys.float().transpose(-1, -2)) * scale, softcap)
        if kv_phys is not None:
            s = s.masked_fill(~kv_phys[:, None, None, :], float("-inf"))
        n = s.shape[-1]
        if sinks is not None:  # a sink takes its share of the row (and of no token's score)
            s = torch.cat([s, sinks.float().view(1, hk, g, 1).expand(b, hk, g, 1)], -1)
        p = s.softmax(-1)[..., :n]  # [b, hk, g, physical]: the step's attention, kept for the scores
        out = torch.matmul(p, layer.values.float())
        if layer.scores is not None:
            prev = layer.scores
            pad = p.shape[-1] - prev.shape[-1]  # tokens appended since the last step start at 0
            layer.scores = torch.nn.functional.pad(prev, (0, pad)) + p.mean(2)
            layer.evict(self.decode_budget, max(self.recent, 1))
        return out.reshape(b, hq, 1, d).to(q.dtype)

    def reference_scores(self, q, k, v, key_valid=None, module=None):
        """Loop by loop: the attention key j receives from every real query that can see it, summed over those
        queries and the kv head's query heads, divided by (queries x heads); the ``recent`` newest always kept."""
        b, hq, nq, _ = q.shape
        hk, n = k.shape[1], k.shape[2]
        g = hq // hk
        out = torch.zeros(b, hk, n, dtype=torch.float64)
        for bi in range(b):
            for h in range(hk):
                acc, seen = [0.0] * n, [0] * n
                for i in range(nq):
                    if key_valid is not None and not bool(key_valid[bi, i + n - nq]):
                        continue  # a padded query does not vote
                    for hh in range(h * g, (h + 1) * g):
                        probs = slow_probs(q, k, key_valid, bi, hh, i, module)
                        for j, p in probs.items():
                            acc[j] += p
                            seen[j] += hh == h * g  # queries that can see j, counted once per query
                for j in range(n):
                    out[bi, h, j] = acc[j] / (g * max(seen[j], 1))
                for t, j in enumerate(range(n - min(self.recent, n), n)):
                    out[bi, h, j] = 1e9 + t
        return out

    def score(self, q, k, v, key_valid, module=None) -> torch.Tensor:
        s = attention_to_keys(q, k, key_valid, module=module)
        if self.recent:
            n = k.shape[2]
            r = min(self.recent, n)
            s[..., n - r :] = s.amax() + 1.0 + torch.arange(r, device=s.device, dtype=s.dtype)
        return s
