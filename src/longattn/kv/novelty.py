"""Novelty (ours): keep the tokens whose value vectors are rare in the context, plus sinks and recent tokens.

Idea, invented and measured here (not from a paper): long contexts are redundant (repeated boilerplate,
filler, code idioms), and a question-agnostic policy cannot know what will be asked, so it should keep what
is *unusual*. Values carry no rotary position, so repeated content gives near-identical value vectors at
different positions. Each kv head compares every (centered, normalized) value with a random reference sample
of ``ref`` values of the context; a token's redundancy is the mean of its ``k`` highest cosine similarities
to the sample (a k-nearest-neighbour density estimate): a phrase repeated 50 times finds k near copies, a
one-off token (a pass key, a name, a number) does not, even when it occurs twice. Score = -redundancy; the
``sink`` first and ``recent`` last tokens are always kept. Cost: ``n x ref`` dot products per head, linear in
``n``; no attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int
from ..registry import register
from .base import KVPolicy

__all__ = ["Novelty"]


@register("novelty", "kv", paper="ours (kNN rarity of value vectors), see docstring",
          summary="question-agnostic: keep rare value vectors (kNN vs a context sample) + sinks + recent")
@dataclass(frozen=True)
class Novelty(KVPolicy):
    """Rare values first."""

    renamed = {"n_sink": "sink"}  # old spellings, accepted with a FutureWarning

    examples = ({"recent": 8},)

    ref: int = 256
    k: int = 8
    sink: int = 4
    recent: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, lo in (("ref", 8), ("k", 1), ("sink", 0), ("recent", 0)):
            check_int(getattr(self, name), name, lo)
        if self.k > self.ref:
            raise ValueError(f"k must be <= ref, got k={self.k}, ref={self.ref}")

    def reference_scores(self, q, k, v, key_valid=None, module=None):
        """Loop by loop: values centred on the row's real mean and normalised; the reference sample drawn as the
        policy draws it (the seeded sample is part of the definition); redundancy of token j = mean of its ``k``
        highest cosines to the sample (itself excluded); score = -redundancy, then the ``sink`` first real and
        the ``recent`` last tokens always kept."""
        b, hk, n, d = v.shape
        w = torch.ones(b, n) if key_valid is None else key_valid.float().cpu()
        m = max(1, min(self.ref, int(w.sum(-1).min())))
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        pick = torch.multinomial(w + 1e-9, m, replacement=False, generator=g)  # [b, m], as the policy draws it
        out = torch.zeros(b, hk, n, dtype=torch.float64)
        for bi in range(b):
            real = [j for j in range(n) if key_valid is None or bool(key_valid[bi, j])]
            for h in range(hk):
                mean = sum(v[bi, h, j].double() for j in real) / len(real)
                unit = []
                for j in range(n):
                    x = v[bi, h, j].double() - mean
                    unit.append(x / max(float(x.norm()), 1e-12))
                for j in range(n):
                    sims = sorted((float(unit[j] @ unit[t]) if t != j else -1.0 for t in pick[bi].tolist()),
                                  reverse=True)
                    out[bi, h, j] = -sum(sims[: min(self.k, m)]) / min(self.k, m) + 1e-4 * j / n
                for rank, j in enumerate(real[: self.sink]):
                    out[bi, h, j] = 2e9 + rank
                for t, j in enumerate(range(n - min(self.recent, n), n)):
                    out[bi, h, j] = 1e9 + t
        return out

    def score(self, q, k, v, key_valid, module=None) -> torch.Tensor:
        b, hk, n, d = v.shape
        x = v.float()
        ok = None if key_valid is None else key_valid.to(torch.bool)[:, None, :, None]
        if ok is not None:
            mean = (x * ok).sum(2, keepdim=True) / ok.sum(2, keepdim=True).clamp_min(1)
        else:
            mean = x.mean(2, keepdim=True)
        x = torch.nn.functional.normalize(x - mean, dim=-1)
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        # the reference sample: random valid positions of each row (same sample for every head)
        w = torch.ones(b, n) if key_valid is None else key_valid.float().cpu()
        m = max(1, min(self.ref, int(w.sum(-1).min())))
        pick = torch.multinomial(w + 1e-9, m, replacement=False, generator=g).to(v.device)  # [b, m]
        refv = torch.gather(x, 2, pick[:, None, :, None].expand(b, hk, m, d))  # [b, hk, m, d]
        sim = x @ refv.transpose(-1, -2)  # [b, hk, n, m]
        # a token is not its own neighbour
        self_hit = pick[:, None, None, :] == torch.arange(n, device=v.device)[None, None, :, None]
        sim = sim.masked_fill(self_hit, -1.0)
        kk = min(self.k, m)
        redundancy = sim.topk(kk, dim=-1).values.mean(-1)  # [b, hk, n]
        pos = torch.arange(n, device=v.device, dtype=torch.float32)
        s = -redundancy + 1e-4 * pos / n  # rarer first, then more recent
        top = float(s.max()) + 1.0
        if key_valid is not None:  # positions relative to each row's first real token (left padding)
            rel = pos[None, :] - (~key_valid.to(torch.bool)).sum(-1, keepdim=True).float()  # [b, n]
        else:
            rel = pos[None, :].expand(b, n)
        sink = (rel >= 0) & (rel < self.sink)
        s = torch.where(sink[:, None, :], torch.full_like(s, top + 1.0), s)
        r = min(self.recent, n)
        if r:
            s[..., n - r :] = top + torch.arange(r, device=v.device, dtype=torch.float32) / max(r, 1)
        return s
