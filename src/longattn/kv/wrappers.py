"""Wrappers: query-aware compression, chunked prefill compression, composition of two policies."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int
from ..registry import register
from .base import KVPolicy, Wrapper, inner_policy, valid_lengths

__all__ = ["QueryAware", "Chunked", "Compose"]


@register("query_aware", "kv", paper="SnapKV's setting (Li et al., 2024) https://arxiv.org/abs/2404.14469",
          summary="compress after the question is seen (bench protocol), with the inner policy")
@dataclass(frozen=True)
class QueryAware(Wrapper):
    """Compress after the question (the inner policy's observation window then holds the question).

    With ``model.generate`` the prompt already contains the question, so this equals the inner policy; in
    ``longattn bench`` it changes the protocol: context + question + answer prefix are prefilled together and
    compressed, and records say ``protocol: query_aware``.
    """

    query_aware = True


@register("chunked", "kv", paper="kvpress ChunkPress / chunked prefill",
          summary="prefill in chunks, compressing each chunk as it arrives (bounded peak memory)")
@dataclass(frozen=True)
class Chunked(Wrapper):
    """Prefill ``chunk`` tokens at a time and compress each chunk's tokens with the inner policy right after
    it, so the cache never holds more than the kept tokens plus one chunk. ``apply()`` sets
    ``generation_config.prefill_chunk_size`` so that ``model.generate`` prefills in chunks (restored on exit);
    the bench feeds the context chunk by chunk. Departure from a one-shot policy: each chunk is scored by its
    own queries (its observation window is the chunk's end)."""

    chunk: int = 1024
    repeat = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.chunk, "chunk", 16, hint="tokens")


@register("compose", "kv", paper="kvpress ComposedPress", summary="apply two policies one after the other")
@dataclass(frozen=True)
class Compose(KVPolicy):
    """``first`` keeps ``int(n * (1 - r1))`` tokens with ``(1 - r1) = sqrt(1 - ratio)``; ``second`` scores
    those survivors (in their order: position-based scorers see them compacted) and keeps exactly
    ``int(n * (1 - ratio))`` of them, so the composition removes ``ratio`` of the cache."""

    first: str = "knorm"
    second: str = "snapkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        part = 1.0 - (1.0 - self.ratio) ** 0.5
        object.__setattr__(self, "_a", inner_policy(self.first, part))
        object.__setattr__(self, "_b", inner_policy(self.second, part))
        for name, p in (("first", self._a), ("second", self._b)):
            if type(p).keep is not KVPolicy.keep:
                raise ValueError(f"compose: {name}={p.name!r} chooses its own budgets; compose scorers only "
                                 "(snapkv, knorm, tova, h2o, streaming_llm, random, novelty)")

    def prepare(self, model) -> None:
        self._a.prepare(model)
        self._b.prepare(model)

    def score(self, q, k, v, key_valid, module=None):  # pragma: no cover - keep() is overridden
        raise NotImplementedError

    def keep(self, q, k, v, key_valid=None, module=None, layer_idx: int = 0, num_layers: int = 1):
        b, hk, n, d = k.shape
        idx_a, len_a = self._a.keep(q, k, v, key_valid, module, layer_idx, num_layers)
        valid = valid_lengths(k, key_valid)
        want = torch.clamp((valid.double() * (1 - self.ratio)).floor().long(), min=1)
        rows_idx, rows_len = [], []
        for bi in range(b):  # rows may keep different numbers (left padding); heads of a row keep the same
            m = int(len_a[bi, 0])
            ia = idx_a[bi : bi + 1, :, :m]
            g = ia.unsqueeze(-1).expand(-1, -1, -1, d)
            k2, v2 = torch.gather(k[bi : bi + 1], 2, g), torch.gather(v[bi : bi + 1], 2, g)
            # the second scores the survivors; keep exactly the composed budget int(n_valid * (1 - ratio))
            scores_b = self._b.score(q[bi : bi + 1], k2, v2, None, module).float()
            idx_b, len_b = self.top(scores_b, torch.full((1, hk), min(int(want[bi]), m), device=k.device))
            rows_idx.append(torch.gather(ia, -1, idx_b)[0])
            rows_len.append(len_b[0])
        width = max(r.shape[-1] for r in rows_idx)
        idx = torch.stack([torch.nn.functional.pad(r, (0, width - r.shape[-1])) for r in rows_idx])
        return idx, torch.stack(rows_len)
