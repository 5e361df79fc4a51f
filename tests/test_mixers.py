"""Every mixer against the naive loop-by-loop reference of its paper's equations (outputs, and gradients of every
parameter and of the input), causality (later tokens change nothing before them), padding anywhere (a padded token
changes no real output, padded outputs are zero), odd lengths, and the recurrent step equal to the parallel form."""

import pytest
import torch

from longattn import registry

MIXERS = registry.entries("mixer")


def _cases():
    for e in MIXERS:
        for i, ex in enumerate(e.cls.examples):
            for causal in e.cls.supports_causal:
                yield pytest.param(e, ex, causal, id=f"{e.name}-{i}-{'causal' if causal else 'bidir'}")


def _build(e, ex, causal, seed=0):
    torch.manual_seed(seed)
    return e.cls(16, heads=4, causal=causal, **ex).double().eval()  # eval: no running statistics move


def _x(b=2, n=11, seed=1):
    return torch.randn(b, n, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("e,ex,causal", list(_cases()))
def test_output_and_gradients_equal_the_reference(e, ex, causal):
    m = _build(e, ex, causal)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, :3] = False
    mask[1, 7] = False  # padding anywhere
    x = _x().requires_grad_(True)
    got = m(x, mask)
    x2 = x.detach().clone().requires_grad_(True)
    want = m.reference(x2, mask)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    w = torch.randn_like(got)
    g1 = torch.autograd.grad((got * w).sum(), [x] + list(m.parameters()), allow_unused=True)
    g2 = torch.autograd.grad((want * w).sum(), [x2] + list(m.parameters()), allow_unused=True)
    for a, b in zip(g1, g2):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("e,ex,causal", list(_cases()))
def test_padding_changes_nothing_real_and_causal_mixers_do_not_look_ahead(e, ex, causal):
    m = _build(e, ex, causal)
    x = _x(b=1, n=13)
    mask = torch.ones(1, 13, dtype=torch.bool)
    mask[0, 4] = False
    y = m(x, mask)
    assert torch.all(y[0, 4] == 0)
    x2 = x.clone()
    x2[0, 4] += 5.0  # the padded token's content does not matter
    torch.testing.assert_close(m(x2, mask), y, rtol=0, atol=1e-10)
    if causal:
        x3 = x.clone()
        x3[0, 9:] += 3.0
        y3 = m(x3, mask)
        torch.testing.assert_close(y3[0, :9], y[0, :9], rtol=0, atol=1e-10)
        assert not torch.allclose(y3[0, 9:], y[0, 9:])


@pytest.mark.parametrize("e", [e for e in MIXERS if e.cls.recurrent], ids=lambda e: e.name)
def test_the_recurrent_step_equals_the_parallel_form(e):
    ex = dict(e.cls.examples[0])
    if "chunk" in ex:
        ex["chunk"] = 1  # the step is the token-by-token rule
    m = _build(e, ex, True)
    x = _x(b=2, n=9)
    want = m(x)
    state, outs = m.init_state(2), []
    for t in range(9):
        y, state = m.step(x[:, t], state)
        outs.append(y)
    torch.testing.assert_close(torch.stack(outs, 1), want, rtol=1e-9, atol=1e-10)


def test_kdgqa_shares_query_heads_out_by_key_norms():
    from longattn.mixers.kdgqa import allocate

    assert allocate(torch.tensor([1.0, 1.0]), 8) == [4, 4]
    assert allocate(torch.tensor([3.0, 1.0]), 8) == [6, 2]
    assert allocate(torch.tensor([1.0, 1.0, 1.0]), 8) == [3, 3, 2]  # 2.67 each: the first remainders win
    assert allocate(torch.tensor([100.0, 0.0, 0.0]), 6) == [4, 1, 1]  # every kv head keeps one
    assert sum(allocate(torch.rand(5), 17)) == 17


@pytest.mark.parametrize("spec,match", [({"dim": 10, "heads": 4}, "multiple"), ({"causal": True}, "causal")])
def test_bad_settings_name_the_argument(spec, match):
    from longattn.mixers import PoNet

    with pytest.raises(ValueError, match=match):
        PoNet(**{"dim": 16, "heads": 4, **spec})


def test_dgqa_groups_by_the_running_norms_of_earlier_batches():
    from longattn.mixers import DGQA

    torch.manual_seed(0)
    m = DGQA(16, heads=4, causal=True, kv_heads=2, momentum=0.0).double()  # momentum 0: the last batch's norms
    with torch.no_grad():
        m.kv.weight[4:8] *= 1e-3  # rows 0-3 make kv head 0's keys, 4-7 kv head 1's: make those tiny
    x = _x()
    assert m.groups(m._proj(x)[1], None) == [2, 2]  # the first batch: uniform (no earlier batch)
    m.groups(m._proj(x)[1], None)
    counts = m.groups(m._proj(x)[1], None)
    assert counts[0] > counts[1] and sum(counts) == 4


def test_pgqa_perturbs_each_group_by_noise_of_its_own_mean_and_std_in_training():
    from longattn.mixers import PGQA

    torch.manual_seed(0)
    m = PGQA(16, heads=4, kv_heads=2).double().train()
    x = _x().requires_grad_(True)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 8:] = False
    torch.manual_seed(7)
    got = m(x, mask)
    torch.manual_seed(7)
    want = m.reference(x, mask)  # the same draws, then the loop definition
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    g1 = torch.autograd.grad(got.sum(), m.q.weight, retain_graph=True)[0]
    g2 = torch.autograd.grad(want.sum(), m.q.weight)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-10)
    m.eval()
    clean = m(x, mask)
    assert not torch.allclose(clean, got)  # the noise is there in training ...
    torch.testing.assert_close(m(x, mask), clean, rtol=0, atol=0)  # ... and evaluation is deterministic GQA
    torch.manual_seed(8)
    other = m.train()(x, mask)
    assert not torch.allclose(other, got)  # fresh noise per forward


def test_lightning_decay_is_transnormers_alibi_schedule_by_depth():
    """TransNormerLLM's decay, written out: head h's ALiBi slope s_h (the ALiBi paper's values), scaled by the
    layer's depth factor 1 - l / (L - 1) + 1e-5; the trainer tells every layer its index."""
    import math

    from longattn.mixers import Lightning
    from longattn.train import TinyModel, _mixer_factory

    slopes = {4: [1 / 4, 1 / 16, 1 / 64, 1 / 256], 8: [1 / 2 ** (i + 1) for i in range(8)],
              6: [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8]}  # 6: the 4-head slopes, then every other 8-head one
    for heads, want in slopes.items():
        for layer, layers in ((0, 1), (0, 3), (1, 3), (2, 3)):
            depth = 1 - layer / (layers - 1) + 1e-5 if layers > 1 else 1 + 1e-5
            m = Lightning(heads * 4, heads=heads, layer_idx=layer, num_layers=layers)
            expect = torch.tensor([math.exp(-s * depth) for s in want])
            torch.testing.assert_close(m.decay, expect, rtol=1e-6, atol=0)
    make, _ = _mixer_factory("lightning", 16, 4, True)
    model = TinyModel(8, 16, 3, make)
    assert [round(float(b["mix"].decay[0]), 4) for b in model.blocks] == [round(math.exp(-0.25 * f), 4)
                                                                           for f in (1 + 1e-5, 0.5 + 1e-5, 1e-5)]
    with pytest.raises(ValueError, match="layer_idx must be in"):
        Lightning(16, heads=4, layer_idx=3, num_layers=3)


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_rcmha_relative_shift_reads_distance_i_minus_j(n):
    """``rel_shift`` (a strided view) = the definition ``out[i, j] = pos[i, n - 1 - i + j]``, gradients too."""
    from longattn.mixers.rcmha import rel_shift

    pos = torch.randn(2, 3, n, 2 * n - 1, dtype=torch.float64, requires_grad=True)
    want = torch.empty(2, 3, n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            want[:, :, i, j] = pos[:, :, i, n - 1 - i + j].detach()
    got = rel_shift(pos)
    assert torch.equal(got, want)
    w = torch.randn(2, 3, n, n, dtype=torch.float64)
    (got * w).sum().backward()
    grad = torch.zeros_like(pos)
    for i in range(n):
        for j in range(n):
            grad[:, :, i, n - 1 - i + j] += w[:, :, i, j]
    assert torch.equal(pos.grad, grad)
    with pytest.raises(ValueError, match="contiguous"):
        rel_shift(torch.randn(2, n, 2 * n))
