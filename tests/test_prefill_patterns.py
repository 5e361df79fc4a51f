"""Every prefill pattern against a slow, obviously-right reference of the token pairs it claims, and against
``reference.py`` for its output; full budgets equal dense attention; bad settings raise ValueError by name."""

import json
import math

import pytest
import torch

import longattn
from longattn import attention_recall, reference
from longattn.layout import BlockLayout
from longattn.prefill import (
    BilevelRouting,
    BlockTopK,
    CoreContext,
    Hierarchical,
    LinearEstimate,
    LongRangeGrouping,
    LowBitTopK,
    Mixed,
    Neighborhood,
    ShiftedGroups,
    SinkWindow,
    StridedWindow,
    TriShape,
    VerticalSlash,
)
from longattn.prefill.linear_estimate import _orthogonal_gaussian

BS = 16


def _qkv(b=2, hq=4, hk=2, nq=150, nk=150, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g)
    k = torch.randn(b, hk, nk, d, generator=g)
    v = torch.randn(b, hk, nk, d, generator=g)
    return q, k, v


def _padding(b, n, pad=23):
    kv = torch.ones(b, n, dtype=torch.bool)
    kv[0, :pad] = False
    return kv


def _first(kv, bi):
    return 0 if kv is None else int(kv[bi].to(torch.int8).argmax())


def _kv_valid(kv, bi, j):
    return kv is None or bool(kv[bi, j])


def _blocks_to_tokens(sel, nq, nk, off):
    """[b, h, nqb, nkb] block selection -> [b, h, nq, nk] token mask (blocks x causal)."""
    b, h = sel.shape[:2]
    m = torch.zeros(b, h, nq, nk, dtype=torch.bool)
    for i in range(nq):
        for j in range(i + off + 1):
            m[:, :, i, j] = sel[:, :, i // BS, j // BS]
    return m


# ------------------------------------------------------------------------------- slow references (token sets)
def slow_sink_window(p, q, k, kv):
    b, _h, nq, nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    off = nk - nq
    sel = torch.zeros(b, 1, -(-nq // BS), -(-nk // BS), dtype=torch.bool)
    for bi in range(b):
        f = _first(kv, bi)
        for i in range(nq):
            for j in range(i + off + 1):
                if f <= j < f + p.sink or (i + off) - j < p.window:
                    sel[bi, 0, i // BS, j // BS] = True
        if isinstance(p, TriShape):
            for i in range(nq):
                if i + off >= nk - p.last_q:
                    sel[bi, 0, i // BS, : (i + off) // BS + 1] = True
    return _blocks_to_tokens(sel, nq, nk, off)


def _topk_set(scores, k):
    """indices of the k largest finite scores (python sort; scores are random, so no ties)."""
    order = sorted((s, j) for j, s in enumerate(scores) if s != float("-inf"))
    return {j for _, j in order[::-1][:k]}


def slow_vertical_slash(p, q, k, kv):
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    g = hq // k.shape[1]
    lq = min(p.last_q, nq)
    m = torch.zeros(b, hq, nq, nk, dtype=torch.bool)
    for bi in range(b):
        f = _first(kv, bi)
        for h in range(hq):
            vert = [0.0] * nk
            slash = [0.0] * nk
            for i in range(nq - lq, nq):
                qp = i + nk - nq
                keys = [j for j in range(qp + 1) if _kv_valid(kv, bi, j)]
                s = torch.tensor([float(q[bi, h, i].double() @ k[bi, h // g, j].double()) / math.sqrt(d) for j in keys])
                pr = torch.softmax(s, 0)
                for j, pj in zip(keys, pr.tolist()):
                    vert[j] += pj
                    slash[qp - j] += pj
            vs = [float("inf") if f <= j < f + p.sink else (vert[j] if _kv_valid(kv, bi, j) else float("-inf"))
                  for j in range(nk)]
            ss = [float("inf") if dd < p.local else slash[dd] for dd in range(nk)]
            ss = [s if dd <= nk - 1 - f else float("-inf") for dd, s in enumerate(ss)]
            cols = _topk_set(vs, p.vertical) | {j for j in range(f, min(f + p.sink, nk))}
            diags = _topk_set(ss, p.slash) | {dd for dd in range(min(p.local, nk - f))}
            for i in range(nq):
                qp = i + nk - nq
                for j in range(qp + 1):
                    m[bi, h, i, j] = j in cols or (qp - j) in diags
    return m


def _pooled(x, n_blocks, valid=None):
    out = []
    for c in range(n_blocks):
        rows = [t for t in range(c * BS, min((c + 1) * BS, x.shape[0])) if valid is None or valid[t]]
        out.append(x[rows].double().mean(0) if rows else None)
    return out


def _forced(p, bi, kv, nqb, nkb, off, nq):
    """sinks + diagonal blocks per q block, causal."""
    f = _first(kv, bi)
    sel = set()
    for i in range(nqb):
        q_lo, q_hi = i * BS + off, min((i + 1) * BS, nq) - 1 + off
        for j in range(nkb):
            if j > q_hi // BS:
                continue
            if p.sink > 0 and f // BS <= j <= (f + p.sink - 1) // BS:
                sel.add((i, j))
            if q_lo // BS <= j:
                sel.add((i, j))
    return sel


def slow_block_select(p, q, k, kv):
    """block_topk, linear_estimate (estimates computed directly) and lowbit_topk."""
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    g = hq // k.shape[1]
    off = nk - nq
    nqb, nkb = -(-nq // BS), -(-nk // BS)
    sel = torch.zeros(b, hq, nqb, nkb, dtype=torch.bool)
    for bi in range(b):
        valid = None if kv is None else kv[bi].tolist()
        for h in range(hq):
            chosen = set(_forced(p, bi, kv, nqb, nkb, off, nq))
            if isinstance(p, LowBitTopK):
                chosen |= _slow_lowbit(p, q[bi, h], k[bi, h // g], valid, off)
            else:
                if isinstance(p, LinearEstimate):
                    est = _slow_linear_scores(p, q[bi, h], k[bi, h // g], valid)
                else:
                    qp, kp = _pooled(q[bi, h], nqb), _pooled(k[bi, h // g], nkb, valid)
                    est = [[float(qp[i] @ kp[j]) / math.sqrt(d) if kp[j] is not None else float("-inf")
                            for j in range(nkb)] for i in range(nqb)]
                for i in range(nqb):
                    last = (min((i + 1) * BS, nq) - 1 + off) // BS
                    row = [est[i][j] if j <= last else float("-inf") for j in range(nkb)]
                    if isinstance(p, BlockTopK) and p.mode == "threshold":
                        q_hi = min((i + 1) * BS, nq) - 1 + off
                        cnt = [sum(1 for t in range(j * BS, min((j + 1) * BS, nk, q_hi + 1))
                                   if valid is None or valid[t]) for j in range(nkb)]
                        row = [r + math.log(max(c, 1)) for r, c in zip(row, cnt)]
                        pr = torch.softmax(torch.tensor(row, dtype=torch.float64), 0).tolist()
                        acc = 0.0
                        for pj, j in sorted(((pj, j) for j, pj in enumerate(pr)), reverse=True):
                            if acc < p.tau and pj > 0:
                                chosen.add((i, j))
                            acc += pj
                    else:
                        chosen |= {(i, j) for j in _topk_set(row, p.topk)}
            for i, j in chosen:
                sel[bi, h, i, j] = True
    return _blocks_to_tokens(sel, nq, nk, off)


def _slow_linear_scores(p, qh, kh, valid):
    d = qh.shape[-1]
    w = _orthogonal_gaussian(p.features, d, p.seed).double()

    def phi(x):
        x = x.double() / d**0.25
        return torch.exp(w @ x - 0.5 * (x @ x))

    nqb, nkb = -(-qh.shape[0] // BS), -(-kh.shape[0] // BS)
    sq = [sum(phi(qh[t]) for t in range(i * BS, min((i + 1) * BS, qh.shape[0]))) for i in range(nqb)]
    sk = []
    for j in range(nkb):
        ts = [t for t in range(j * BS, min((j + 1) * BS, kh.shape[0])) if valid is None or valid[t]]
        sk.append(sum(phi(kh[t]) for t in ts) if ts else None)
    return [[math.log(float(sq[i] @ sk[j])) if sk[j] is not None else float("-inf") for j in range(nkb)]
            for i in range(nqb)]


def _slow_lowbit(p, qh, kh, valid, off):
    d = qh.shape[-1]
    qmax = 2 ** (p.bits - 1) - 1

    def quant(x):
        out = x.clone().double()
        for c in range(0, x.shape[0], BS):
            blk = x[c : c + BS].double()
            full = torch.cat([blk, torch.zeros(BS - blk.shape[0], d, dtype=torch.float64)])
            s = max(float(full.abs().max()), 1e-12) / qmax
            out[c : c + BS] = torch.clamp(torch.round(blk / s), -qmax - 1, qmax) * s
        return out

    qq, kq = quant(qh), quant(kh)
    nq = qh.shape[0]
    rows = set(p.sample_rows(nq).tolist())
    chosen = set()
    for i in sorted(rows):
        qp = i + off
        blockmax = {}
        for j in range(qp + 1):
            if valid is not None and not valid[j]:
                continue
            s = float(qq[i] @ kq[j]) / math.sqrt(d)
            blockmax[j // BS] = max(blockmax.get(j // BS, float("-inf")), s)
        if not blockmax:  # a padded query row sees no key
            continue
        top = max(blockmax.values())
        chosen |= {(i // BS, jb) for jb, s in blockmax.items() if s >= top + math.log(p.rel) - 1e-9}
    return chosen


def slow_hierarchical(p, q, k, kv):
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    g = hq // k.shape[1]
    off = nk - nq
    nqb, nkb = -(-nq // BS), -(-nk // BS)
    sel = torch.zeros(b, hq, nqb, nkb, dtype=torch.bool)
    for bi in range(b):
        valid = None if kv is None else kv[bi].tolist()
        for h in range(hq):
            qp, kp = _pooled(q[bi, h], nqb), _pooled(k[bi, h // g], nkb, valid)
            chosen = set(_forced(p, bi, kv, nqb, nkb, off, nq))
            for i in range(nqb):
                nvis = (min((i + 1) * BS, nq) - 1 + off) // BS + 1
                K = p.topk
                fb = _first(kv, bi) // BS
                span = max(nvis - fb, 1)
                ranges = [(fb + (t * span) // K, fb + ((t + 1) * span) // K) for t in range(K)]
                while any(hi - lo > 1 for lo, hi in ranges):
                    cand = []
                    for lo, hi in ranges:
                        mid = (lo + hi) // 2
                        cand += [(lo, mid), (mid, hi)]
                    scored = []
                    for n_, (lo, hi) in enumerate(cand):
                        rep = min(max((lo + hi - 1) // 2, 0), nkb - 1)
                        ok = hi > lo and kp[rep] is not None
                        scored.append((float(qp[i] @ kp[rep]) / math.sqrt(d) if ok else float("-inf"), -n_, (lo, hi)))
                    ranges = [r for _, _, r in sorted(scored, reverse=True)[:K]]
                chosen |= {(i, lo) for lo, hi in ranges if hi - lo == 1}
            for i, j in chosen:
                sel[bi, h, i, j] = True
    return _blocks_to_tokens(sel, nq, nk, off)


def slow_bilevel(p, q, k, kv):
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    g = hq // k.shape[1]
    off = nk - nq
    R = -(-nk // p.region)
    m = torch.zeros(b, hq, nq, nk, dtype=torch.bool)
    for bi in range(b):
        for h in range(hq):
            kreg = [[j for j in range(nk) if j // p.region == r and _kv_valid(kv, bi, j)] for r in range(R)]
            qreg = [[i for i in range(nq) if (i + off) // p.region == r] for r in range(R)]
            for a in range(R):
                if not qreg[a]:
                    continue
                qa = q[bi, h, qreg[a]].double().mean(0)
                sc = [float(qa @ k[bi, h // g, kreg[c]].double().mean(0)) / math.sqrt(d) if kreg[c] and c <= a
                      else float("-inf") for c in range(R)]
                routed = _topk_set(sc, p.topk) | {a}
                for i in qreg[a]:
                    for j in range(i + off + 1):
                        m[bi, h, i, j] = (j // p.region) in routed
    return m


def _natten_keys(i, n, ks, dil, st, causal):
    r, j = i % dil, i // dil
    lg = (n - 1 - r) // dil + 1
    if causal:
        jl = min((j // st) * st + st - 1, lg - 1)
        return {jj * dil + r for jj in range(max(jl - ks + 1, 0), jl + 1)}
    jl = min((j // st) * st + (st - 1) // 2, lg - 1)
    start = min(max(jl - ks // 2, 0), max(lg - ks, 0))
    return {jj * dil + r for jj in range(start, start + ks)}


def slow_neighborhood(p, q, k, kv):
    nq, nk = q.shape[2], k.shape[2]
    m = torch.zeros(1, 1, nq, nk, dtype=torch.bool)
    off = nk - nq
    for i in range(nq):
        if p.hw is None:
            keys = _natten_keys(i + off, nk, p.kernel_size, p.dilation, p.stride, p.causal)
        else:
            H, W = p.hw
            rows = _natten_keys(i // W, H, p.kernel_size, p.dilation, p.stride, False)
            cols = _natten_keys(i % W, W, p.kernel_size, p.dilation, p.stride, False)
            keys = {r * W + c for r in rows for c in cols}
        for j in keys:
            if not p.causal or j <= i + off:
                m[0, 0, i, j] = True
    return m


def slow_strided(p, q, k, kv):
    b, nq, nk = q.shape[0], q.shape[2], k.shape[2]
    off = nk - nq
    nqb, nkb = -(-nq // BS), -(-nk // BS)
    sel = torch.zeros(b, 1, nqb, nkb, dtype=torch.bool)
    for bi in range(b):
        f = _first(kv, bi)
        for i in range(nqb):
            q_lo, q_hi = i * BS + off, min((i + 1) * BS, nq) - 1 + off
            for j in range(q_hi // BS + 1):
                in_win = any(qq - kk < p.window for qq in range(q_lo, q_hi + 1)
                             for kk in range(j * BS, min((j + 1) * BS, nk)) if kk <= qq)
                sink = p.sink > 0 and f // BS <= j <= (f + p.sink - 1) // BS
                sel[bi, 0, i, j] = in_win or sink or (q_lo // BS - j) % p.stride == 0
    return _blocks_to_tokens(sel, nq, nk, off)


def slow_groups(p, q, k, kv):
    b, hq, nq, nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    off = nk - nq
    m = torch.zeros(b, hq, nq, nk, dtype=torch.bool)
    for bi in range(b):
        f = _first(kv, bi)
        for h in range(hq):
            for i in range(nq):
                for j in range(i + off + 1):
                    ri, rj = max(i + off - f, 0), max(j - f, 0)
                    if isinstance(p, ShiftedGroups):
                        shift = p.group // 2 if (hq > 1 and h >= hq // 2) else 0
                        gi, gj = (ri + (p.group - shift) % p.group) // p.group, (rj + (p.group - shift) % p.group) // p.group
                        if shift == 0:
                            gi, gj = ri // p.group, rj // p.group
                    else:
                        gi, gj = (ri % p.segment) // p.chunk, (rj % p.segment) // p.chunk
                    m[bi, h, i, j] = gi == gj or (p.sink > 0 and f <= j < f + p.sink)
    return m


SLOW = {
    "sink_window": (SinkWindow(sink=8, window=40, block_size=BS), slow_sink_window),
    "tri_shape": (TriShape(sink=8, window=24, last_q=20, block_size=BS), slow_sink_window),
    "vertical_slash": (VerticalSlash(vertical=12, slash=9, last_q=16, sink=3, local=4, block_size=BS),
                       slow_vertical_slash),
    "block_topk": (BlockTopK(topk=3, sink=8, block_size=BS), slow_block_select),
    "block_topk-threshold": (BlockTopK(mode="threshold", tau=0.6, sink=0, block_size=BS), slow_block_select),
    "lowbit_topk-4bit": (LowBitTopK(bits=4, rel=0.3, q_samples=4, block_size=BS), slow_block_select),
    "lowbit_topk-8bit": (LowBitTopK(bits=8, rel=0.3, q_samples=16, block_size=BS), slow_block_select),
    "linear_estimate": (LinearEstimate(topk=3, features=24, block_size=BS), slow_block_select),
    "hierarchical": (Hierarchical(topk=3, sink=8, block_size=BS), slow_hierarchical),
    "bilevel_routing": (BilevelRouting(region=24, topk=2, block_size=BS), slow_bilevel),
    "bilevel_routing-aligned": (BilevelRouting(region=32, topk=2, block_size=BS), slow_bilevel),
    "neighborhood-causal": (Neighborhood(kernel_size=9, dilation=2, stride=2, block_size=BS), slow_neighborhood),
    "neighborhood-noncausal": (Neighborhood(kernel_size=7, dilation=3, stride=3, causal=False, block_size=BS),
                               slow_neighborhood),
    "strided_window": (StridedWindow(sink=8, window=20, stride=3, block_size=BS), slow_strided),
    "shifted_groups": (ShiftedGroups(group=40, block_size=BS), slow_groups),
    "shifted_groups-sink": (ShiftedGroups(group=30, sink=5, block_size=BS), slow_groups),
    "long_range_grouping": (LongRangeGrouping(segment=50, chunk=20, sink=3, block_size=BS), slow_groups),
}


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("name", list(SLOW), ids=list(SLOW))
def test_layout_equals_slow_reference(name, padded):
    p, slow = SLOW[name]
    causal = p.is_causal()
    q, k, _ = _qkv(nq=150, nk=150)
    kv = _padding(2, 150) if padded else None
    lay = p.layout(q, k, kv)
    # neighborhood is position-based: padding only masks keys, the windows stay those of the unpadded definition
    slow_kv = None if isinstance(p, Neighborhood) else kv
    got, want = torch.broadcast_tensors(lay.to_dense_mask(causal=causal, heads=q.shape[1]), slow(p, q, k, slow_kv))
    got, want = got.expand(2, 4, -1, -1), want.expand(2, 4, -1, -1)
    if kv is not None:  # pairs with padded keys are masked by the kernel anyway
        got, want = got & kv[:, None, None, :], want & kv[:, None, None, :]
    assert torch.equal(got, want), f"{name}: {int((got != want).sum())} pairs differ"


def test_layouts_with_queries_over_a_longer_cache():
    """q_len < kv_len (a chunk of queries over earlier keys): the reference's end alignment."""
    q, k, _ = _qkv(nq=70, nk=150)
    for name in ("sink_window", "vertical_slash", "block_topk", "hierarchical", "strided_window",
                 "shifted_groups", "bilevel_routing"):
        p, slow = SLOW[name]
        got, want = torch.broadcast_tensors(p.layout(q, k).to_dense_mask(heads=4), slow(p, q, k, None))
        assert torch.equal(got, want), name


def test_two_d_neighborhood_and_routing_equal_slow_reference():
    q, k, _ = _qkv(b=1, hq=2, hk=2, nq=120, nk=120)
    p = Neighborhood(kernel_size=3, dilation=2, stride=2, causal=False, image="12x10", block_size=BS)
    got = p.layout(q, k).to_dense_mask(causal=False)
    assert torch.equal(got[0, 0], slow_neighborhood(p, q, k, None)[0, 0])
    # 2-D routing: each query sees whole 2x2 tiles, exactly topk of them, the same ones for its whole tile
    r = BilevelRouting(region=2, topk=3, image="12x10", block_size=BS)
    m = r.layout(q, k).to_dense_mask(causal=False, heads=2)
    tile = lambda p_: (p_ // 10 // 2) * 5 + (p_ % 10) // 2  # noqa: E731
    seen = {}
    for i in range(120):
        routed = frozenset(tile(j) for j in range(120) if m[0, 0, i, j])
        assert len(routed) == 3
        assert all(bool(m[0, 0, i, j]) == (tile(j) in routed) for j in range(120))
        assert seen.setdefault(tile(i), routed) == routed


# ------------------------------------------------------------------------------- outputs vs reference.py
ALL = {name: p for name, (p, _) in SLOW.items()}
ALL["core_context"] = CoreContext(group=8, window=40, block_size=BS)
ALL["neighborhood-2d"] = Neighborhood(kernel_size=5, causal=False, image="15x10", block_size=BS)
ALL["bilevel_routing-2d"] = BilevelRouting(region=5, topk=2, image="15x10", block_size=BS)


def _with_backend(p, backend):
    import dataclasses

    return dataclasses.replace(p, backend=backend)


def _slow_core_context(p, q, k, v, kv):
    """CCA output computed the obvious way: per query, its visible core tokens and window keys, one softmax."""
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    g = hq // k.shape[1]
    G, W = p.group, p.window
    out = torch.zeros(b, hq, nq, d, dtype=torch.float64)
    for bi in range(b):
        valid = [_kv_valid(kv, bi, j) for j in range(nk)]
        for hk_ in range(k.shape[1]):
            cores = []
            for c in range(nk // G):
                idx = [j for j in range(c * G, (c + 1) * G) if valid[j]]
                last = (c + 1) * G - 1 - (nk - nq)
                if not idx:
                    cores.append(None)
                    continue
                ws = []
                for hh in range(hk_ * g, (hk_ + 1) * g):
                    s = torch.stack([q[bi, hh, last].double() @ k[bi, hk_, j].double() for j in idx]) / math.sqrt(d)
                    ws.append(torch.softmax(s, 0))
                w = torch.stack(ws).mean(0)
                ck = sum(wi * k[bi, hk_, j].double() for wi, j in zip(w, idx))
                cv = sum(wi * v[bi, hk_, j].double() for wi, j in zip(w, idx))
                cores.append((ck, cv))
            for hh in range(hk_ * g, (hk_ + 1) * g):
                for i in range(nq):
                    qp = i + nk - nq
                    keys, vals = [], []
                    for c, cc in enumerate(cores):
                        if cc is not None and (c + 1) * G - 1 <= qp - W:
                            keys.append(cc[0])
                            vals.append(cc[1])
                    for j in range(max(qp - W + 1, 0), qp + 1):
                        if valid[j]:
                            keys.append(k[bi, hk_, j].double())
                            vals.append(v[bi, hk_, j].double())
                    if not keys:
                        continue
                    s = torch.stack(keys) @ q[bi, hh, i].double() / math.sqrt(d)
                    out[bi, hh, i] = torch.softmax(s, 0) @ torch.stack(vals)
    return out


@pytest.mark.parametrize("backend", ["gather", "flex"])
@pytest.mark.parametrize("name", list(ALL), ids=list(ALL))
def test_output_equals_reference_under_its_mask(name, backend):
    p = _with_backend(ALL[name], backend)
    n = 150
    causal = p.is_causal()
    q, k, v = _qkv(nq=n, nk=n)
    if getattr(p, "hw", None) is not None:
        H, W = p.hw
        q, k, v = _qkv(b=1, nq=H * W, nk=H * W)
    kv = _padding(q.shape[0], k.shape[2]) if causal and q.shape[0] > 1 else None
    with torch.no_grad():
        out = p.attend(q, k, v, key_valid=kv)
    if isinstance(p, CoreContext):
        ref = _slow_core_context(p, q, k, v, kv).float()
    else:
        mask = p.layout(q, k, kv).to_dense_mask(causal=causal, heads=q.shape[1])
        if kv is not None:
            mask = mask & kv[:, None, None, :]
        ref, _ = reference.attention(q, k, v, mask=mask, causal=causal)
    if kv is not None:  # padded query rows are free to differ
        out, ref = out * kv[:, None, :, None], ref * kv[:, None, :, None]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


FULL = {
    "sink_window": SinkWindow(window=200, block_size=BS),
    "tri_shape": TriShape(window=200, block_size=BS),
    "vertical_slash": VerticalSlash(vertical=200, slash=1, block_size=BS),
    "vertical_slash-slashes": VerticalSlash(vertical=1, slash=200, block_size=BS),
    "block_topk": BlockTopK(topk=20, block_size=BS),
    "block_topk-threshold": BlockTopK(mode="threshold", tau=1.0, block_size=BS),
    "lowbit_topk": LowBitTopK(rel=1e-30, block_size=BS),
    "linear_estimate": LinearEstimate(topk=20, block_size=BS),
    "hierarchical": Hierarchical(topk=20, block_size=BS),
    "bilevel_routing": BilevelRouting(region=24, topk=20, block_size=BS),
    "neighborhood": Neighborhood(kernel_size=200, block_size=BS),
    "strided_window": StridedWindow(stride=1, window=1, block_size=BS),
    "shifted_groups": ShiftedGroups(group=400, block_size=BS),
    "long_range_grouping": LongRangeGrouping(segment=200, chunk=200, block_size=BS),
    "core_context": CoreContext(window=200, block_size=BS),
}


@pytest.mark.parametrize("name", list(FULL), ids=list(FULL))
def test_full_budget_equals_dense(name):
    q, k, v = _qkv(nq=150, nk=150)
    with torch.no_grad():
        out = _with_backend(FULL[name], "gather").attend(q, k, v)
    ref, _ = reference.attention(q, k, v)
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
    if name != "core_context":
        lay = FULL[name].layout(q, k)
        assert lay.density(exact=True) == pytest.approx(1.0)
        assert attention_recall(lay, q, k).min().item() == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------------------- mixed (MoA)
def test_mixed_takes_each_heads_pattern(tmp_path):
    specs = ["sink_window:sink=8:window=24:block_size=16", "dense", "vertical_slash:vertical=10:slash=8:last_q=8:"
             "sink=2:local=2:block_size=16", "shifted_groups:group=40:block_size=16"]
    path = tmp_path / "heads.json"
    longattn.prefill.mixed.write_mixed(path, [specs, specs[::-1]], block_size=16)
    mixed = Mixed(profile=str(path), block_size=16)
    q, k, v = _qkv(hq=4, hk=2)
    for layer, row in enumerate([specs, specs[::-1]]):
        lay = mixed.for_layer(layer).layout(q, k)
        got = lay.to_dense_mask(heads=4)
        for h, s in enumerate(row):
            if s == "dense":
                want = reference.dense_mask(150, 150).expand(2, -1, -1)
            else:
                want = longattn.parse_method(s, "prefill").layout(q, k).to_dense_mask(heads=4)[:, h]
            assert torch.equal(got[:, h], want.expand_as(got[:, h])), (layer, h, s)
        with torch.no_grad():
            out = _with_backend(mixed, "gather").for_layer(layer).attend(q, k, v)
        ref, _ = reference.attention(q, k, v, mask=got)
        torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)


def test_mixed_validation(tmp_path):
    path = tmp_path / "h.json"
    with pytest.raises(ValueError, match="profile"):
        Mixed(profile=str(tmp_path / "missing.json"))
    path.write_text(json.dumps({"format": "longattn.mixed/1", "block_size": 32, "layers": [["dense"]]}))
    with pytest.raises(ValueError, match="block_size"):
        Mixed(profile=str(path), block_size=64)
    path.write_text(json.dumps({"format": "longattn.mixed/1", "block_size": 64,
                                "layers": [["core_context"]]}))
    with pytest.raises(ValueError, match="cannot be part of a mixture"):
        Mixed(profile=str(path))
    path.write_text(json.dumps({"format": "longattn.mixed/1", "block_size": 64,
                                "layers": [["sink_window:block_size=32"]]}))
    with pytest.raises(ValueError, match="block_size"):
        Mixed(profile=str(path))
    path.write_text(json.dumps({"format": "longattn.mixed/1", "block_size": 64, "layers": [["dense", "dense"]]}))
    q, k, _ = _qkv(hq=4, hk=2)
    with pytest.raises(ValueError, match="heads"):
        Mixed(profile=str(path)).layout(q, k)
    with pytest.raises(ValueError, match="layer"):
        Mixed(profile=str(path)).for_layer(3)


# ------------------------------------------------------------------------------- validation
BAD = [
    (lambda: VerticalSlash(vertical=0), "vertical"),
    (lambda: VerticalSlash(slash=-1), "slash"),
    (lambda: VerticalSlash(last_q=0), "last_q"),
    (lambda: BlockTopK(topk=0), "topk"),
    (lambda: BlockTopK(mode="best"), "mode"),
    (lambda: BlockTopK(tau=0.0), "tau"),
    (lambda: BlockTopK(tau=1.5), "tau"),
    (lambda: LowBitTopK(bits=3), "bits"),
    (lambda: LowBitTopK(rel=0), "rel"),
    (lambda: LinearEstimate(features=0), "features"),
    (lambda: Hierarchical(topk=-2), "topk"),
    (lambda: BilevelRouting(topk=0), "topk"),
    (lambda: BilevelRouting(region=3, image="10x10"), "region"),
    (lambda: Neighborhood(kernel_size=0), "kernel_size"),
    (lambda: Neighborhood(dilation=0), "dilation"),
    (lambda: Neighborhood(kernel_size=3, stride=4), "stride"),
    (lambda: Neighborhood(image="10x10"), "causal"),
    (lambda: Neighborhood(image="10by10", causal=False), "image"),
    (lambda: StridedWindow(stride=0), "stride"),
    (lambda: StridedWindow(window=0), "window"),
    (lambda: ShiftedGroups(group=1), "group"),
    (lambda: LongRangeGrouping(chunk=300, segment=200), "chunk"),
    (lambda: CoreContext(group=0), "group"),
    (lambda: TriShape(last_q=0), "last_q"),
    (lambda: SinkWindow(block_size=48), "block_size"),
    (lambda: Mixed(profile=""), "profile"),
]


@pytest.mark.parametrize("make,arg", BAD, ids=[f"{a}-{i}" for i, (_, a) in enumerate(BAD)])
def test_bad_settings_raise_naming_the_argument(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


def test_shape_errors_name_the_argument():
    q, k, _ = _qkv(b=1, nq=100, nk=100)
    with pytest.raises(ValueError, match="image"):
        Neighborhood(kernel_size=3, causal=False, image="12x10").layout(q, k)
    with pytest.raises(ValueError, match="image"):
        BilevelRouting(region=2, image="12x10").layout(q, k)
    with pytest.raises(ValueError, match="kernel_size"):  # window longer than the sequence (NATTEN's rule)
        Neighborhood(kernel_size=60, dilation=2, causal=False).layout(q, k)
    with pytest.raises(ValueError, match="kernel_size"):
        Neighborhood(kernel_size=11, causal=False, image="10x10").layout(q, k)
    lay = SinkWindow(block_size=32).layout(q, k)
    with pytest.raises(ValueError, match="block size mismatch"):
        BlockLayout(lay.kv_indices[:, :, :2], lay.kv_counts[:, :, :2], 16, 100, 100)


def test_spec_strings_round_trip():
    for p in list(ALL.values()):
        spec = longattn.api._spec_of(p)
        assert longattn.parse_method(spec, "prefill") == p, spec


# ------------------------------------------------------------------------------- recall
def test_attention_recall_matches_direct_computation():
    q, k, _ = _qkv(nq=100, nk=100)
    kv = _padding(2, 100, pad=10)
    lay = BlockTopK(topk=2, block_size=16).layout(q, k, kv)
    got = attention_recall(lay, q, k, key_valid=kv)
    mask = lay.to_dense_mask(heads=4)
    kk = k.repeat_interleave(2, 1)
    s = (q.double() @ kk.double().transpose(-1, -2)) / 4.0
    allowed = reference.dense_mask(100, 100) & kv[:, None, None, :]
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    per_row = (p * mask).sum(-1)  # [b, h, nq]
    rows_ok = kv[:, None, :].double()
    want = (per_row * rows_ok).sum(-1) / rows_ok.sum(-1)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    # sampled rows: exact on those rows
    sub = attention_recall(lay, q, k, key_valid=None, rows=torch.tensor([5, 50, 99]))
    want_sub = torch.softmax(s.masked_fill(~reference.dense_mask(100, 100), float("-inf")), -1)
    want_sub = (want_sub * mask)[:, :, [5, 50, 99]].sum(-1).mean(-1)
    torch.testing.assert_close(sub.double(), want_sub, rtol=0, atol=1e-5)
    assert 0.0 < float(got.mean()) < 1.0


def test_recall_is_one_for_dense_and_lower_for_sparser_window():
    q, k, _ = _qkv(nq=128, nk=128)
    dense = SinkWindow(window=128, block_size=16).layout(q, k)
    assert float(attention_recall(dense, q, k).min()) == pytest.approx(1.0, abs=1e-6)
    r_small = attention_recall(SinkWindow(sink=0, window=16, block_size=16).layout(q, k), q, k).mean()
    r_big = attention_recall(SinkWindow(sink=0, window=64, block_size=16).layout(q, k), q, k).mean()
    assert float(r_small) < float(r_big) < 1.0


@pytest.mark.parametrize("name", list(ALL), ids=list(ALL))
def test_non_contiguous_inputs_with_whole_blocks(name):
    """transformers hands the attention function transposed (non-contiguous) q/k/v; with a length that is a
    whole number of blocks no padding copy makes them contiguous."""
    p = _with_backend(ALL[name], "gather")
    n = 160 if getattr(p, "hw", None) is None else p.hw[0] * p.hw[1]
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, n, 4, 16, generator=g).transpose(1, 2)
    k = torch.randn(1, n, 2, 16, generator=g).transpose(1, 2)
    v = torch.randn(1, n, 2, 16, generator=g).transpose(1, 2)
    with torch.no_grad():
        out = p.attend(q, k, v)
        ref = p.attend(q.contiguous(), k.contiguous(), v.contiguous())
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
