"""Every prefill pattern against a slow, obviously-right reference of the token pairs it claims, and against
``reference.py`` for its output; full budgets equal dense attention; bad settings raise ValueError by name."""

import json
import math

import pytest
import torch

import longattn
from longattn import attention_recall, reference, registry
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
from longattn.profiles import EXAMPLE

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


def _example_id(cls, i: int) -> str:
    return cls.name if len(cls.examples) == 1 else f"{cls.name}-{i}"


def _examples(tmp=None):
    """Every registered pattern's declared examples: ``{id: instance}`` (a profile they name is written)."""
    import tempfile
    from pathlib import Path

    out = {}
    for e in registry.entries("prefill"):
        for i, ex in enumerate(e.cls.examples):
            kw = dict(ex)
            for key, val in kw.items():
                if val == EXAMPLE:
                    path = Path(tmp or tempfile.mkdtemp()) / f"{e.name}-{i}.json"
                    kw[key] = e.cls.write_example_profile(path, num_layers=1, num_heads=4, num_kv_heads=2)
            out[_example_id(e.cls, i)] = e.cls(**kw)
    return out


ALL = _examples()
# patterns checked by their token set; core_context changes the keys and is checked by its output
SLOW = {name: p for name, p in ALL.items() if type(p).reference_mask is not longattn.PrefillPattern.reference_mask}


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("name", list(SLOW), ids=list(SLOW))
def test_layout_equals_slow_reference(name, padded):
    p = SLOW[name]
    causal = p.is_causal()
    hw = getattr(p, "hw", None)
    n = 150 if hw is None else hw[0] * hw[1]
    q, k, _ = _qkv(nq=n, nk=n)
    kv = _padding(2, n) if padded else None
    lay = p.layout(q, k, kv)
    got, want = torch.broadcast_tensors(lay.to_dense_mask(causal=causal, heads=q.shape[1]), p.reference_mask(q, k, kv))
    got, want = got.expand(2, 4, -1, -1), want.expand(2, 4, -1, -1)
    if kv is not None:  # pairs with padded keys are masked by the kernel anyway
        got, want = got & kv[:, None, None, :], want & kv[:, None, None, :]
    assert torch.equal(got, want), f"{name}: {int((got != want).sum())} pairs differ"


def test_layouts_with_queries_over_a_longer_cache():
    """q_len < kv_len (a chunk of queries over earlier keys): the reference's end alignment."""
    q, k, _ = _qkv(nq=70, nk=150)
    for name in ("sink_window", "vertical_slash", "block_topk-0", "hierarchical", "strided_window",
                 "shifted_groups-0", "bilevel_routing-0", "xattention-0", "xattention-1", "flexprefill-0",
                 "flexprefill-2"):
        p = SLOW[name]
        got, want = torch.broadcast_tensors(p.layout(q, k).to_dense_mask(heads=4), p.reference_mask(q, k, None))
        assert torch.equal(got, want), name


def test_two_d_neighborhood_and_routing_equal_slow_reference():
    q, k, _ = _qkv(b=1, hq=2, hk=2, nq=120, nk=120)
    p = Neighborhood(kernel_size=3, dilation=2, stride=2, causal=False, image="12x10", block_size=BS)
    got = p.layout(q, k).to_dense_mask(causal=False)
    assert torch.equal(got[0, 0], p.reference_mask(q, k, None)[0, 0])
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
def _with_backend(p, backend):
    import dataclasses

    return dataclasses.replace(p, backend=backend)


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
        ref = p.reference_output(q, k, v, kv).float()
    else:
        mask = p.layout(q, k, kv).to_dense_mask(causal=causal, heads=q.shape[1])
        if kv is not None:
            mask = mask & kv[:, None, None, :]
        ref, _ = reference.attention(q, k, v, mask=mask, causal=causal)
    if kv is not None:  # padded query rows are free to differ
        out, ref = out * kv[:, None, :, None], ref * kv[:, None, :, None]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


FULL = {e.name: e.cls(**e.cls.full_example) for e in registry.entries("prefill") if e.cls.full_example is not None}


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
    specs = ["sink_window:sink=8:window=24:block_size=16", "dense", "vertical_slash:vertical=10:slash=8:obs_window=8:"
             "sink=2:window=2:block_size=16", "shifted_groups:group=40:block_size=16"]
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
    (lambda: VerticalSlash(obs_window=0), "obs_window"),
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


def test_flexprefill_sizes_lines_to_the_mass_gamma():
    """The fewest entries whose sorted mass reaches gamma, plus one, in blocks (the paper code's rule)."""
    from longattn.prefill.flexprefill import cover_blocks, js_sqrt

    x = torch.tensor([[0.5, 0.3, 0.2]])
    assert cover_blocks(x, 0.8, 3).tolist() == [2]  # 2 entries within 0.8, +1 -> 3 tokens -> 3 // 3 + 1 blocks
    assert cover_blocks(x, 0.4, 3).tolist() == [1]
    p, q = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert abs(float(js_sqrt(p, q)) - math.sqrt(math.log(2))) < 1e-6 and float(js_sqrt(p, p)) == 0.0
