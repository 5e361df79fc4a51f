import pytest
import torch
import torch.nn.functional as F

from longattn import reference
from longattn.layout import BlockLayout
from longattn.ops import block_sparse_attention, can_run, choose_backend, merge_attention
from longattn.prefill import SinkWindow


def _case(b, hq, hk, nq, nk, bs, d=32, dtype=torch.float32, density=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    k = torch.randn(b, hk, nk, d, generator=g).to(dtype)
    v = torch.randn(b, hk, nk, d, generator=g).to(dtype)
    nqb, nkb = -(-nq // bs), -(-nk // bs)
    m = torch.rand(b, hq, nqb, nkb, generator=g) < density
    lay = BlockLayout.from_block_mask(m, block_size=bs, q_len=nq, kv_len=nk)
    return q, k, v, lay


CASES = {
    "causal-gqa-odd": dict(b=2, hq=4, hk=2, nq=200, nk=200, bs=16, causal=True),
    "causal-mha-cross": dict(b=1, hq=2, hk=2, nq=100, nk=300, bs=32, causal=True),
    "noncausal-mqa": dict(b=2, hq=4, hk=1, nq=150, nk=170, bs=16, causal=False),
    "causal-exact-blocks": dict(b=1, hq=4, hk=2, nq=128, nk=128, bs=64, causal=True),
}


@pytest.mark.parametrize("backend", ["gather", "dense", "flex"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "padded"])
def test_float32_equals_reference(backend, case, padded):
    c = dict(CASES[case])
    causal = c.pop("causal")
    q, k, v, lay = _case(**c)
    key_valid = None
    mask = lay.to_dense_mask(causal=causal)
    if padded:
        key_valid = torch.ones(q.shape[0], k.shape[2], dtype=torch.bool)
        key_valid[0, :13] = False  # left padding of row 0
        mask = mask & key_valid[:, None, None, :]
    ref, _ = reference.attention(q, k, v, causal=causal, mask=mask)
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, lay, causal=causal, backend=backend, key_valid=key_valid)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["gather", "flex"])
def test_window_equals_reference(backend):
    q, k, v, lay = _case(1, 4, 2, 160, 160, 16)
    ref, _ = reference.attention(q, k, v, mask=lay.to_dense_mask(), window=40)
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, lay, backend=backend, window=40)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_gather_returns_lse_and_grad():
    q, k, v, lay = _case(1, 4, 2, 96, 96, 16, d=16)
    q.requires_grad_(True)
    out, lse = block_sparse_attention(q, k, v, lay, backend="gather", return_lse=True)
    ref, ref_lse = reference.attention(q, k, v, mask=lay.to_dense_mask())
    torch.testing.assert_close(out, ref.float(), rtol=0, atol=1e-5)
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin].float(), rtol=0, atol=1e-5)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("backend", ["gather", "flex"])
def test_bfloat16_within_twice_sdpa_error(backend):
    q, k, v, lay = _case(1, 4, 2, 256, 256, 32, d=64, dtype=torch.bfloat16, density=0.5)
    mask = lay.to_dense_mask()
    ref, _ = reference.attention(q.double(), k.double(), v.double(), mask=mask)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    sdpa = torch.where(mask.any(-1, keepdim=True), sdpa, torch.zeros_like(sdpa))
    err_sdpa = (sdpa.double() - ref).abs().max().item()
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, lay, backend=backend)
    assert out.dtype == torch.bfloat16
    err = (out.double() - ref).abs().max().item()
    assert err <= 2 * err_sdpa, (err, err_sdpa)


def test_full_layout_equals_dense_attention():
    q, k, v, _ = _case(2, 4, 2, 130, 130, 32)
    full = torch.ones(2, 4, 5, 5, dtype=torch.bool)
    lay = BlockLayout.from_block_mask(full, block_size=32, seq_len=130)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(block_sparse_attention(q, k, v, lay, backend="gather"), ref, rtol=0, atol=1e-5)


def test_explicit_backend_refused_with_reason():
    q, k, v, lay = _case(1, 2, 2, 64, 64, 16)
    with pytest.raises(ValueError, match="dense.*log-sum-exp"):
        block_sparse_attention(q, k, v, lay, backend="dense", return_lse=True)
    with pytest.raises(ValueError, match="backend='nope'.*allowed"):
        block_sparse_attention(q, k, v, lay, backend="nope")
    qg = q.clone().requires_grad_(True)
    ok, why = can_run("flex", qg, k, v, lay)
    assert not ok and "inference only" in why
    with pytest.raises(ValueError, match="inference only"):
        block_sparse_attention(qg, k, v, lay, backend="flex")


def test_auto_choice_explains():
    q, k, v, lay = _case(1, 2, 2, 64, 64, 16)
    with torch.no_grad():
        be, why = choose_backend(q, k, v, lay)
    assert be == "gather" and "compilation" in why
    be, why = choose_backend(q, k, v, lay, return_lse=True)
    assert be == "gather" and why


def test_bad_layout_inputs():
    q, k, v, lay = _case(1, 2, 2, 64, 64, 16)
    with pytest.raises(ValueError, match="layout is for"):
        block_sparse_attention(q[:, :, :32], k, v, lay)
    with pytest.raises(ValueError, match="key_valid"):
        block_sparse_attention(q, k, v, lay, key_valid=torch.ones(1, 3, dtype=torch.bool))


def test_flex_does_not_recompile_for_same_shapes():
    import torch._dynamo.utils as du

    q, k, v, lay = _case(1, 4, 2, 192, 192, 32, seed=1)
    with torch.no_grad():
        block_sparse_attention(q, k, v, lay, backend="flex")
        before = du.counters["stats"]["unique_graphs"]
        for seed in (2, 3, 4):
            q2, k2, v2, lay2 = _case(1, 4, 2, 192, 192, 32, seed=seed, density=0.2 + 0.2 * (seed - 2))
            out = block_sparse_attention(q2, k2, v2, lay2, backend="flex")
            ref, _ = reference.attention(q2, k2, v2, mask=lay2.to_dense_mask())
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
        assert du.counters["stats"]["unique_graphs"] == before


@pytest.mark.parametrize("splits", [1, 2, 3, 5, 8])
def test_merge_equals_reference(splits):
    q = torch.randn(2, 4, 3, 16)
    k, v = torch.randn(2, 4, 37, 16), torch.randn(2, 4, 37, 16)
    ref, ref_lse = reference.attention(q, k, v, causal=False)
    bounds = torch.linspace(0, 37, splits + 1).long().tolist()
    outs, lses = [], []
    for s, e in zip(bounds[:-1], bounds[1:]):
        o, lse = reference.attention(q, k[:, :, s:e], v[:, :, s:e], causal=False)
        outs.append(o)
        lses.append(lse)
    out, lse = merge_attention(outs, lses)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-5)


def test_merge_with_empty_partial():
    q = torch.randn(1, 1, 2, 8)
    k, v = torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    o, lse = reference.attention(q, k, v, causal=False)
    empty_o, empty_lse = torch.zeros_like(o), torch.full_like(lse, float("-inf"))
    out, l2 = merge_attention([empty_o, o], [empty_lse, lse])
    torch.testing.assert_close(out, o)


def test_sink_window_layout_blocks():
    lay = SinkWindow(sink=16, window=32, block_size=16).layout_for(96, 96)
    bm = lay.to_block_mask()[0, 0]
    # query block 5 (positions 80..95): sink block 0 + window blocks 3, 4, 5 (32 tokens back from 80 is 48)
    assert bm[5].nonzero().flatten().tolist() == [0, 3, 4, 5]
    assert bm[0].nonzero().flatten().tolist() == [0]


def test_sink_window_validation():
    with pytest.raises(ValueError, match="window"):
        SinkWindow(window=0)
    with pytest.raises(ValueError, match="sink"):
        SinkWindow(sink=-1)
    with pytest.raises(ValueError, match="block_size"):
        SinkWindow(block_size=48)
    with pytest.raises(ValueError, match="backend"):
        SinkWindow(backend="cuda")


class _Always(set):
    def __contains__(self, item):  # every call kind compiles statically (as after a failed dynamic compile)
        return True


@pytest.mark.parametrize("causal,padded", [(True, False), (False, True)], ids=["causal-rule", "noncausal-rule-padded"])
def test_static_compiles_are_bucketed_nearby_lengths_share_one_graph(monkeypatch, causal, padded):
    """A call kind whose dynamic compile failed compiles per shape; lengths are padded to a bucket (the padded keys
    masked, the rule evaluated at real positions only: it may index per-position tensors) so that two nearby
    lengths reuse one graph, and each output equals the reference of its own length."""
    import torch._dynamo.utils as du

    from longattn.layout import TokenRule
    from longattn.ops import flex

    monkeypatch.setattr(flex, "_STATIC_ONLY", _Always())
    assert flex.bucket_len(200, 32) == flex.bucket_len(210, 32) == 224 and flex.bucket_len(224, 32) == 224
    counts = []
    for n in (200, 210):
        q, k, v, lay0 = _case(1, 2, 2, n, n, 32, seed=n)
        cols = (torch.arange(n) % 3 != 1)[None, None]  # per-position tensors (padded to the bucket with the call)
        diags = (torch.arange(n) < 40)[None, None]
        rule = TokenRule(columns=cols, diagonals=diags)
        lay = BlockLayout.from_block_mask(lay0.to_block_mask(), block_size=32, q_len=n, kv_len=n, rule=rule)
        key_valid = None
        mask = lay.to_dense_mask(causal=causal)
        if padded:
            key_valid = torch.ones(1, n, dtype=torch.bool)
            key_valid[0, :7] = False
            mask = mask & key_valid[:, None, None, :]
        ref, _ = reference.attention(q, k, v, causal=causal, mask=mask)
        with torch.no_grad():
            out = block_sparse_attention(q, k, v, lay, causal=causal, backend="flex", key_valid=key_valid)
        assert out.shape == q.shape
        torch.testing.assert_close(torch.nan_to_num(out), torch.nan_to_num(ref), rtol=0, atol=1e-5)
        counts.append(du.counters["stats"]["unique_graphs"])
    assert counts[1] == counts[0]  # the second length compiled nothing new


def test_vertical_slash_compiles_once_for_every_length(monkeypatch):
    """Regression: its rule indexes per-position tensors, and with duck sizing (query and key lengths sharing one
    symbol) torch 2.13's CPU inductor emitted C++ naming an undeclared ``cur_qSplitSize``: every new length then
    compiled again (seconds per bench sample). Now one dynamic graph serves every length, equal to gather."""
    import warnings

    import torch._dynamo.utils as du

    from longattn.ops import flex
    from longattn.prefill import VerticalSlash

    monkeypatch.setattr(flex, "_STATIC_ONLY", set())
    fast = VerticalSlash(vertical=64, slash=32, block_size=64, backend="flex")
    ref = VerticalSlash(vertical=64, slash=32, block_size=64, backend="gather")
    graphs = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to per-shape compiles
        for n in (300, 420, 530):
            g = torch.Generator().manual_seed(n)
            q, k, v = (torch.randn(1, 4, n, 64, generator=g) for _ in range(3))
            torch.testing.assert_close(fast.attend(q, k, v), ref.attend(q, k, v), rtol=0, atol=1e-5)
            graphs.append(du.counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0] and graphs[2] == graphs[0]


def test_compile_seconds_count_a_compiling_call_once_and_not_its_reruns():
    import torch

    from longattn.ops import flex

    fn = torch.compile(lambda x: (x * 3).sin() + 0.123456, dynamic=False)
    c0 = flex.compile_seconds()
    out = flex._call(fn, torch.randn(7, 5))
    c1 = flex.compile_seconds()
    assert c1 > c0 and out.shape == (7, 5)
    flex._call(fn, torch.randn(7, 5))  # compiled already: nothing counts
    assert flex.compile_seconds() == c1
