"""Every KV policy against a slow reference of its paper's formula (written beside the policy, loop by loop), not
against its own scores; and hand-made inputs where the right answer is known, so that a reference itself follows
the paper (negated scores, a wrong normalisation or a dropped window would all fail here)."""

import math

import pytest
import torch

from longattn import api, registry
from longattn.kv import KVPolicy
from longattn.profiles import EXAMPLE

KV = registry.entries("kv")


def _has_reference(cls) -> bool:
    return cls.reference_scores is not KVPolicy.reference_scores or cls.reference_keep is not KVPolicy.reference_keep


@pytest.mark.parametrize("e", KV, ids=lambda e: e.name)
def test_every_policy_has_a_reference_or_says_why_not(e):
    assert _has_reference(e.cls) or e.cls.no_reference, \
        f"{e.name}: define reference_scores (or reference_keep) from the paper, or no_reference with the reason"


def _cases():
    for e in KV:
        if e.cls.no_reference:
            continue
        for i, ex in enumerate(e.cls.examples):
            yield pytest.param(e, ex, id=f"{e.name}-{i}")


def _qkv(b=2, hq=4, hk=2, n=40, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=g) * 1.5
    k = torch.randn(b, hk, n, d, generator=g) * 1.5
    v = torch.randn(b, hk, n, d, generator=g)
    kv = torch.ones(b, n, dtype=torch.bool)
    if b > 1:
        kv[1, :7] = False  # left padding in row 1
    return q, k, v, kv


def _kept(idx, lengths):
    return [[set(idx[bi, h, : int(lengths[bi, h])].tolist()) for h in range(idx.shape[1])] for bi in range(idx.shape[0])]


class _Layer:
    """What a policy reads off the attention module: layer index, output projection, scale, softcap, sinks (Gemma 2
    / gpt-oss)."""

    def __init__(self, features: bool):
        self.layer_idx = 1
        # an output projection (CriticalKV weights values by it): hidden 12 <- 4 query heads x head dim 8
        self.o_proj = torch.nn.Linear(32, 12, bias=False)
        with torch.no_grad():
            self.o_proj.weight.copy_(torch.randn(12, 32, generator=torch.Generator().manual_seed(5)))
        if features:
            self.scaling, self.attn_logit_softcapping = 0.29, 2.5
            self.sinks = torch.tensor([0.5, -1.0, 2.0, 0.0])


@pytest.mark.parametrize("e,ex", list(_cases()))
@pytest.mark.parametrize("ratio,features", [(0.4, False), (0.75, False), (0.6, True)],
                         ids=["0.4", "0.75", "0.6-softcap-sinks"])
def test_kept_tokens_equal_the_reference(e, ex, ratio, features, tmp_path):
    kw = {k: (e.cls.write_example_profile(tmp_path / "p.json", num_layers=2, num_heads=4, num_kv_heads=2)
              if v == EXAMPLE else v) for k, v in ex.items()}
    pol = e.cls(ratio=ratio, **kw)
    q, k, v, kv = _qkv()
    module = _Layer(features)
    with torch.no_grad():
        got = _kept(*pol.keep(q, k, v, kv, module, 1, 2))
        want = pol.reference_keep(q, k, v, kv, module, 1, 2)
    for bi in range(2):
        for h in range(2):
            assert got[bi][h] == want[bi][h], (
                f"{e.name} row {bi} head {h}: kept {sorted(got[bi][h])}, the reference keeps {sorted(want[bi][h])}")


# ---- hand-made inputs with a known answer -------------------------------------------------------------------------
def _one_head(n=12, d=4):
    q = torch.zeros(1, 1, n, d)
    k = torch.zeros(1, 1, n, d)
    v = torch.randn(1, 1, n, d, generator=torch.Generator().manual_seed(1))
    return q, k, v


def _keep(spec, q, k, v, kv=None):
    pol = api.parse(spec).kv
    idx, lengths = pol.keep(q, k, v, kv)
    return set(idx[0, 0, : int(lengths[0, 0])].tolist())


def test_snapkv_keeps_what_the_observation_window_looks_at():
    q, k, v = _one_head()
    k[0, 0, 2, 0] = 1.0
    k[0, 0, 6, 0] = -1.0
    q[0, 0, -3:, 0] = 8.0  # the last 3 queries look at key 2 and away from key 6
    kept = _keep("snapkv:ratio=0.5:obs_window=3:kernel=1", q, k, v)
    assert {2, 9, 10, 11} <= kept and 6 not in kept  # the window (last 3) + its target
    assert len(kept) == 6
    ref = api.parse("snapkv:ratio=0.5:obs_window=3:kernel=1").kv.reference_scores(q, k, v)
    # e^4 against ~9 other keys at e^0 (and key 6 at e^-4): 0.86 of the window's mass on key 2
    assert float(ref[0, 0, 2]) > 0.8 and float(ref[0, 0, 6]) < 1e-3


def test_h2o_accumulates_attention_over_every_query_normalised_by_who_can_see():
    q, k, v = _one_head(n=8)
    k[0, 0, 5, 0] = 1.0
    q[0, 0, :, 0] = 6.0  # every query that can see key 5 puts its mass there
    ref = api.parse("h2o:ratio=0.5").kv.reference_scores(q, k, v)
    # key 5 is seen by queries 5, 6, 7; each gives it ~1 (exp(6/2) against e^0 of the others)
    share = lambda seen: math.exp(3) / (math.exp(3) + seen - 1)  # noqa: E731
    want5 = (share(6) + share(7) + share(8)) / 3
    assert float(ref[0, 0, 5]) == pytest.approx(want5, rel=1e-6)
    assert 5 in _keep("h2o:ratio=0.75", q, k, v)


def test_tova_keeps_what_the_last_token_attends_to():
    q, k, v = _one_head()
    k[0, 0, 4, 0] = 1.0
    q[0, 0, -1, 0] = 8.0
    kept = _keep("tova:ratio=0.8", q, k, v)
    assert kept == {4, 11}  # its target and itself


def test_knorm_keeps_the_smallest_key_norms():
    q, k, v = _one_head(n=6)
    k[0, 0, :, 0] = torch.tensor([3.0, 0.1, 2.0, 0.2, 5.0, 0.3])
    assert _keep("knorm:ratio=0.5", q, k, v) == {1, 3, 5}


def test_streaming_llm_keeps_sinks_and_recent_with_left_padding():
    q, k, v = _one_head(n=12)
    kv = torch.ones(1, 12, dtype=torch.bool)
    kv[0, :2] = False
    assert _keep("streaming_llm:ratio=0.5:sink=2", q, k, v, kv) == {2, 3, 9, 10, 11}


def test_novelty_keeps_the_unique_value_among_repeats():
    n, d = 40, 8
    g = torch.Generator().manual_seed(0)
    base = torch.randn(d, generator=g)
    v = base.repeat(1, 1, n, 1) + 0.01 * torch.randn(1, 1, n, d, generator=g)
    v[0, 0, 17] = -base + torch.randn(d, generator=g)  # the one-off token
    q = k = torch.zeros(1, 1, n, d)
    kept = _keep("novelty:ratio=0.85:sink=0:recent=0", q, k, v)
    assert 17 in kept


def test_adaptive_heads_moves_budget_to_the_head_that_needs_it():
    q, k, v, _ = _qkv(b=1, hq=2, hk=2, n=20)
    k[0, 0] = 0.0
    k[0, 0, :, 0] = torch.linspace(0.1, 2.0, 20)  # head 0: clear winners (small norms) ...
    k[0, 1] = 1.0  # head 1: every key the same norm
    pol = api.parse("adaptive_heads:ratio=0.5:alpha=0.2:inner=knorm").kv
    idx, lengths = pol.keep(q, k, v)
    assert int(lengths.sum()) == 20 and int(lengths[0, 0]) >= 2 and int(lengths[0, 1]) >= 2


@pytest.mark.parametrize("n,ratio,layers,beta", [(400, 0.5, 6, 20.0), (1000, 0.75, 30, 20.0), (257, 0.9, 4, 5.0)])
def test_pyramid_budgets_follow_the_paper_formula(n, ratio, layers, beta):
    """PyramidKV: layer budgets fall arithmetically from ``2 avg - avg / beta`` (bottom) to ``avg / beta`` (top),
    ``avg = n (1 - ratio)``; rounding may move a budget by one, the total stays ``layers x avg``."""
    pol = api.parse(f"pyramidkv:ratio={ratio}:beta={beta}").kv
    got = pol.layer_budgets(n, layers)
    avg = int(n * (1 - ratio))
    top, bottom = avg / beta, 2 * avg - avg / beta
    paper = [bottom - (bottom - top) * i / (layers - 1) for i in range(layers)]
    assert sum(got) == layers * avg
    assert all(abs(g - p) <= 1.0 for g, p in zip(got, paper)), (got, paper)
    assert all(a >= b for a, b in zip(got, got[1:]))


def test_critical_weights_by_the_projected_value_after_the_first_stage():
    """Stage 1 keeps the inner scorer's best; stage 2 ranks the rest by (score + epsilon) x ||v W_O||_1: with
    knorm scores -1 and -2 and projected values 1 and 3, epsilon 0 keeps the first, epsilon 3 the second."""

    class Mod:
        layer_idx = 0
        o_proj = torch.nn.Linear(4, 4, bias=False)

    with torch.no_grad():
        Mod.o_proj.weight.copy_(torch.eye(4))
    k = torch.zeros(1, 1, 4, 4)
    v = torch.zeros(1, 1, 4, 4)
    for j, (norm, val) in enumerate([(0.1, 1.0), (1.0, 1.0), (2.0, 3.0), (10.0, 10.0)]):
        k[0, 0, j, 0], v[0, 0, j, 0] = norm, val
    q = torch.zeros(1, 1, 4, 4)
    for eps, want in [(0.0, {0, 1}), (3.0, {0, 2})]:
        pol = api.parse(f"critical:ratio=0.5:inner=knorm:epsilon={eps}").kv
        idx, lengths = pol.keep(q, k, v, None, Mod())
        assert set(idx[0, 0, : int(lengths[0, 0])].tolist()) == want, f"epsilon {eps}"
        got = pol.reference_keep(q, k, v, None, Mod())[0][0]
        assert got == want, f"reference, epsilon {eps}"
