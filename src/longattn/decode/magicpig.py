"""MagicPIG: attention estimated by sampling keys with SimHash LSH, corrected by their sampling probability.

Paper: "MagicPIG: LSH Sampling for Efficient LLM Generation" (Chen et al., ICLR 2025,
https://arxiv.org/abs/2410.16179). At the end of prefill the keys (centred by their mean, per kv head: softmax is
shift invariant, and centring spreads them around the origin for the hash) get ``tables`` SimHash codes of
``bits`` random hyperplanes each. At each decode step the query is hashed with the same planes; a key is
*sampled* when its code equals the query's in at least ``min_match`` tables. With ``theta`` the angle between
the query and the centred key, one table collides with probability ``p = (1 - theta/pi)^bits`` and the key is
sampled with probability ``u = P(Binomial(tables, p) >= min_match)``. The attention is the self-normalised
importance-sampling estimate ``sum_S (e^{s_j}/u_j) v_j / sum_S e^{s_j}/u_j`` over the sampled keys, with the
first ``sink`` and last ``recent`` tokens attended exactly (weight 1) beside them, as the paper's static part.

Departures: the attention itself is computed here on the CPU, as the paper does (its setting is a GPU with the
keys on the CPU); the hash planes are seeded (``seed``), shared by the query heads of a kv head; keys appended
while decoding are hashed when they arrive and join the sampled part (the paper keeps them dense until the next
rebuild). ``budget`` is not a count here (the number sampled is random): it only bounds ``sink + recent``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..cache.state import DecodeState
from ..checks import check_int
from ..padding import sink_tokens
from ..registry import register
from .base import DecodeSelector, Step

__all__ = ["MagicPIG", "LSHState"]


@dataclass
class LSHState(DecodeState):
    """The hash planes ``[hk, d, tables * bits]``, the key mean ``[b, hk, 1, d]`` and the codes of the first
    ``n`` keys ``[b, hk, n, tables]`` (the smallest integer type that holds ``bits`` bits)."""

    planes: torch.Tensor
    mean: torch.Tensor
    codes: torch.Tensor


def simhash(x: torch.Tensor, planes: torch.Tensor, tables: int, bits: int) -> torch.Tensor:
    """``x [b, h, n, d]`` -> ``[b, h, n, tables]`` codes: per table, the sign bits of ``bits`` projections."""
    proj = torch.einsum("bhnd,hdp->bhnp", x.float(), planes) >= 0  # [b, h, n, tables * bits]
    weights = 2 ** torch.arange(bits, device=x.device)
    codes = (proj.view(*proj.shape[:-1], tables, bits).long() * weights).sum(-1)
    return codes.to(torch.int16 if bits <= 15 else torch.int32 if bits <= 31 else torch.int64)


def collisions(codes: torch.Tensor, qcodes: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """``[b, hk, g, n]``: tables in which each key's code equals each query head's (``codes [b, hk, n, T]``,
    ``qcodes [b, hk, g, T]``), in chunks of keys."""
    b, hk, n, _ = codes.shape
    out = torch.empty(b, hk, qcodes.shape[2], n, dtype=torch.int16, device=codes.device)
    for lo in range(0, n, chunk):
        c = codes[:, :, lo : lo + chunk]
        out[..., lo : lo + chunk] = (c[:, :, None] == qcodes[:, :, :, None]).sum(-1, dtype=torch.int16)
    return out


def sample_probability(cos: torch.Tensor, tables: int, bits: int, min_match: int) -> torch.Tensor:
    """``P(Binomial(tables, (1 - acos(cos)/pi)^bits) >= min_match)``."""
    p = (1.0 - torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi) ** bits
    below = torch.zeros_like(p)
    for i in range(min_match):
        below = below + math.comb(tables, i) * p**i * (1 - p) ** (tables - i)
    return (1.0 - below).clamp_min(1e-30)


@register("magicpig", "decode", paper="MagicPIG (Chen et al., ICLR 2025) https://arxiv.org/abs/2410.16179",
          summary="SimHash LSH sampling of keys, importance-weighted attention (+ exact sinks and recent)")
@dataclass(frozen=True)
class MagicPIG(DecodeSelector):
    """LSH-sampled attention with the importance-sampling correction."""

    examples = ({"bits": 3, "tables": 12, "min_match": 2, "sink": 4, "recent": 8},
                {"bits": 2, "tables": 6, "min_match": 1, "sink": 0, "recent": 16, "seed": 3})
    full_example = {"recent": 100000, "sink": 0}

    bits: int = 10
    tables: int = 150
    min_match: int = 2
    sink: int = 4
    recent: int = 64
    seed: int = 0
    budget: int = 100000

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.bits, "bits", 1, 62)
        check_int(self.tables, "tables", 1)
        check_int(self.min_match, "min_match", 1)
        check_int(self.sink, "sink", 0)
        check_int(self.recent, "recent", 0)
        check_int(self.seed, "seed", 0)
        if self.min_match > self.tables:
            raise ValueError(f"min_match ({self.min_match}) must not exceed tables ({self.tables})")

    def _state(self, step: Step) -> LSHState:
        st = step.state.get("magicpig")
        k = step.k
        b, hk, n, d = k.shape
        if st is None or st.codes.shape[2] > n or st.codes.shape[0] != b:
            g = torch.Generator().manual_seed(self.seed * 1000 + step.layer_idx)
            planes = torch.randn(hk, d, self.tables * self.bits, generator=g).to(k.device)
            kv = None if step.key_valid is None else step.key_valid[:, None, :, None].float()
            kf = k.float()
            mean = (kf.mean(2, keepdim=True) if kv is None
                    else (kf * kv).sum(2, keepdim=True) / kv.sum(2, keepdim=True).clamp_min(1))
            st = LSHState(planes, mean, simhash(kf - mean, planes, self.tables, self.bits))
        elif st.codes.shape[2] < n:
            new = simhash(k[:, :, st.codes.shape[2] :].float() - st.mean, st.planes, self.tables, self.bits)
            st = LSHState(st.planes, st.mean, torch.cat([st.codes, new], 2))
        step.state["magicpig"] = st
        return st

    def on_prefill(self, layer, layer_idx, q, k, key_valid) -> None:
        layer.decode_state.pop("magicpig", None)  # hashed at the first decode step, over the whole prompt

    def _parts(self, step: Step):
        """``(static [b, n] bool, sampled [b, hq, n] bool)``: the exact tokens and the LSH-sampled ones."""
        st = self._state(step)
        b, hq, _, d = step.q.shape
        hk, n = step.k.shape[1], step.n
        g = hq // hk
        kvh = torch.arange(hq, device=step.q.device) // g
        qh = simhash(step.q.float().view(b, hq, 1, d), st.planes[kvh], self.tables, self.bits)  # [b, hq, 1, T]
        sampled = collisions(st.codes, qh.view(b, hk, g, -1)).view(b, hq, n) >= self.min_match
        pos = torch.arange(n, device=step.q.device)
        static = sink_tokens(self.sink, step.key_valid, b, n, step.q.device) | (pos >= n - self.recent)[None]
        if step.key_valid is not None:
            static = static & step.key_valid.bool()
            sampled = sampled & step.key_valid.bool()[:, None]
        return static, sampled & ~static[:, None]

    def select(self, step: Step):
        static, sampled = self._parts(step)
        chosen = static[:, None] | sampled
        m = max(int(chosen.sum(-1).max()), 1)
        order = torch.sort(chosen.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :m]
        valid = torch.gather(chosen, 2, order)
        return order, valid

    def attend(self, step: Step, stats: dict | None = None) -> torch.Tensor:
        """The importance-weighted estimate over the chosen keys only (gathered per query head): logits ``s_j``
        (+ ``-log u_j`` for sampled keys), softmax over them (and the layer's sink), times the values."""
        import time

        from ..ops.core import capped

        t0 = time.perf_counter()
        static, sampled = self._parts(step)
        st = step.state["magicpig"]
        b, hq, _, d = step.q.shape
        hk, n = step.k.shape[1], step.n
        kvh = torch.arange(hq, device=step.q.device) // (hq // hk)
        chosen = static[:, None] | sampled
        m = max(int(chosen.sum(-1).max()), 1)
        idx = torch.sort(chosen.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :m]
        ok = torch.gather(chosen, 2, idx)
        is_sampled = torch.gather(sampled, 2, idx)
        kvi = kvh.view(1, hq, 1).expand(b, hq, m)
        kk = step.k[torch.arange(b).view(b, 1, 1), kvi, idx].float()  # [b, hq, m, d]
        vv = step.v[torch.arange(b).view(b, 1, 1), kvi, idx].float()
        qf = step.q[:, :, 0].float()
        kc = kk - st.mean[:, kvh]  # [b, hq, 1, d]
        cos = torch.einsum("bhd,bhmd->bhm", qf, kc) / (qf.norm(dim=-1, keepdim=True) * kc.norm(dim=-1)).clamp_min(1e-12)
        u = sample_probability(cos, self.tables, self.bits, self.min_match)
        if stats is not None:
            stats["select_s"] = stats.get("select_s", 0.0) + time.perf_counter() - t0
            stats["selected"] = stats.get("selected", 0) + int(ok.sum())
            stats["possible"] = stats.get("possible", 0) + b * hq * n
        s = capped(torch.einsum("bhd,bhmd->bhm", qf, kk) * step.scale, step.softcap)
        s = torch.where(is_sampled, s - torch.log(u), s).masked_fill(~ok, float("-inf"))
        if step.sinks is not None:
            s = torch.cat([s, step.sinks.float().view(1, hq, 1).expand(b, hq, 1)], -1)
            p = s.softmax(-1)[..., :m]
        else:
            p = s.softmax(-1)
        out = torch.einsum("bhm,bhmd->bhd", p.nan_to_num(0.0), vv)
        return out.view(b, hq, 1, d).to(step.q.dtype)

    def reference_select(self, step: Step, prefill_q=None) -> dict:
        """Loop by loop: the same seeded planes; each key's sign bits per table (centred by the real keys' mean),
        the query's, the tables where all ``bits`` agree; sampled when at least ``min_match`` agree; plus the
        first ``sink`` real tokens and the last ``recent``."""
        b, hq = step.q.shape[:2]
        hk, n, d = step.k.shape[1], step.n, step.q.shape[-1]
        g = hq // hk
        gen = torch.Generator().manual_seed(self.seed * 1000 + step.layer_idx)
        planes = torch.randn(hk, d, self.tables * self.bits, generator=gen)
        out = {}
        for bi in range(b):
            real = [j for j in range(n) if step.key_valid is None or bool(step.key_valid[bi, j])]
            for h in range(hq):
                kh = h // g
                mean = [sum(float(step.k[bi, kh, j, t]) for j in real) / len(real) for t in range(d)]

                def bits_of(vec, kh=kh):
                    return [[sum(vec[t] * float(planes[kh, t, tb * self.bits + c]) for t in range(d)) >= 0
                             for c in range(self.bits)] for tb in range(self.tables)]

                qb = bits_of([float(x) for x in step.q[bi, h, 0]])
                chosen = set(real[: self.sink]) | {j for j in real if j >= n - self.recent}
                for j in real:
                    kb = bits_of([float(step.k[bi, kh, j, t]) - mean[t] for t in range(d)])
                    if sum(1 for tb in range(self.tables) if kb[tb] == qb[tb]) >= self.min_match:
                        chosen.add(j)
                out[bi, h] = chosen
        return out
