"""Novelty (ours): keep the tokens whose value vectors are rare in the context, plus sinks and recent tokens.

Idea, invented and measured here (not from a paper): long contexts are redundant (repeated boilerplate,
filler, code idioms), and a question-agnostic policy cannot know what will be asked, so it should keep what
is *unusual*. Values carry no rotary position, so repeated content gives near-identical value vectors at
different positions. Each kv head hashes its (centered, normalized) values with ``bits`` random hyperplanes
(SimHash LSH); a token's score is ``-log(size of its bucket)``: a token repeated 50 times shares its bucket
with 49 others, a one-off token (a pass key, a name, a number) is alone. Ties go to the more recent token,
``n_sink`` first tokens and ``recent`` last tokens are always kept. Cost: one ``[n, d] x [d, bits]`` matmul and
a bincount per head; no attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register
from .base import KVPolicy

__all__ = ["Novelty"]


@register("novelty", "kv", paper="ours (LSH rarity of value vectors), see docstring",
          summary="question-agnostic: keep rare value vectors (SimHash buckets) + sinks + recent")
@dataclass(frozen=True)
class Novelty(KVPolicy):
    """Rare values first."""

    bits: int = 12
    n_sink: int = 4
    recent: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 24:
            raise ValueError(f"bits must be an int in [1, 24], got {self.bits!r}")
        for name in ("n_sink", "recent"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")

    def score(self, q, k, v, key_valid, module=None) -> torch.Tensor:
        b, hk, n, d = v.shape
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        planes = torch.randn(d, self.bits, generator=g).to(v.device)
        x = v.float()
        ok = None if key_valid is None else key_valid.to(torch.bool)[:, None, :, None]
        if ok is not None:
            mean = (x * ok).sum(2, keepdim=True) / ok.sum(2, keepdim=True).clamp_min(1)
        else:
            mean = x.mean(2, keepdim=True)
        x = torch.nn.functional.normalize(x - mean, dim=-1)
        code = ((x @ planes) > 0).long()  # [b, hk, n, bits]
        h = (code << torch.arange(self.bits, device=v.device)).sum(-1)  # bucket id
        if key_valid is not None:  # padded keys go to a bucket of their own
            h = torch.where(key_valid.to(torch.bool)[:, None, :], h, torch.full_like(h, 1 << self.bits))
        counts = torch.zeros(b, hk, (1 << self.bits) + 1, device=v.device)
        counts.scatter_add_(-1, h, torch.ones_like(h, dtype=counts.dtype))
        size = torch.gather(counts, -1, h)
        pos = torch.arange(n, device=v.device, dtype=torch.float32)
        s = -torch.log(size) + 1e-3 * pos / n  # rarer first, then more recent
        top = float(s.max()) + 1.0
        first = 0 if key_valid is None else None
        if first is None:
            rel = pos[None, :] - (~key_valid.to(torch.bool)).sum(-1, keepdim=True).float()  # [b, n]
        else:
            rel = pos[None, :].expand(b, n)
        sink = (rel >= 0) & (rel < self.n_sink)
        s = torch.where(sink[:, None, :], torch.full_like(s, top + 1.0), s)
        r = min(self.recent, n)
        if r:
            s[..., n - r :] = top + torch.arange(r, device=v.device, dtype=torch.float32) / max(r, 1)
        return s
