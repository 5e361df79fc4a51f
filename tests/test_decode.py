"""Decode-time selectors and the decode ops, against the dense reference and slow loop-by-loop selections."""

import math

import pytest
import torch

import longattn
from _helpers import ids_batch
from longattn import api, reference, registry
from longattn.cache import LongattnLayer, PageMeta
from longattn.decode import (
    InfLLM,
    Landmark,
    LongHeads,
    LServePages,
    Quest,
    Squeezed,
    Step,
    TidalDecode,
    TokenSelect,
)
from longattn.decode.infllm import representative_scores
from longattn.decode.squeezed import kmeans
from longattn.models import tiny_model
from longattn.ops.decode import gather_attention, split_bounds, split_k_attention


def _qkv(b=2, hq=4, hk=2, n=53, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, 1, d, generator=g, dtype=dtype)
    k = torch.randn(b, hk, n, d, generator=g, dtype=dtype)
    v = torch.randn(b, hk, n, d, generator=g, dtype=dtype)
    return q, k, v


def _key_valid(b, n, pads):
    kv = torch.ones(b, n, dtype=torch.bool)
    for i, p in enumerate(pads):
        kv[i, :p] = False
    return kv


# ---- ops ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("splits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 53, 64])
def test_split_k_equals_reference(splits, n):
    q, k, v = _qkv(n=n)
    kv = _key_valid(2, n, (0, min(3, n - 1)))
    out, lse = split_k_attention(q, k, v, splits=splits, key_valid=kv)
    ref, ref_lse = reference.attention(q, k, v, causal=False, mask=kv[:, None, None, :])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse.float(), rtol=1e-5, atol=1e-5)


def test_split_bounds_cover_and_validate():
    for n in (1, 5, 17, 64):
        for s in range(1, 9):
            b = split_bounds(n, s)
            assert b[0][0] == 0 and b[-1][1] == n and len(b) <= s
            assert all(e0 == s1 for (_, e0), (s1, _) in zip(b, b[1:]))
    with pytest.raises(ValueError, match="splits"):
        split_bounds(10, 0)


def _gathered_selection(per, seed):
    """A selection for ``gather_attention`` (2 rows, 4/2 heads, 40 keys, 12 picks per kv or query head), its
    slot validity and key padding: ``(q, k, v, idx, valid, kv, hq, hk)``."""
    q, k, v = _qkv(n=40)
    b, hq, hk = 2, 4, 2
    hs = hk if per == "kv" else hq
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.stack([torch.randperm(40, generator=g)[:12] for _ in range(hs)]) for _ in range(b)])
    valid = torch.rand(b, hs, 12, generator=g) > 0.25
    return q, k, v, idx, valid, _key_valid(b, 40, (0, 5)), hq, hk


def _selection_mask(idx, valid, kv, hq, hk, per):
    """Loop by loop: the keys each query head attends, ``[b, hq, 1, n]`` (a slot counts when valid and unpadded)."""
    b, n = kv.shape
    mask = torch.zeros(b, hq, 1, n, dtype=torch.bool)
    for bi in range(b):
        for h in range(hq):
            row = h // (hq // hk) if per == "kv" else h
            for j in range(idx.shape[2]):
                if valid[bi, row, j] and kv[bi, idx[bi, row, j]]:
                    mask[bi, h, 0, idx[bi, row, j]] = True
    return mask


@pytest.mark.parametrize("per", ["kv", "q"])
@pytest.mark.parametrize("splits", [1, 3])
def test_gather_attention_equals_reference_mask(per, splits):
    q, k, v, idx, valid, kv, hq, hk = _gathered_selection(per, 1)
    out, lse = gather_attention(q, k, v, idx, valid=valid, key_valid=kv, splits=splits)
    mask = _selection_mask(idx, valid, kv, hq, hk, per)
    ref, ref_lse = reference.attention(q, k, v, causal=False, mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per", ["kv", "q"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gather_attention_output_only_path_equals_reference_mask(per, dtype):
    """``need_lse=False`` (SDPA over the gathered rows): the reference's output; a row whose selected keys are all
    masked gives 0 (as the lse path), never NaN; no lse."""
    q, k, v, idx, valid, kv, hq, hk = _gathered_selection(per, 2)
    valid[1, 0] = False  # nothing to attend in this row
    out, lse = gather_attention(q.to(dtype), k.to(dtype), v.to(dtype), idx, valid=valid, key_valid=kv, need_lse=False)
    assert lse is None and out.dtype == dtype and not out.isnan().any()
    mask = _selection_mask(idx, valid, kv, hq, hk, per)
    ref, _ = reference.attention(q.to(dtype).double(), k.to(dtype).double(), v.to(dtype).double(), causal=False,
                                 mask=mask)
    ref = torch.where(mask.any(-1, keepdim=True), ref, torch.zeros_like(ref))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    assert out[1, : hq // hk if per == "kv" else 1].abs().max() == 0


def test_gather_attention_validates_shapes():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="idx"):
        gather_attention(q, k, v, torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="valid"):
        gather_attention(q, k, v, torch.zeros(2, 2, 4, dtype=torch.long), valid=torch.ones(2, 2, 3, dtype=torch.bool))


# ---- page metadata ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_page_meta_incremental_equals_scratch(dtype):
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, 200, 8, generator=g).to(dtype)
    meta = PageMeta(16)
    n = 0
    for step in [37, 1, 1, 5, 16, 3, 1, 1, 63, 40, 1, 31]:  # single steps fold into a page or open one (64 -> 65)
        before = meta.recomputed_pages
        n += step
        meta.update(keys[:, :, :n])
        changed = meta.recomputed_pages - before
        # only the partial page and the new ones are recomputed
        assert changed <= math.ceil(step / 16) + 1
        scratch = PageMeta(16).update(keys[:, :, :n])
        assert meta.pages == scratch.pages == math.ceil(n / 16)
        torch.testing.assert_close(meta.kmin, scratch.kmin, rtol=0, atol=0)
        torch.testing.assert_close(meta.kmax, scratch.kmax, rtol=0, atol=0)
        torch.testing.assert_close(meta.ksum, scratch.ksum)
        for p in range(meta.pages):
            seg = keys[:, :, p * 16 : min(n, (p + 1) * 16)]
            assert torch.equal(meta.kmin[:, :, p], seg.amin(2))
            assert torch.equal(meta.kmax[:, :, p], seg.amax(2))
            torch.testing.assert_close(meta.kmean()[:, :, p], seg.float().mean(2), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="shrank"):
        meta.update(keys[:, :, :10])
    with pytest.raises(ValueError, match="page_size"):
        PageMeta(0)


def test_layer_page_meta_follows_appends_and_is_cleared_on_compress():
    layer = LongattnLayer()
    k, v = torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    layer.update(k, v)
    m1 = layer.page_meta(8)
    assert m1.n == 30
    layer.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    assert layer.page_meta(8) is m1 and m1.n == 31
    assert layer.decode_nbytes() > 0
    idx = torch.arange(10).expand(1, 2, 10)
    layer.compress(idx, torch.full((1, 2), 10))
    assert layer.decode_state == {} and layer.decode_nbytes() == 0
    assert layer.page_meta(8).n == 10


# ---- selections vs slow references -------------------------------------------------------------------------
def _step(n=150, b=2, hq=4, hk=2, d=8, pads=(0, 13), seed=0, layer_idx=1, num_layers=4, prefill_q=None, sel=None):
    """A Step over a cache filled with random keys (and, if ``sel`` is given, the selector's prefill hook run)."""
    q, k, v = _qkv(b, hq, hk, n, d, seed)
    kv = _key_valid(b, n, pads) if pads else None
    layer = LongattnLayer()
    layer.update(k, v)
    if sel is not None:
        pq = torch.randn(b, hq, n, d, generator=torch.Generator().manual_seed(seed + 5)) if prefill_q is None \
            else prefill_q
        sel.on_prefill(layer, layer_idx, pq, k, kv)
    return Step(q, k, v, kv, layer, layer_idx, num_layers, 1 / math.sqrt(d))


def _sets(idx, valid):
    out = {}
    for bi in range(idx.shape[0]):
        for h in range(idx.shape[1]):
            keep = idx[bi, h] if valid is None else idx[bi, h][valid[bi, h]]
            vals = keep.tolist()
            assert len(vals) == len(set(vals)), "a token was selected twice"
            out[bi, h] = set(vals)
    return out


def _first_real(kv, bi):
    return 0 if kv is None else int(kv[bi].to(torch.int8).argmax())


def _ref_pages_minmax(step, ps, group_reduce="max"):
    """Quest page bounds by loops: per (b, kv head, page) the max over the group of sum_d max(q*max, q*min)."""
    b, hq = step.q.shape[:2]
    hk, n = step.k.shape[1], step.n
    g = hq // hk
    np_ = math.ceil(n / ps)
    s = torch.empty(b, hk, np_)
    for bi in range(b):
        for h in range(hk):
            for p in range(np_):
                seg = step.k[bi, h, p * ps : min(n, (p + 1) * ps)]
                mx, mn = seg.amax(0), seg.amin(0)
                vals = [float(torch.maximum(step.q[bi, h * g + j, 0] * mx, step.q[bi, h * g + j, 0] * mn).sum())
                        for j in range(g)]
                s[bi, h, p] = max(vals)
                kv = step.key_valid
                if kv is not None and not kv[bi, p * ps : min(n, (p + 1) * ps)].any():
                    s[bi, h, p] = -math.inf
    return s


def _tokens_of(pages, ps, n):
    return {t for p in pages for t in range(p * ps, min(n, (p + 1) * ps))}


def _top(scores, k, forced=()):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    chosen = list(dict.fromkeys(list(forced)))
    for i in order:
        if len(chosen) >= k:
            break
        if i not in chosen:
            chosen.append(i)
    return chosen


@pytest.mark.parametrize("n", [150, 160])
def test_quest_selection_equals_slow_reference(n):
    sel = Quest(budget=48, page=16, dense_layers="")
    step = _step(n=n)
    got = _sets(*sel.select(step))
    ref_s = _ref_pages_minmax(step, 16)
    np_ = ref_s.shape[-1]
    for (bi, h), toks in got.items():
        pages = _top(ref_s[bi, h].tolist(), 3, forced=[np_ - 1])
        assert toks == _tokens_of(pages, 16, n)


def test_lserve_selection_equals_slow_reference():
    sel = LServePages(budget=64, page=32, logical_page=8, reuse=1)
    step = _step(n=150)
    got = _sets(*sel.select(step))
    logical = _ref_pages_minmax(step, 8)
    for (bi, h), toks in got.items():
        lp = logical[bi, h].tolist()
        phys = [max(lp[j : j + 4]) for j in range(0, len(lp), 4)]
        pages = _top(phys, 2, forced=[len(phys) - 1])
        assert toks == _tokens_of(pages, 32, 150)


def test_lserve_reuses_selection_and_adds_new_pages():
    sel = LServePages(budget=64, page=32, logical_page=8, reuse=3)
    step = _step(n=150)
    first = _sets(*sel.select(step))
    q, k, v = _qkv(n=200, seed=3)
    k[:, :, :150], v[:, :, :150] = step.k, step.v
    step.layer.update(k[:, :, 150:], v[:, :, 150:])
    step2 = Step(q, k, v, None, step.layer, 1, 4, step.scale)
    second = _sets(*sel.select(step2))  # reused: old pages (the forced last one now full) + pages 5, 6 appended since
    for key in first:
        assert second[key] == first[key] | set(range(150, 200))
    third = sel.select(step2)
    assert step.state["lserve"].age == 2
    sel.select(step2)  # the fourth call re-selects
    assert step.state["lserve"].age == 0
    assert third[0].shape[-1] >= 64


def test_lserve_streaming_heads_attend_sinks_and_local(tmp_path):
    import json

    prof = tmp_path / "p.json"
    prof.write_text(json.dumps({"num_layers": 4, "num_kv_heads": 2, "scores": [[0.9, 0.8]] * 3 + [[0.1, 0.9]]}))
    sel = LServePages(budget=64, page=32, logical_page=8, streaming=0.125, profile=str(prof), sink=4, recent=16)
    assert sel.streaming_heads(3) == [0] and sel.streaming_heads(1) == []
    step = _step(n=150, layer_idx=3)
    got = _sets(*sel.select(step))
    for bi in range(2):
        f = _first_real(step.key_valid, bi)
        assert got[bi, 0] == set(range(f, f + 4)) | set(range(134, 150))
        assert len(got[bi, 1]) > 20  # the retrieval head selects pages


def test_landmark_selection_equals_slow_reference():
    sel = Landmark(budget=64, block_size=16)
    step = _step(n=150)
    got = _sets(*sel.select(step))
    g = 2
    for (bi, h), toks in got.items():
        scores = []
        for p in range(math.ceil(150 / 16)):
            mean = step.k[bi, h, p * 16 : min(150, (p + 1) * 16)].mean(0)
            s = sum(float(step.q[bi, h * g + j, 0] @ mean) for j in range(g))
            if not step.key_valid[bi, p * 16 : min(150, (p + 1) * 16)].any():
                s = -math.inf
            scores.append(s)
        first = _first_real(step.key_valid, bi) // 16
        blocks = _top(scores, 4, forced=[first, len(scores) - 1])
        assert toks == _tokens_of(blocks, 16, 150)


def test_longheads_selects_per_query_head():
    sel = LongHeads(budget=64, chunk=16)
    step = _step(n=150)
    idx, valid = sel.select(step)
    assert idx.shape[1] == 4  # one set per query head
    got = _sets(idx, valid)
    for (bi, h), toks in got.items():
        kvh = h // 2
        scores = []
        for p in range(math.ceil(150 / 16)):
            seg = slice(p * 16, min(150, (p + 1) * 16))
            s = float(step.q[bi, h, 0] @ step.k[bi, kvh, seg].mean(0))
            scores.append(s if step.key_valid[bi, seg].any() else -math.inf)
        blocks = _top(scores, 4, forced=[_first_real(step.key_valid, bi) // 16, len(scores) - 1])
        assert toks == _tokens_of(blocks, 16, 150)
    assert len({frozenset(got[0, h]) for h in range(4)}) > 1  # heads of one group pick different chunks


@pytest.mark.parametrize("vote", ["layer", "group"])
def test_token_select_equals_slow_reference(vote):
    sel = TokenSelect(budget=40, sink=4, recent=8, vote=vote, threshold=1.0)
    step = _step(n=150)
    got = _sets(*sel.select(step))
    for (bi, h), toks in got.items():
        heads = range(4) if vote == "layer" else range(2 * h, 2 * h + 2)
        votes = [0.0] * 150
        for hq in heads:
            s = [float(step.q[bi, hq, 0] @ step.k[bi, hq // 2, t]) * step.scale if step.key_valid[bi, t] else -math.inf
                 for t in range(150)]
            m = max(s)
            z = sum(math.exp(x - m) for x in s)
            for t in range(150):
                votes[t] += math.exp(s[t] - m) / z
        f = _first_real(step.key_valid, bi)
        forced = list(range(f, f + 4)) + list(range(142, 150))
        assert toks == set(_top(votes, 40, forced=forced))


def test_token_select_selection_cache_hits_on_similar_queries():
    sel = TokenSelect(budget=40, sink=4, recent=8, threshold=0.9)
    step = _step(n=150)
    first = _sets(*sel.select(step))
    q, k, v = _qkv(n=151, seed=3)
    k[:, :, :150], v[:, :, :150] = step.k, step.v
    step.layer.update(k[:, :, 150:], v[:, :, 150:])
    similar = Step(step.q + 0.01 * q, k, v, None, step.layer, 1, 4, step.scale)
    got = _sets(*sel.select(similar))
    st = step.state["token_select"]
    assert st.hits == 1 and st.misses == 1
    assert all(got[key] == first[key] | {150} for key in first)
    other = Step(-step.q, k, v, None, step.layer, 1, 4, step.scale)  # cosine -1: re-selected
    sel.select(other)
    assert st is not step.state["token_select"] and step.state["token_select"].misses == 2


def test_tidal_decode_reuses_the_selection_layer_positions():
    sel = TidalDecode(budget=32, dense_layers="0", select_layers="1")
    assert TidalDecode(dense_layers="0,1").selection_layers(32) == (2, 13)
    step = _step(n=150, layer_idx=1)
    out = sel.attend(step)
    ref, _ = reference.attention(step.q, step.k, step.v, causal=False, mask=step.key_valid[:, None, None, :])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # dense at the selection layer
    idx, n = step.shared["tidal"]
    p = torch.softmax(torch.matmul(step.grouped_q(), step.k.transpose(-1, -2)) * step.scale
                      + torch.where(step.key_valid, 0.0, -math.inf)[:, None, None, :], -1)
    want = p.sum(dim=(1, 2)).topk(32, -1).indices
    for bi in range(2):
        assert set(idx[bi, 0].tolist()) == set(want[bi].tolist())
    later = Step(step.q, step.k, step.v, step.key_valid, step.layer, 3, 4, step.scale, step.shared)
    got, _ = sel.select(later)
    assert torch.equal(got[:, 0], idx[:, 0]) and torch.equal(got[:, 1], idx[:, 0])
    with pytest.raises(RuntimeError, match="before any selection layer"):
        sel.select(Step(step.q, step.k[:, :, :100], step.v[:, :, :100], None, step.layer, 3, 4, step.scale, {}))


def test_infllm_representatives_and_blocks_equal_slow_reference():
    sel = InfLLM(budget=4 + 32 + 2 * 16, sink=4, recent=32, block_size=16, reps=2)
    n = 150
    step = _step(n=n, sel=sel, pads=(0, 13))
    # representative scores by loops: sum over later queries within the horizon, mean over the group
    g = torch.Generator().manual_seed(5)
    pq = torch.randn(2, 4, n, 8, generator=g)
    rep = representative_scores(None, pq, step.k, step.key_valid, 16)
    for bi in range(2):
        for h in range(2):
            for m_ in (0, 20, 140, 149):
                want = sum(float(pq[bi, hq, i] @ step.k[bi, h, m_]) for hq in (2 * h, 2 * h + 1)
                           for i in range(m_ + 1, min(n, m_ + 17)) if step.key_valid[bi, i]) / 2
                assert abs(float(rep[bi, h, m_]) - want) < 1e-4
    got = _sets(*sel.select(step))
    rep = step.state["infllm"].rep  # now also scored by the decode query
    for (bi, h), toks in got.items():
        f = _first_real(step.key_valid, bi)
        mstart = math.ceil((f + 4) / 16) * 16
        lstart = max(mstart, ((n - 32) // 16) * 16)
        sinks, local = set(range(f, min(mstart, lstart))), set(range(lstart, n))
        rel = []
        for j in range(n // 16):
            if j * 16 < mstart or (j + 1) * 16 > lstart:
                rel.append(-math.inf)
                continue
            top = rep[bi, h, j * 16 : (j + 1) * 16].topk(2).indices + j * 16
            rel.append(sum(float(step.q[bi, hq, 0] @ step.k[bi, h, t]) for hq in (2 * h, 2 * h + 1) for t in top))
        blocks = [j for j in _top(rel, 2) if rel[j] > -math.inf]
        assert toks == sinks | local | _tokens_of(blocks, 16, n)


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1) * 5
    x = torch.cat([centers[i] + 0.05 * torch.randn(20, 8, generator=g) for i in (0, 1, 2)])[torch.randperm(60, generator=g)]
    _, assign = kmeans(x[None], 3, 10)
    groups = {}
    for i, a in enumerate(assign[0].tolist()):
        groups.setdefault(a, set()).add(int(torch.cdist(x[i][None], centers).argmin()))
    assert len(groups) == 3 and all(len(s) == 1 for s in groups.values())


@pytest.mark.parametrize("levels", [1, 2])
def test_squeezed_selects_best_clusters_then_appended_tokens(levels):
    sel = Squeezed(budget=40, cluster_tokens=10, levels=levels, fanout=3, coarse_keep=0.5)
    step = _step(n=120, sel=sel)
    st = step.state["squeezed"]
    # the context grew by 5 tokens after clustering
    q, k, v = _qkv(n=125, seed=3)
    k[:, :, :120], v[:, :, :120] = step.k, step.v
    step.layer.update(k[:, :, 120:], v[:, :, 120:])
    kv = torch.cat([step.key_valid, torch.ones(2, 5, dtype=torch.bool)], 1)
    step2 = Step(step.q, k, v, kv, step.layer, 1, 4, step.scale)
    got = _sets(*sel.select(step2))
    for (bi, h), toks in got.items():
        assert set(range(120, 125)) <= toks
        ctx = toks - set(range(120, 125))
        cs = [max(float(step.q[bi, 2 * h + j, 0] @ st.cent[bi, h, c]) for j in range(2))
              for c in range(st.cent.shape[2])]
        if levels == 2:
            cc = [max(float(step.q[bi, 2 * h + j, 0] @ st.coarse[bi, h, c]) for j in range(2))
                  for c in range(st.coarse.shape[2])]
            best = set(_top(cc, max(1, round(0.5 * len(cc)))))
            cs = [s if int(st.parent[bi, h, c]) in best else -math.inf for c, s in enumerate(cs)]
        tok = [cs[int(st.assign[bi, h, t])] if step.key_valid[bi, t] else -math.inf for t in range(120)]
        eligible = [t for t in range(120) if tok[t] > -math.inf]
        assert len(ctx) == min(40, len(eligible))
        worst_in = min(tok[t] for t in ctx)
        assert all(tok[t] <= worst_in for t in eligible if t not in ctx)


# ---- through the model --------------------------------------------------------------------------------------
def _spec_of(name: str, settings: dict) -> str:
    return ":".join([name] + [f"{k}={v}" for k, v in settings.items()])


# every selector's declared settings: attending to every token (FULL) and a budget well below the cache (SMALL)
FULL = {e.name: _spec_of(e.name, e.cls.full_example) for e in registry.entries("decode")}
SMALL = {e.name: _spec_of(e.name, e.cls.examples[0]) for e in registry.entries("decode")}


def _generate(m, ids, am, recipe=None, steps=6):
    kw = dict(attention_mask=am, max_new_tokens=steps, do_sample=False, output_scores=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        if recipe is None:
            return m.generate(ids, **kw), None
        with longattn.apply(m, recipe) as s:
            return m.generate(ids, **kw), s


@pytest.mark.parametrize("name", sorted(FULL))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_budget_covering_the_cache_gives_dense_logits(name, arch):
    m = tiny_model(arch, num_hidden_layers=4)
    ids, am = ids_batch(2, 150, pad=(0, 23))
    ref, _ = _generate(m, ids, am)
    got, s = _generate(m, ids, am, FULL[name])
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.scores, ref.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert s.decode_stats["selected"] > 0 and s.decode_stats["select_s"] > 0


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_budget_generates_batch2_with_padding_like_each_prompt_alone(name):
    """Selection is per row: a padded batch decodes as each prompt alone, and the budget really bounds what is read.
    Pages sit at physical positions (as in a paged cache), so the padding is a whole number of pages here; squeezed
    clusters every physical key (its cluster count follows the padded length), so only its budget is checked."""
    m = tiny_model("llama", num_hidden_layers=4)
    pad = 32
    ids, am = ids_batch(2, 150, pad=(0, pad))
    got, s = _generate(m, ids, am, SMALL[name])
    assert s.decode_stats["selected"] < 0.75 * s.decode_stats["possible"]
    if name == "squeezed":
        return
    alone, _ = _generate(m, ids[1:, pad:], am[1:, pad:], SMALL[name])
    for a, b in zip(got.scores, alone.scores):
        torch.testing.assert_close(a[1], b[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(got.sequences[1, 150:], alone.sequences[0, 150 - pad :])


def test_selector_follows_a_uniform_kv_policy():
    m = tiny_model("llama", num_hidden_layers=4)
    ids, am = ids_batch(1, 150, pad=(0,))
    got, s = _generate(m, ids, None, "snapkv:ratio=0.5:obs_window=8+quest:budget=32:dense_layers=0")
    assert s.compressions > 0 and s.decode_stats["selected"] > 0
    got2, _ = _generate(m, ids, None, "snapkv:ratio=0.5:obs_window=8+quest:budget=4096:dense_layers=0")
    ref, _ = _generate(m, ids, None, "snapkv:ratio=0.5:obs_window=8")
    assert torch.equal(got2.sequences, ref.sequences)


@pytest.mark.parametrize("spec,match", [
    ("quest:budget=8:page=16", r"budget \(8\) must be >= page \(16\)"),
    ("lserve_pages:page=64:logical_page=24", r"logical_page \(24\) must divide page \(64\)"),
    ("landmark:budget=64:block_size=64", "budget"),
    ("longheads:budget=100:chunk=64", "budget"),
    ("infllm:budget=100", "budget"),
    ("infllm:recent=8:block_size=16", "recent"),
    ("token_select:vote=heads", "vote must be one of layer, group"),
    ("token_select:budget=10:sink=8:recent=8", "budget"),
    ("squeezed:levels=3", "levels must be 1 or 2"),
    ("quest:dense_layers=a", "dense_layers"),
    ("tidal_decode:select_layers=1:dense_layers=1", "select_layers"),
    ("quest:budget=0", "budget must be an int >= 1"),
])
def test_bad_arguments_name_the_argument(spec, match):
    with pytest.raises(ValueError, match=match):
        api.parse(spec)


@pytest.mark.parametrize("spec,match", [
    ("quest:dense_layers=0,9", "dense_layers: layer 9 does not exist; the model has 2 layers"),
    ("tidal_decode:dense_layers=0:select_layers=5", "select_layers: layer 5 does not exist"),
    ("tidal_decode:dense_layers=:select_layers=1", "select_layers: layer 0 is neither dense"),
])
def test_unknown_layers_are_refused_at_apply(spec, match):
    m = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        with longattn.apply(m, spec):
            pass


@pytest.mark.parametrize("spec,match", [
    ("snapkv:ratio=0.5+infllm", "infllm needs the full cache"),
    ("snapkv:ratio=0.5+tidal_decode", "tidal_decode needs the full cache"),
    ("h2o:ratio=0.5:decode_budget=40:recent=4+quest", "decode_budget"),
])
def test_incompatible_combinations_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        api.parse(spec)


def test_ragged_kv_policy_then_selector_is_refused_clearly():
    m = tiny_model("llama")
    ids, am = ids_batch(2, 96, pad=(0, 17))
    with pytest.raises(ValueError, match="ragged"):
        _generate(m, ids, am, "snapkv:ratio=0.5:obs_window=8+quest:budget=32:dense_layers=")


# ---- ops-bench --decode ---------------------------------------------------------------------------------------
def test_decode_ops_bench_records_every_selector_and_split_k():
    from longattn.bench.decode_ops import DEFAULT_SELECTORS, DecodeBenchConfig, run_decode_ops
    from longattn.bench.report import decode_table

    cfg = DecodeBenchConfig(lengths=(1024,), heads=4, kv_heads=2, dim=16, budget=512, repeats=1, progress=False,
                            selectors=DEFAULT_SELECTORS + ("quest:budget=4096:dense_layers=",))
    recs = run_decode_ops(cfg, log=lambda s: None)
    contract = ("op", "pattern", "N", "dtype", "heads", "dim", "density", "recall", "backend", "est_ms", "kernel_ms",
                "ms", "dense_ms", "speedup")
    assert all(set(contract) <= set(r) for r in recs)
    names = {r["pattern"].split(" ")[0].split(":")[0] for r in recs}
    assert names == set(registry.names("decode")) | {"split_k"}
    for r in recs:
        assert 0.0 <= r["recall"] <= 1.0 + 1e-6 and 0.0 < r["density"] <= 1.0
        assert r["ms"] > 0 and r["dense_ms"] > 0 and r["eager_ms"] > 0
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["ms"])
    full = [r for r in recs if r["pattern"] == "quest:budget=4096:dense_layers="][0]
    assert full["density"] == 1.0 and full["recall"] == pytest.approx(1.0, abs=1e-5)
    sparse = [r for r in recs if r["pattern"] == "quest"][0]
    assert sparse["density"] == pytest.approx(512 / 1024)
    assert "tidal_decode (reuse layer)" in decode_table(recs)


@pytest.mark.parametrize("argv", [
    ["ops-bench", "--decode", "--selectors", "nope"],
    ["ops-bench", "--decode", "--selectors", "split_k:ways=2"],
    ["ops-bench", "--budget", "128"],
    ["ops-bench", "--decode", "--patterns", "sink_window"],
    ["ops-bench", "--decode", "--budget", "0"],
    ["ops-bench", "--decode", "--lengths", "100"],
])
def test_decode_ops_bench_bad_arguments_exit_2(argv, capsys):
    from longattn import cli

    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("longattn: error:")


def test_cab_grid_times_where_it_applies_and_says_why_not():
    from longattn.bench.cab import CabConfig, cab_table, efficiency_lengths, run_cab

    recs = run_cab(CabConfig(patterns=("sink_window:backend=gather", "neighborhood:backend=gather:kernel_size=64"),
                             lengths=(256, 512), heads=2, kv_heads=1, dim=16, repeats=1, progress=False),
                   log=lambda s: None)
    by = {(r["pattern"].split(":")[0], r["kind"], r["N"]): r for r in recs}
    assert len(recs) == 2 * 4 * 2
    assert by[("sink_window", "causal_self", 256)]["applies"] and by[("sink_window", "causal_cross", 512)]["applies"]
    assert not by[("sink_window", "noncausal_self", 256)]["applies"]
    assert "causal-only" in by[("sink_window", "noncausal_self", 256)]["note"]
    assert by[("neighborhood", "noncausal_self", 256)]["applies"]  # its causal=False form
    contract = ("op", "pattern", "N", "dtype", "heads", "dim", "density", "recall", "backend", "est_ms", "kernel_ms",
                "ms", "dense_ms", "speedup")
    for r in recs:
        assert r["dense_ms"] > 0 and (r["ms"] is None) == (not r["applies"])
        assert set(contract) <= set(r)
    eff = efficiency_lengths(recs)
    assert set(eff) == {(r["pattern"], r["kind"]) for r in recs if r["applies"]}
    assert "efficient from" in cab_table(recs)
    fake = [{**r, "speedup": s} for r, s in zip([by[("sink_window", "causal_self", 256)],
                                                 by[("sink_window", "causal_self", 512)]], (0.5, 1.5))]
    assert efficiency_lengths(fake) == {(fake[0]["pattern"], "causal_self"): 512}


def test_decode_plot_writes_a_png(tmp_path):
    from longattn.bench.decode_ops import DecodeBenchConfig, run_decode_ops
    from longattn.bench.plots import decode_plot

    recs = run_decode_ops(DecodeBenchConfig(lengths=(512, 1024), heads=2, kv_heads=1, dim=16, budget=128, repeats=1,
                                            progress=False, selectors=("quest", "landmark:block_size=32")),
                          log=lambda s: None)
    decode_plot(recs, tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 1000


def test_cache_bytes_count_the_selector_state():
    from longattn.cache import cache_nbytes

    m = tiny_model("llama", num_hidden_layers=4)
    ids, _ = ids_batch(1, 150, pad=(0,))
    with torch.no_grad(), longattn.apply(m, "quest:budget=32:page=16:dense_layers=") as s:
        m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    meta = sum(layer.decode_nbytes() for layer in s.cache.layers)
    assert meta > 0 and cache_nbytes(s.cache) >= sum(layer.nbytes() for layer in s.cache.layers) + meta


def test_infllm_offload_frees_the_layer_and_attends_the_same_tokens():
    """Offloaded memory blocks leave the cache layer (a store + an LRU hold them) and decoding is unchanged."""
    m = tiny_model("llama", num_hidden_layers=4)
    ids, _ = ids_batch(1, 300, pad=(0,))
    spec = "infllm:budget=84:sink=4:recent=32:block_size=16"
    ref, s0 = _generate(m, ids, None, spec, steps=12)
    got, s1 = _generate(m, ids, None, spec + ":offload=true:lru_blocks=2", steps=12)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.scores, ref.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    layer = s1.cache.layers[1]
    st = layer.decode_state["infllm"]
    assert layer.get_seq_length() == 300 + 11 and layer.physical_len < 100  # sinks + local window only
    store = st.store
    assert store.offloaded >= 15 and store.misses > len(store.lru) == 2  # LRU evicted and reloaded
    assert sum(x.numel() for kv in store.blocks.values() for x in kv) == 2 * store.offloaded * 2 * 16 * 16
    assert s0.cache.layers[1].physical_len == 311
    with pytest.raises(ValueError, match="infllm offload: needs rows without padding"):
        ids2, am2 = ids_batch(2, 150, pad=(0, 20))
        _generate(m, ids2, am2, spec + ":offload=true")
    with pytest.raises(ValueError, match="store must be a torch device"):
        api.parse(spec + ":store=nowhere")


# ---- every selector against the slow reference written beside it -------------------------------------------------
def _reference_cases():
    for e in registry.entries("decode"):
        for i, ex in enumerate(e.cls.examples):
            for pads in ((0, 13), (0, 32)):
                yield pytest.param(e, ex, pads, id=f"{e.name}-{i}-pad{pads[1]}")


@pytest.mark.parametrize("e,ex,pads", list(_reference_cases()))
def test_selection_equals_the_reference_beside_the_selector(e, ex, pads, tmp_path):
    kw = {k: (e.cls.write_example_profile(tmp_path / "p.json", num_layers=4, num_heads=4, num_kv_heads=2)
              if v == "<profile>" else v) for k, v in ex.items()}
    sel = e.cls(**kw)
    layer_idx = 1
    if hasattr(sel, "selection_layers"):
        layer_idx = sel.selection_layers(4)[0]
    pq = torch.randn(2, 4, 150, 8, generator=torch.Generator().manual_seed(5))
    step = _step(n=150, pads=pads, layer_idx=layer_idx, sel=sel, prefill_q=pq)
    if type(sel).reference_select is longattn.DecodeSelector.reference_select:
        pytest.fail(f"{e.name}: define reference_select (its definition, loop by loop) beside the selector")
    want = sel.reference_select(step, pq)
    got = _sets(*sel.select(step))
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == want[key], f"{e.name} {key}: {sorted(got[key] ^ want[key])[:10]} differ"


def test_magicpig_output_is_the_importance_weighted_estimate():
    """attend() = sum over static + sampled keys of (e^s / u) v / sum (e^s / u), u = P(Bin(L, (1-theta/pi)^K) >= m)
    with theta the angle to the centred key (static keys weight 1), computed here loop by loop."""
    from longattn.decode import MagicPIG

    sel = MagicPIG(bits=2, tables=8, min_match=2, sink=2, recent=4)
    step = _step(n=60, pads=(0, 9))
    chosen = sel.reference_select(step)
    got = sel.attend(step)
    b, hq, _, d = step.q.shape
    g = hq // step.k.shape[1]
    for bi in range(b):
        real = [j for j in range(60) if bool(step.key_valid[bi, j])]
        static = set(real[:2]) | {j for j in real if j >= 56}
        for h in range(hq):
            kh = h // g
            mean = [sum(float(step.k[bi, kh, j, t]) for j in real) / len(real) for t in range(d)]
            qv = [float(x) for x in step.q[bi, h, 0]]
            num, den = [0.0] * d, 0.0
            for j in chosen[bi, h]:
                kv = [float(x) for x in step.k[bi, kh, j]]
                w = math.exp(sum(a * c for a, c in zip(qv, kv)) * step.scale)
                if j not in static:
                    kc = [kv[t] - mean[t] for t in range(d)]
                    cos = sum(a * c for a, c in zip(qv, kc)) / (math.sqrt(sum(a * a for a in qv)) *
                                                                 math.sqrt(sum(c * c for c in kc)))
                    p = (1 - math.acos(max(-1.0, min(1.0, cos))) / math.pi) ** 2
                    u = 1 - sum(math.comb(8, i) * p**i * (1 - p) ** (8 - i) for i in range(2))
                    w /= u
                den += w
                for t in range(d):
                    num[t] += w * float(step.v[bi, kh, j, t])
            want = torch.tensor([x / den for x in num])
            torch.testing.assert_close(got[bi, h, 0].double(), want.double(), rtol=1e-4, atol=1e-5)


def test_magicpig_hash_tables_find_what_comparing_every_code_finds(monkeypatch):
    """The bucket lookup (and the decoded keys kept apart, then folded into the tables) samples exactly the keys
    that comparing every key's code with the query's samples, step after step as keys arrive."""
    from longattn.decode import MagicPIG
    from longattn.decode.magicpig import collisions, lookup, simhash

    codes = torch.randint(0, 8, (2, 3, 200, 5), generator=torch.Generator().manual_seed(0), dtype=torch.int16)
    qc = torch.randint(0, 8, (2, 3, 4, 5), generator=torch.Generator().manual_seed(1), dtype=torch.int16)
    from longattn.decode.magicpig import build_tables

    assert torch.equal(lookup(*build_tables(codes, 3), qc), collisions(codes, qc).int())
    monkeypatch.setattr(MagicPIG, "TAIL_MAX", 3)
    sel = MagicPIG(bits=3, tables=12, min_match=2, sink=0, recent=0)
    full = _step(n=150, pads=(0, 13))
    layer = LongattnLayer()
    folds = 0
    for n in range(120, 151):
        kv = full.key_valid[:, :n]
        step = Step(full.q, full.k[:, :, :n], full.v[:, :, :n], kv, layer, 1, 4, full.scale)
        idx, ok = sel.select(step)
        st = layer.decode_state["magicpig"]
        folds += st.tail.shape[2] == 0 and n > 120
        hk, g = full.k.shape[1], full.q.shape[1] // full.k.shape[1]
        kvh = torch.arange(full.q.shape[1]) // g
        qh = simhash(full.q.float(), st.planes[kvh], 12, 3).view(2, hk, g, 12)
        want = (collisions(simhash(step.k.float() - st.mean, st.planes, 12, 3), qh).view(2, -1, n) >= 2) \
            & kv.bool()[:, None]
        got = _sets(idx, ok)
        for (bi, h), keys in got.items():
            assert keys == set(want[bi, h].nonzero().view(-1).tolist()), (n, bi, h)
    assert folds >= 5  # the decoded keys were folded into the tables several times


def test_twilight_quantized_copy_grows_in_place_and_equals_quantizing_every_key():
    from longattn.decode import Twilight
    from longattn.decode.twilight import quantize_keys

    sel = Twilight(inner="quest/budget=48/page=8", top_p=0.8)
    full = _step(n=150, pads=(0, 13))
    layer = LongattnLayer()
    layer.update(full.k[:, :, :100], full.v[:, :, :100])
    sel.on_prefill(layer, 1, full.q, layer.keys, full.key_valid[:, :100])
    grew = 0
    for n in range(100, 151):
        if n > 100:  # one decoded token
            layer.update(full.k[:, :, n - 1 : n], full.v[:, :, n - 1 : n])
        step = Step(full.q, layer.keys, layer.values, full.key_valid[:, :n], layer, 1, 4, full.scale)
        cap = layer.decode_state["twilight"].codes.shape[2]
        idx, keep = sel.select(step)
        st = layer.decode_state["twilight"]
        grew += st.codes.shape[2] != cap
        codes, scale = quantize_keys(full.k[:, :, :n], 4)
        assert st.n == n and torch.equal(st.codes[:, :, :n], codes) and torch.equal(st.scale[:, :, :n], scale)
        other = LongattnLayer()
        other.update(full.k[:, :, :n], full.v[:, :, :n])
        fresh = Step(full.q, other.keys, other.values, full.key_valid[:, :n], other, 1, 4, full.scale)
        assert _sets(idx, keep) == _sets(*sel.select(fresh)), n
    assert 1 <= grew <= 3  # the buffer grew a few times, not at every step


def test_twilight_keeps_few_tokens_for_a_peaked_head_and_many_for_a_flat_one():
    from longattn.decode import Twilight

    step = _step(n=96, pads=None)
    step.q[:, 0] = 0.0  # head 0: a flat softmax
    step.q[:, 1, 0] = step.k[:, 0, 40] * 30.0  # head 1: all its attention on token 40
    sel = Twilight(inner="quest/budget=96/page=16", top_p=0.9, bits=0)
    idx, keep = sel.select(step)
    kept = keep.sum(-1)
    assert int(kept[0, 1]) <= 3 and 40 in idx[0, 1][keep[0, 1]].tolist()
    assert int(kept[0, 0]) >= 0.8 * 96


def test_shadowkv_moves_the_chunks_out_of_the_cache_and_keeps_factors():
    """After the first step the layer holds only the exact tokens (sinks, outlier chunks, recent, appended);
    keys live on as rank-r factors and values in the store; full rank and budget decode as dense (generic test)."""
    from longattn.cache import cache_nbytes

    m = tiny_model("llama", num_hidden_layers=2)
    ids, _ = ids_batch(1, 150, pad=(0,))
    with torch.no_grad(), longattn.apply(m, "shadowkv:budget=32:chunk=8:rank=4:sink=4:recent=8:outliers=0.1") as s:
        out = m.generate(ids, max_new_tokens=4, do_sample=False)
        layer = s.cache.layers[1]
        st = layer.decode_state["shadowkv"]
        exact = layer.keys.shape[2]
        nbytes = cache_nbytes(s.cache)
    chunks = (150 + 1 - 8 - 4) // 8  # built at the first decode step: 151 tokens
    outl = math.ceil(0.1 * chunks)
    assert exact == 4 + outl * 8 + (151 - 4 - chunks * 8) + 2  # sinks, outliers, the tail, 2 appended since
    assert st.a.shape == (1, chunks * 8, 4) and st.bmat.shape == (1, 4, 2 * 16)
    assert st.values.shape == (1, 2, chunks, 8, 16) and out.shape == (1, 154)
    full = m(out, use_cache=True).past_key_values
    assert nbytes < sum(la.keys.numel() * 8 for la in full.layers)


@pytest.mark.parametrize("cap", [64, 50], ids=["buffer-whole-pages", "buffer-not-whole-pages"])
@pytest.mark.parametrize("n", [37, 48], ids=["partial-newest-page", "whole-pages"])
@pytest.mark.parametrize("need_lse", [True, False], ids=["lse", "output-only"])
def test_gather_attention_by_pages_equals_the_reference_over_their_tokens(cap, n, need_lse, monkeypatch):
    """``page_size``: page ids in, the attention over exactly their tokens below the cache's end out (the
    reference, masked by hand); a buffer of whole pages is read page by page (``gather_pages``), with garbage
    (NaN) in its room never reaching the output; otherwise token by token. The page path is the one taken."""
    import longattn.ops.decode as dec

    g = torch.Generator().manual_seed(4)
    ps = 16
    buf_k, buf_v = torch.randn(2, 2, cap, 8, generator=g), torch.randn(2, 2, cap, 8, generator=g)
    buf_k[:, :, n:], buf_v[:, :, n:] = float("nan"), float("nan")  # room past the cache's end
    k, v = buf_k[:, :, :n], buf_v[:, :, :n]
    q = torch.randn(2, 4, 1, 8, generator=g)
    last = (n - 1) // ps
    kv = _key_valid(2, n, (0, 3))
    real = dec.gather_pages
    # every row ends with the newest page (its tail is cut off); one row without it (masked); any order (masked)
    for pages in (torch.tensor([[[0, last], [1, last]], [[1, last], [0, last]]]),
                  torch.tensor([[[0, last], [1, last]], [[0, 1], [1, last]]]),
                  torch.tensor([[[last, 0], [1, last]], [[1, 0], [last, 1]]])):
        pm = torch.zeros(2, 4, 1, n, dtype=torch.bool)  # the pages' tokens below the cache's end
        for bi in range(2):
            for h in range(4):
                for p in pages[bi, h // 2].tolist():
                    for t in range(p * ps, min((p + 1) * ps, n)):
                        pm[bi, h, 0, t] = True
        for key_valid, mask in ((kv, pm & kv[:, None, None, :]), (None, pm)):
            calls = []
            monkeypatch.setattr(dec, "gather_pages", lambda *a, calls=calls: calls.append(real(*a)) or calls[-1])
            out, lse = gather_attention(q, k, v, pages, key_valid=key_valid, page_size=ps, need_lse=need_lse)
            assert (calls[0] is not None) == (cap % ps == 0)
            ref, ref_lse = reference.attention(q, k.contiguous(), v.contiguous(), causal=False, mask=mask)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            if need_lse:
                torch.testing.assert_close(lse, ref_lse.float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="valid"):
        gather_attention(q, k, v, pages, valid=torch.ones_like(pages, dtype=torch.bool), page_size=ps)


def test_grown_cache_buffers_hold_whole_pages():
    """``grown_capacity``: the tokens plus the room; from a room of 256 tokens (4096 tokens) on, rounded up to a
    multiple of 256 (so long caches are read page by page by every page selector's default), less than 256 more;
    shorter caches not rounded (their memory counts more than a gather)."""
    from longattn.cache.layer import GROW_DIV, GROW_MIN, grown_capacity

    for n in (1, 40, 255, 1000, 4095, 4096, 8192, 8193, 131072):
        room = max(GROW_MIN, n // GROW_DIV)
        c = grown_capacity(n, 1)
        if room >= 256:
            assert c % 256 == 0 and n + 1 + room <= c < n + 1 + room + 256
        else:
            assert c == n + 1 + room


def test_gather_attention_reads_a_cache_with_room_in_one_gather(monkeypatch):
    """The cache layer's keys are the head of a larger buffer (room to grow): not contiguous, yet gathered with
    one index_select over the buffer (the per-row fallback is for other views), equal to the contiguous result."""
    from longattn.ops.core import buffer_capacity

    g = torch.Generator().manual_seed(3)
    buf_k, buf_v = torch.randn(2, 2, 50, 8, generator=g), torch.randn(2, 2, 50, 8, generator=g)
    k, v = buf_k[:, :, :37], buf_v[:, :, :37]
    q = torch.randn(2, 4, 1, 8, generator=g)
    idx = torch.stack([torch.randperm(37, generator=g)[:12] for _ in range(4)]).view(2, 2, 12)
    assert not k.is_contiguous() and buffer_capacity(k) == 50 and buffer_capacity(k.contiguous()) == 37
    assert buffer_capacity(k.transpose(2, 3)) == 0
    want, lse2 = gather_attention(q, k.contiguous(), v.contiguous(), idx)

    def no_stack(*a, **kw):
        raise AssertionError("the per-row gather ran")
    monkeypatch.setattr(torch, "stack", no_stack)  # the per-row fallback stacks its rows
    got, lse = gather_attention(q, k, v, idx)
    monkeypatch.undo()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse2, rtol=0, atol=0)
