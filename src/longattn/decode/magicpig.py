"""MagicPIG: attention estimated by sampling keys with SimHash LSH, corrected by their sampling probability.

Paper: "MagicPIG: LSH Sampling for Efficient LLM Generation" (Chen et al., ICLR 2025,
https://arxiv.org/abs/2410.16179). At the end of prefill the keys (centred by their mean, per kv head: softmax is
shift invariant, and centring spreads them around the origin for the hash; the mean of the keys the tables were
built over) get ``tables`` SimHash codes of ``bits`` random hyperplanes each. At each decode step the query is hashed with the same planes; a key is
*sampled* when its code equals the query's in at least ``min_match`` tables. The tables are real hash tables (per
table, the key ids sorted by code and each bucket's offset): a step reads only the query's bucket of each table,
``tables * n / 2^bits`` entries per query head, not every key's codes. With ``theta`` the angle between
the query and the centred key, one table collides with probability ``p = (1 - theta/pi)^bits`` and the key is
sampled with probability ``u = P(Binomial(tables, p) >= min_match)``. The attention is the self-normalised
importance-sampling estimate ``sum_S (e^{s_j}/u_j) v_j / sum_S e^{s_j}/u_j`` over the sampled keys, with the
first ``sink`` and last ``recent`` tokens attended exactly (weight 1) beside them, as the paper's static part.

Departures: the attention itself is computed here on the CPU, as the paper does (its setting is a GPU with the
keys on the CPU); the hash planes are seeded (``seed``), shared by the query heads of a kv head; keys appended
while decoding are hashed when they arrive and join the sampled part (the paper keeps them dense until the next
rebuild): they are compared code by code until ``TAIL_MAX`` of them, then folded into the tables. ``budget`` is
not a count here (the number sampled is random): it only bounds ``sink + recent``. ``bits`` is at most 16 (a
table has ``2^bits`` buckets; the paper uses 8-10).
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
    """The hash planes ``[hk, d, tables * bits]``, the key mean ``[b, hk, 1, d]``, the hash tables of the first
    ``n0`` keys — ``order [b, hk, tables, n0]`` (int32 key ids sorted by their code in each table) and
    ``offsets [b, hk, tables, 2^bits + 1]`` (int32: where each bucket starts in ``order``) — and the codes of the
    keys that arrived later, ``tail [b, hk, t, tables]``, compared one by one until they are folded in."""

    planes: torch.Tensor
    mean: torch.Tensor
    order: torch.Tensor
    offsets: torch.Tensor
    tail: torch.Tensor

    @property
    def n_keys(self) -> int:
        return self.order.shape[-1] + self.tail.shape[2]


def _code_dtype(bits: int) -> torch.dtype:
    return torch.int16 if bits <= 15 else torch.int32


def simhash(x: torch.Tensor, planes: torch.Tensor, tables: int, bits: int, chunk: int = 4096) -> torch.Tensor:
    """``x [b, h, n, d]`` -> ``[b, h, n, tables]`` codes: per table, the sign bits of ``bits`` projections (in
    chunks of ``chunk`` rows, so that the ``tables * bits`` projections of a long prompt never sit in memory)."""
    weights = 2.0 ** torch.arange(bits, device=x.device)  # exact in float32 up to 2^24
    out = torch.empty(*x.shape[:-1], tables, dtype=_code_dtype(bits), device=x.device)
    for lo in range(0, x.shape[2], chunk):
        proj = torch.einsum("bhnd,hdp->bhnp", x[:, :, lo : lo + chunk].float(), planes) >= 0
        out[:, :, lo : lo + chunk] = proj.view(*proj.shape[:-1], tables, bits).float() @ weights
    return out


def build_tables(codes: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hash tables of ``codes [b, hk, n, T]``: ``(order [b, hk, T, n] int32, offsets [b, hk, T, 2^bits + 1]
    int32)``, the keys of bucket ``c`` of table ``t`` being ``order[..., t, offsets[c] : offsets[c + 1]]``."""
    b, hk, n, T = codes.shape
    by_table = codes.transpose(2, 3).contiguous()  # [b, hk, T, n]
    order = torch.argsort(by_table, dim=-1).to(torch.int32)  # the order inside a bucket does not matter
    by_table = by_table.long()
    nb = 2**bits
    rows = torch.arange(b * hk * T, device=codes.device).view(b, hk, T, 1) * nb
    counts = torch.bincount((rows + by_table).reshape(-1), minlength=b * hk * T * nb).view(b, hk, T, nb)
    offsets = torch.zeros(b, hk, T, nb + 1, dtype=torch.int32, device=codes.device)
    offsets[..., 1:] = counts.cumsum(-1)
    return order, offsets


def table_codes(offsets: torch.Tensor) -> torch.Tensor:
    """The code of every entry of ``order`` (``[b, hk, T, n]``), read back from the bucket offsets."""
    sizes = offsets.diff(dim=-1).long()  # [b, hk, T, nb]
    nb = sizes.shape[-1]
    codes = torch.arange(nb, device=offsets.device).expand_as(sizes).reshape(-1)
    return codes.repeat_interleave(sizes.reshape(-1)).view(*sizes.shape[:-1], -1)


def collisions(codes: torch.Tensor, qcodes: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """``[b, hk, g, n]``: tables in which each key's code equals each query head's (``codes [b, hk, n, T]``,
    ``qcodes [b, hk, g, T]``), in chunks of keys: the brute-force count (the reference of the hash tables)."""
    b, hk, n, _ = codes.shape
    out = torch.empty(b, hk, qcodes.shape[2], n, dtype=torch.int16, device=codes.device)
    for lo in range(0, n, chunk):
        c = codes[:, :, lo : lo + chunk]
        out[..., lo : lo + chunk] = (c[:, :, None] == qcodes[:, :, :, None]).sum(-1, dtype=torch.int16)
    return out


def lookup(order: torch.Tensor, offsets: torch.Tensor, qcodes: torch.Tensor) -> torch.Tensor:
    """Collision counts ``[b, hk, g, n0]`` of every query head's codes ``qcodes [b, hk, g, T]`` with the indexed
    keys, by reading only the query's bucket of each table (``n0 / 2^bits`` keys per table on average)."""
    b, hk, T, n0 = order.shape
    g = qcodes.shape[2]
    q = qcodes.long().permute(0, 1, 3, 2)  # [b, hk, T, g]
    start = torch.gather(offsets, 3, q).long()
    size = torch.gather(offsets, 3, q + 1).long() - start  # [b, hk, T, g]
    flat_sizes = size.reshape(-1)
    total = int(flat_sizes.sum())
    counts = torch.zeros(b * hk * g * n0, dtype=torch.int32, device=order.device)
    if total == 0:
        return counts.view(b, hk, g, n0)
    row = torch.arange(b * hk * T, device=order.device).view(b, hk, T, 1).expand(b, hk, T, g)
    base = (row * n0 + start).reshape(-1)  # where each (table, head) bucket starts in the flat order
    first = torch.cumsum(flat_sizes, 0) - flat_sizes
    within = torch.arange(total, device=order.device) - first.repeat_interleave(flat_sizes)
    keys = order.reshape(-1)[base.repeat_interleave(flat_sizes) + within].long()
    head = (torch.arange(b * hk, device=order.device).view(b, hk, 1, 1) * g
            + torch.arange(g, device=order.device).view(1, 1, 1, g)).expand(b, hk, T, g).reshape(-1)
    counts.index_add_(0, head.repeat_interleave(flat_sizes) * n0 + keys,
                      torch.ones(total, dtype=torch.int32, device=order.device))
    return counts.view(b, hk, g, n0)


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
        check_int(self.bits, "bits", 1, 16, "each hash table has 2^bits buckets")
        check_int(self.tables, "tables", 1)
        check_int(self.min_match, "min_match", 1)
        check_int(self.sink, "sink", 0)
        check_int(self.recent, "recent", 0)
        check_int(self.seed, "seed", 0)
        if self.min_match > self.tables:
            raise ValueError(f"min_match ({self.min_match}) must not exceed tables ({self.tables})")

    def _state(self, step: Step) -> LSHState:
        return self._sync(step.state, step.k, step.key_valid, step.layer_idx)

    def _sync(self, states: dict, k: torch.Tensor, key_valid, layer_idx: int) -> LSHState:
        """The layer's hash tables over its keys ``k [b, hk, n, d]``: built over all of them the first time (or
        when tokens were removed), else the keys that arrived since are hashed and added."""
        st = states.get("magicpig")
        b, hk, n, d = k.shape
        if st is None or st.n_keys > n or st.order.shape[0] != b:
            g = torch.Generator().manual_seed(self.seed * 1000 + layer_idx)
            planes = torch.randn(hk, d, self.tables * self.bits, generator=g).to(k.device)
            kv = None if key_valid is None else key_valid[:, None, :, None].float()
            kf = k.float()
            mean = (kf.mean(2, keepdim=True) if kv is None
                    else (kf * kv).sum(2, keepdim=True) / kv.sum(2, keepdim=True).clamp_min(1))
            order, offsets = build_tables(simhash(kf - mean, planes, self.tables, self.bits), self.bits)
            st = LSHState(planes, mean, order, offsets, order.new_zeros(b, hk, 0, self.tables, dtype=_code_dtype(
                self.bits)))
        elif st.n_keys < n:  # keys decoded since: hashed on arrival, kept apart until there are many
            new = simhash(k[:, :, st.n_keys :].float() - st.mean, st.planes, self.tables, self.bits)
            st.tail = torch.cat([st.tail, new], 2)
            if st.tail.shape[2] >= self.TAIL_MAX:
                st = self._fold(st)
        states["magicpig"] = st
        return st

    #: decoded keys looked up by brute force before they are folded into the hash tables
    TAIL_MAX = 1024

    def _fold(self, st: LSHState) -> LSHState:
        """The tables rebuilt over the indexed keys and the tail (the indexed keys' codes read back from the
        tables: no key is hashed twice)."""
        b, hk, T, n0 = st.order.shape
        codes = torch.empty(b, hk, T, n0, dtype=st.tail.dtype, device=st.tail.device)
        codes.scatter_(3, st.order.long(), table_codes(st.offsets).to(st.tail.dtype))
        codes = torch.cat([codes.permute(0, 1, 3, 2), st.tail], 2)
        order, offsets = build_tables(codes, self.bits)
        return LSHState(st.planes, st.mean, order, offsets, st.tail[:, :, :0])

    def on_prefill(self, layer, layer_idx, q, k, key_valid) -> None:
        """The tables are built at the end of the prefill, as in the paper (their cost is the prefill's), and
        extended by later multi-token forwards (the question)."""
        self._sync(layer.decode_state, k, key_valid, layer_idx)

    def _chosen(self, step: Step):
        """``(idx [b, hq, m], ok [b, hq, m], is_sampled [b, hq, m])``: per query head the exact tokens (the
        first ``sink`` real ones and the last ``recent``) and the LSH-sampled ones (``min_match`` collisions),
        padded to the longest head's count."""
        st = self._state(step)
        b, hq, _, d = step.q.shape
        hk, n = step.k.shape[1], step.n
        g = hq // hk
        dev = step.q.device
        kvh = torch.arange(hq, device=dev) // g
        qh = simhash(step.q.float().view(b, hq, 1, d), st.planes[kvh], self.tables, self.bits)  # [b, hq, 1, T]
        qg = qh.view(b, hk, g, -1)
        hits = lookup(st.order, st.offsets, qg)
        if st.tail.shape[2]:
            hits = torch.cat([hits, collisions(st.tail, qg).int()], 3)
        sampled = hits.view(b, hq, n) >= self.min_match
        pos = torch.arange(n, device=dev)
        static = sink_tokens(self.sink, step.key_valid, b, n, dev) | (pos >= n - self.recent)[None]
        if step.key_valid is not None:
            static = static & step.key_valid.bool()
            sampled = sampled & step.key_valid.bool()[:, None]
        sampled = sampled & ~static[:, None]
        chosen = static[:, None] | sampled  # [b, hq, n]
        cnt = chosen.sum(-1)
        m = max(int(cnt.max()), 1)
        bi, hi, ki = chosen.nonzero(as_tuple=True)  # sorted by (batch, head, key)
        row = bi * hq + hi
        start = torch.cumsum(cnt.view(-1), 0) - cnt.view(-1)
        col = torch.arange(ki.numel(), device=dev) - start[row]
        idx = torch.zeros(b * hq, m, dtype=torch.long, device=dev)
        ok = torch.zeros(b * hq, m, dtype=torch.bool, device=dev)
        is_s = torch.zeros(b * hq, m, dtype=torch.bool, device=dev)
        idx[row, col] = ki
        ok[row, col] = True
        is_s[row, col] = sampled[bi, hi, ki]
        return idx.view(b, hq, m), ok.view(b, hq, m), is_s.view(b, hq, m)

    def select(self, step: Step):
        idx, ok, _ = self._chosen(step)
        return idx, ok

    def attend(self, step: Step, stats: dict | None = None) -> torch.Tensor:
        """The importance-weighted estimate over the chosen keys only (gathered per query head): logits ``s_j``
        (+ ``-log u_j`` for sampled keys), softmax over them (and the layer's sink), times the values."""
        import time

        from ..ops.core import capped
        from ..ops.decode import gather_rows

        t0 = time.perf_counter()
        idx, ok, is_sampled = self._chosen(step)
        st = step.state["magicpig"]
        b, hq, _, d = step.q.shape
        hk, n = step.k.shape[1], step.n
        m = idx.shape[-1]
        kvh = torch.arange(hq, device=step.q.device) // (hq // hk)
        kk = gather_rows(step.k, idx, kvh).float()  # [b, hq, m, d]: one index_select (no copy of the cache)
        vv = gather_rows(step.v, idx, kvh).float()
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
