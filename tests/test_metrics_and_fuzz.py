"""Metrics and scoring on hand-computed inputs; gradients and lse against the reference; a seeded fuzz sweep of
every backend and decode op against ``reference.py`` (fixed number of cases; flex on a small fixed set of shapes,
since every new shape compiles)."""

import math
import random

import pytest
import torch

from longattn import reference
from longattn.bench.metrics import fidelity
from longattn.layout import BlockLayout
from longattn.ops import block_sparse_attention, merge_attention
from longattn.ops.decode import gather_attention, split_k_attention


# ---- fidelity and scoring ------------------------------------------------------------------------------------
def test_fidelity_is_kl_of_dense_to_the_method_and_top1():
    ref = torch.log(torch.tensor([[0.5, 0.5], [0.7, 0.3]], dtype=torch.float64))
    got = torch.log(torch.tensor([[0.9, 0.1], [0.6, 0.4]], dtype=torch.float64))
    kl, top1 = fidelity(ref, got)
    want = (0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1) + 0.7 * math.log(0.7 / 0.6)
            + 0.3 * math.log(0.3 / 0.4)) / 2
    assert kl == pytest.approx(want, rel=1e-9)  # KL(dense || method), not the reverse (0.204 here)
    assert top1 == 1.0
    _, top1 = fidelity(ref, torch.log(torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64)))
    assert top1 == 0.5
    assert fidelity(ref, ref) == (0.0, 1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        fidelity(ref, ref[:1])


@pytest.mark.parametrize("pred,answer,score", [("The pass key is 48213.", "48213", 1.0), ("4821", "48213", 0.0),
                                               ("12345 48213", "48213", 1.0), ("", "48213", 0.0)])
def test_substring_scoring_on_hand_made_answers(pred, answer, score):
    from longattn.bench.tasks.base import Sample
    from longattn.bench.tasks.passkey import Passkey

    s = Sample("x", "ctx", "q", "p", [answer])
    t = Passkey()
    assert t.score(pred, s) == score and t.correct(t.score(pred, s)) == (score == 1.0)


def test_a_record_is_correct_only_when_its_answer_is():
    """Dense is the reference of fidelity, not of correctness: a wrong dense answer is recorded wrong."""
    from longattn.bench.records import make_record
    from longattn.bench.tasks.base import Sample
    from longattn.bench.tasks.passkey import Passkey

    s = Sample("x", "ctx", "q", "p", ["48213"])
    res = {"prediction": "I do not know", "kv_cache_bytes": 1, "peak_bytes": 1, "prefill_s": 1.0,
           "decode_tok_s": 1.0, "method_s": 0.0, "kl": 0.0, "top1_agree": 1.0, "decode_s": 1.0, "n_tokens": 3,
           "kv_cache_bytes_end": 1, "protocol": "question_agnostic", "recall": None, "decode_density": None}
    key = {"task": "passkey", "method": "dense", "length": 64, "sample": 0, "model": "m", "seed": 0, "protocol": "qa"}
    import longattn

    rec = make_record(task="passkey", method="dense", recipe=longattn.parse("dense"), length=64, sample_obj=s,
                      res=res, task_obj=Passkey(), key=key, run_id="r", env={})
    assert rec["correct"] is False and rec["score"] == 0.0


# ---- gradients and lse ---------------------------------------------------------------------------------------------
def _random_layout(b, h, nq, nk, bs, density, seed):
    g = torch.Generator().manual_seed(seed)
    nqb, nkb = -(-nq // bs), -(-nk // bs)
    m = torch.rand(b, h, nqb, nkb, generator=g) < density
    m[..., -1] = True  # every query block sees at least its last kv block
    return BlockLayout.from_block_mask(m, block_size=bs, q_len=nq, kv_len=nk)


def test_gather_gradients_equal_the_reference_gradients():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 70, 16, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 90, 16, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 90, 16, generator=g, dtype=torch.float64, requires_grad=True)
    kv = torch.ones(2, 90, dtype=torch.bool)
    kv[0, :11] = False
    lay = _random_layout(2, 4, 70, 90, 16, 0.5, 1)
    w = torch.randn(2, 4, 70, 16, generator=g, dtype=torch.float64)
    out, lse = block_sparse_attention(q, k, v, lay, backend="gather", key_valid=kv, return_lse=True)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    mask = lay.to_dense_mask(causal=True, heads=4) & kv[:, None, None, :]
    ref, ref_lse = reference.attention(q, k, v, mask=mask)
    rgrads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    rows = mask.any(-1)
    torch.testing.assert_close(lse[rows].double(), ref_lse[rows], rtol=0, atol=1e-6)
    for a, b_, name in zip(grads, rgrads, "qkv"):
        torch.testing.assert_close(a, b_, rtol=1e-6, atol=1e-8, msg=f"d{name}")


def test_merge_with_an_empty_partial_keeps_the_lse():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 8, generator=g) for _ in range(3))
    o, lse = reference.attention(q, k, v, causal=False)
    out, l2 = merge_attention([torch.zeros_like(o), o], [torch.full_like(lse, float("-inf")), lse])
    torch.testing.assert_close(out, o.to(out.dtype), rtol=0, atol=1e-6)
    torch.testing.assert_close(l2, lse.to(l2.dtype), rtol=0, atol=1e-6)
    out, l3 = merge_attention([o, o], [torch.full_like(lse, float("-inf"))] * 2)
    assert torch.isinf(l3).all() and (out == 0).all()


# ---- seeded fuzz sweep ------------------------------------------------------------------------------------------------
def _fuzz_case(rng: random.Random):
    hk = rng.choice([1, 2, 3])
    hq = hk * rng.choice([1, 2, 4])
    b = rng.choice([1, 2])
    nq = rng.randint(1, 150)
    nk = nq + rng.choice([0, 0, rng.randint(1, 60)])
    d = rng.choice([8, 16, 32])
    bs = rng.choice([16, 32, 64])
    dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16])
    causal = rng.random() < 0.7
    pad = rng.random() < 0.5
    window = rng.choice([None, None, rng.randint(1, 80)])
    return dict(b=b, hq=hq, hk=hk, nq=nq, nk=nk, d=d, bs=bs, dtype=dtype, causal=causal, pad=pad, window=window,
                density=rng.uniform(0.1, 1.0), seed=rng.randint(0, 10**6),
                softcap=rng.choice([None, None, rng.uniform(1.0, 5.0)]), sinks=rng.random() < 0.3)


def _inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    q = torch.randn(c["b"], c["hq"], c["nq"], c["d"], generator=g).to(c["dtype"])
    k = torch.randn(c["b"], c["hk"], c["nk"], c["d"], generator=g).to(c["dtype"])
    v = torch.randn(c["b"], c["hk"], c["nk"], c["d"], generator=g).to(c["dtype"])
    kv = None
    if c["pad"]:
        kv = torch.ones(c["b"], c["nk"], dtype=torch.bool)
        kv[0, : c["nk"] // 4] = False
    return q, k, v, kv


def _tol(dtype):
    return dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=4e-2)


def _sinks(c):
    return None if not c.get("sinks") else torch.randn(c["hq"], generator=torch.Generator().manual_seed(c["seed"]))


def _check_against_reference(c, backend):
    q, k, v, kv = _inputs(c)
    lay = _random_layout(c["b"], c["hq"], c["nq"], c["nk"], c["bs"], c["density"], c["seed"])
    sinks = _sinks(c)
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, lay, causal=c["causal"], key_valid=kv, window=c["window"],
                                     backend=backend, softcap=c.get("softcap"), sinks=sinks)
    mask = lay.to_dense_mask(causal=c["causal"], window=c["window"], heads=c["hq"])
    if kv is not None:
        mask = mask & kv[:, None, None, :]
    ref, _ = reference.attention(q, k, v, mask=mask, causal=False, softcap=c.get("softcap"), sinks=sinks)
    rows = mask.any(-1, keepdim=True)
    torch.testing.assert_close(out.float() * rows, ref.float() * rows, **_tol(c["dtype"]), msg=str(c))


CASES = [_fuzz_case(random.Random(1000 + i)) for i in range(40)]


@pytest.mark.parametrize("backend", ["gather", "dense"])
@pytest.mark.parametrize("i", range(len(CASES)))
def test_fuzz_block_sparse_backends(i, backend):
    c = CASES[i]
    if not c["causal"] or c["nq"] <= c["nk"]:
        _check_against_reference(c, backend)


FLEX = [dict(b=2, hq=4, hk=2, nq=96, nk=96, d=16, bs=32, dtype=torch.float32, causal=True, pad=True, window=None,
             density=0.5, seed=5, softcap=2.5),
        dict(b=1, hq=2, hk=1, nq=64, nk=128, d=32, bs=32, dtype=torch.float32, causal=True, pad=False, window=40,
             density=0.6, seed=6),
        dict(b=1, hq=3, hk=3, nq=80, nk=80, d=16, bs=16, dtype=torch.bfloat16, causal=False, pad=False, window=None,
             density=0.4, seed=7)]


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(FLEX)))
def test_fuzz_flex_on_fixed_shapes(i):
    _check_against_reference(FLEX[i], "flex")


DECODE = [_fuzz_case(random.Random(5000 + i)) for i in range(30)]


@pytest.mark.parametrize("i", range(len(DECODE)))
def test_fuzz_decode_ops(i):
    c = dict(DECODE[i], nq=1)
    q, k, v, kv = _inputs(c)
    rng = random.Random(c["seed"])
    splits = rng.randint(1, 6)
    softcap, sinks = c.get("softcap"), _sinks(c)
    with torch.no_grad():
        out, lse = split_k_attention(q, k, v, splits=splits, key_valid=kv, softcap=softcap, sinks=sinks)
        ref, ref_lse = reference.attention(q, k, v, causal=False, mask=None if kv is None else kv[:, None, None, :],
                                           softcap=softcap, sinks=sinks)
        torch.testing.assert_close(out.float(), ref.float(), **_tol(c["dtype"]), msg=str(c))
        torch.testing.assert_close(lse, ref_lse.float(), **_tol(c["dtype"]), msg=str(c))
        hs = rng.choice([c["hk"], c["hq"]])
        m = rng.randint(1, c["nk"])
        g = torch.Generator().manual_seed(c["seed"])
        # distinct indices per row; slot 0 is the last key (always real), so no row is empty
        idx = torch.stack([torch.stack([torch.cat([torch.tensor([c["nk"] - 1]),
                                                   torch.randperm(c["nk"] - 1, generator=g)[: m - 1]])
                                        for _ in range(hs)]) for _ in range(c["b"])])
        valid = torch.rand(c["b"], hs, m, generator=g) > 0.2
        valid[..., 0] = True
        out, lse = gather_attention(q, k, v, idx, valid=valid, key_valid=kv, splits=splits, softcap=softcap,
                                    sinks=sinks)
        mask = torch.zeros(c["b"], c["hq"], 1, c["nk"], dtype=torch.bool)
        g_ = c["hq"] // c["hk"]
        for bi in range(c["b"]):
            for h in range(c["hq"]):
                row = h // g_ if hs == c["hk"] else h
                for j in range(m):
                    t = int(idx[bi, row, j])
                    if valid[bi, row, j] and (kv is None or kv[bi, t]):
                        mask[bi, h, 0, t] = True
        ref, ref_lse = reference.attention(q, k, v, causal=False, mask=mask, softcap=softcap, sinks=sinks)
        torch.testing.assert_close(out.float(), ref.float(), **_tol(c["dtype"]), msg=str(c))
        torch.testing.assert_close(lse, ref_lse.float(), **_tol(c["dtype"]), msg=str(c))


@pytest.mark.slow
def test_flex_stays_exact_across_head_counts_in_one_process():
    """Regression: with every dimension dynamic, torch 2.13's CPU inductor reused a FlexAttention kernel compiled
    for 2 query heads on a later call with 4 and returned wrong outputs without an error (a mixed per-head profile
    calls flex on head subsets of every size). Only the sequence lengths are dynamic now."""
    import test_prefill_patterns as tp

    _check_against_reference(FLEX[1], "flex")  # 2 query heads / 1 kv head
    tp.test_output_equals_reference_under_its_mask("bilevel_routing-0", "flex")  # 4 / 2, a token rule, padding


@pytest.mark.parametrize("softcap,sinks", [(None, False), (3.0, True)], ids=["plain", "softcap-sinks"])
def test_long_sliding_window_layers_run_block_sparse_and_exact(softcap, sinks, monkeypatch):
    """A sliding-window layer over a long prompt goes through the blocks its window reaches (no nq x nk mask);
    the output is the dense windowed attention's."""
    from longattn.ops import dense

    monkeypatch.setattr(dense, "WINDOWED_BLOCKS_ABOVE", 0)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 300, 16, generator=g)
    k, v = torch.randn(2, 2, 300, 16, generator=g), torch.randn(2, 2, 300, 16, generator=g)
    kv = torch.ones(2, 300, dtype=torch.bool)
    kv[1, :37] = False
    s = torch.randn(4, generator=g) if sinks else None
    with torch.no_grad():
        out = dense.dense_attention(q, k, v, kv, 0.25, 50, softcap, s)
    ref, _ = reference.attention(q, k, v, mask=kv[:, None, None, :], window=50, scale=0.25, softcap=softcap, sinks=s)
    rows = kv[:, None, :, None]
    torch.testing.assert_close(out * rows, ref.float() * rows, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pad,window", [(False, None), (True, None), (False, 20), (True, 20)],
                         ids=["plain", "padded", "window", "padded-window"])
def test_dense_decode_with_grouped_kv_heads_equals_the_reference(pad, window, monkeypatch):
    """One decode query per head over grouped kv heads goes through ``_grouped_decode`` (the group's query heads
    as queries of one SDPA head): the reference's output, padding and sliding window included; a row with no
    visible key gives 0."""
    from longattn.ops import dense

    g = torch.Generator().manual_seed(5)
    q = torch.randn(3, 6, 1, 16, generator=g)
    k, v = torch.randn(3, 2, 45, 16, generator=g), torch.randn(3, 2, 45, 16, generator=g)
    kv = None
    if pad:
        kv = torch.ones(3, 45, dtype=torch.bool)
        kv[1, :30] = False
        kv[2] = False  # nothing visible
    calls = []
    real = dense._grouped_decode
    monkeypatch.setattr(dense, "_grouped_decode", lambda *a: calls.append(1) or real(*a))
    out = dense.dense_attention(q, k, v, kv, 0.25, window)
    assert calls
    mask = None if kv is None else kv[:, None, None, :]
    ref, _ = reference.attention(q.double(), k.double(), v.double(), mask=mask, window=window, scale=0.25)
    if pad:
        ref[2] = 0.0
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_decode_and_ragged_ops_in_bfloat16_within_twice_the_dense_error():
    """In the model's dtype: each decode / compressed-cache op in bfloat16 stays within twice the error that dense
    SDPA makes in bfloat16 against the float64 reference."""
    import torch.nn.functional as F

    from longattn.cache import LongattnLayer
    from longattn.ops.ragged import attend_compressed

    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 8, 1, 64, generator=g).bfloat16()
    k, v = torch.randn(2, 2, 300, 64, generator=g).bfloat16(), torch.randn(2, 2, 300, 64, generator=g).bfloat16()
    ref, _ = reference.attention(q, k, v, causal=False)
    dense = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    bound = 2 * (dense.double() - ref.double()).abs().max() + 1e-6
    out, _ = split_k_attention(q, k, v, splits=4)
    assert (out.double() - ref.double()).abs().max() <= bound
    idx = torch.arange(300).expand(2, 2, -1)
    out, _ = gather_attention(q, k, v, idx, splits=3)
    assert (out.double() - ref.double()).abs().max() <= bound
    layer = LongattnLayer()
    layer.update(k, v)
    lengths = torch.tensor([[300, 300], [300, 300]])
    layer.compress(idx, lengths)  # a ragged-capable compressed layer keeping everything
    out = attend_compressed(layer, q, None, 64**-0.5)
    assert out.dtype == torch.bfloat16 and (out.double() - ref.double()).abs().max() <= bound
