"""Expected Attention on real models (RoPE): the scores against a loop-by-loop reference built from the layer's
own projections (pre-RoPE queries from ``q_proj``/``q_norm``, the averaged rotation from the RoPE frequencies of
the config), and decode-time eviction that keeps a kv head at its budget while generating."""

import math

import pytest
import torch

import longattn
from longattn.cache import cache_nbytes
from longattn.models import TINY_ARCHS, tiny_model


def _prerope_queries(m, ids, layer):
    """``[hq, n, d]`` float64 queries before RoPE of decoder layer ``layer``, from its input hidden states."""
    att = m.model.layers[layer].self_attn
    got = {}

    def grab(mod, args, kwargs):
        got["h"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    h = att.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            m(ids)
    finally:
        h.remove()
    x = got["h"][0].detach()
    with torch.no_grad():
        q = att.q_proj(x).view(x.shape[0], -1, att.head_dim)
        if getattr(att, "q_norm", None) is not None:
            q = att.q_norm(q)
    return q.transpose(0, 1).double()


def _reference(m, ids, layer, k, v, sink, future, covariance=True):
    """Per kv head and key: softmax over the non-sink keys of ``s mu'.k + s^2/2 k^T S' k``, the group mean, x ||v||."""
    cfg = m.config
    qs = _prerope_queries(m, ids, layer)  # [hq, n, d]
    hq, n, d = qs.shape
    hk = k.shape[1]
    g = hq // hk
    base = cfg.rope_parameters["rope_theta"]
    half = d // 2
    inv = [base ** (-2 * i / d) for i in range(half)]
    cbar = [sum(math.cos(t * inv[i]) for t in range(n, n + future)) / future for i in range(half)]
    sbar = [sum(math.sin(t * inv[i]) for t in range(n, n + future)) / future for i in range(half)]
    rot = [[0.0] * d for _ in range(d)]  # x' = rot @ x, rotate-half convention
    for i in range(half):
        rot[i][i], rot[i][i + half] = cbar[i], -sbar[i]
        rot[i + half][i + half], rot[i + half][i] = cbar[i], sbar[i]
    scale = m.model.layers[layer].self_attn.scaling
    probs = []
    for h in range(hq):
        obs = [[float(x) for x in qs[h, i]] for i in range(sink, n)]
        mu = [sum(r[a] for r in obs) / len(obs) for a in range(d)]
        cov = [[sum((r[a] - mu[a]) * (r[c] - mu[c]) for r in obs) / len(obs) for c in range(d)] for a in range(d)]
        mu2 = [sum(rot[a][c] * mu[c] for c in range(d)) for a in range(d)]
        rc = [[sum(rot[a][e] * cov[e][c] for e in range(d)) for c in range(d)] for a in range(d)]
        cov2 = [[sum(rc[a][e] * rot[c][e] for e in range(d)) for c in range(d)] for a in range(d)]
        logit = {}
        for j in range(sink, n):
            kj = [float(x) for x in k[0, h // g, j]]
            val = scale * sum(mu2[a] * kj[a] for a in range(d))
            if covariance:
                val += 0.5 * scale * scale * sum(kj[a] * cov2[a][c] * kj[c] for a in range(d) for c in range(d))
            logit[j] = val
        top = max(logit.values())
        z = sum(math.exp(x - top) for x in logit.values())
        probs.append({j: math.exp(x - top) / z for j, x in logit.items()})
    out = torch.zeros(hk, n, dtype=torch.float64)
    for h in range(hk):
        for j in range(sink, n):
            p = sum(probs[hh][j] for hh in range(h * g, (h + 1) * g)) / g
            out[h, j] = p * math.sqrt(sum(float(x) ** 2 for x in v[0, h, j]))
    return out


@pytest.mark.parametrize("arch,covariance", [("llama", True), ("qwen3", True), ("llama", False)],
                         ids=["llama", "qwen3-qnorm", "llama-mean-only"])
def test_scores_equal_the_reference_under_rope(arch, covariance):
    m = tiny_model(arch, num_hidden_layers=2)
    ids = torch.randint(3, 128, (1, 48), generator=torch.Generator().manual_seed(3))
    pol = longattn.parse(f"expected_attention:ratio=0.5:future=32:covariance={str(covariance).lower()}").kv
    grabbed = {}
    with torch.no_grad(), longattn.apply(m, pol) as s, s.observe(lambda i, q, k, v, kv: grabbed.setdefault(i, (q, k, v, kv))):
        s.set_compression(False)
        m(ids, use_cache=True)
        q, k, v, kv = grabbed[1]
        got = pol.score(q, k, v, kv, m.model.layers[1].self_attn)
    want = _reference(m, ids, 1, k.double(), v.double(), 4, 32, covariance)
    err = (got[0, :, 4:].double() - want[:, 4:]).abs().max()
    assert float(err) <= 1e-5 * float(want.abs().max()), f"{arch}: off the reference by {float(err):.2e}"
    assert bool((got[0, :, :4] > got[0, :, 4:].max()).all()), "the sink tokens are always kept"


def test_without_rope_information_the_rotation_would_matter():
    """The reference is sensitive to the rotation: scoring with the post-RoPE queries gives other scores."""
    m = tiny_model("llama", num_hidden_layers=2)
    ids = torch.randint(3, 128, (1, 48), generator=torch.Generator().manual_seed(3))
    pol = longattn.parse("expected_attention:ratio=0.5:future=32").kv
    grabbed = {}
    with torch.no_grad(), longattn.apply(m, pol) as s, s.observe(lambda i, q, k, v, kv: grabbed.setdefault(i, (q, k, v, kv))):
        s.set_compression(False)
        m(ids, use_cache=True)
    q, k, v, kv = grabbed[1]
    no_rope = pol.score(q, k, v, kv, None)  # outside a session: queries taken as they are
    want = _reference(m, ids, 1, k.double(), v.double(), 4, 32)
    assert float((no_rope[0, :, 4:].double() - want[:, 4:]).abs().max()) > 1e-3 * float(want.abs().max())


def test_decode_budget_holds_each_head_at_its_budget_while_generating():
    m = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), longattn.apply(m, "expected_attention:ratio=0.5:decode_budget=48:every=4:recent=8:obs_window=8") as s:
        out = m.generate(ids, max_new_tokens=24, do_sample=False)
        layer = s.cache.layers[0]
        nbytes = cache_nbytes(s.cache)
    assert out.shape == (1, 104)
    assert layer.physical_len <= 48 + 4  # evicted every 4 steps down to the budget
    kept = layer.physical_positions()[0, 0].tolist()  # the kept prefix and the tokens appended since
    assert kept[:4] == [0, 1, 2, 3], "the sinks stay"
    assert set(range(104 - 8, 103)) <= set(kept), "the recent tokens stay"
    full = m(out, use_cache=True).past_key_values
    assert nbytes < 0.75 * sum(la.keys.numel() * 8 for la in full.layers)  # keys + values, float32


def test_decode_budget_at_ratio_zero_keeps_the_prefill_and_evicts_later():
    m = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = m.generate(ids, max_new_tokens=6, do_sample=False)
        with longattn.apply(m, "expected_attention:decode_budget=200") as s:  # never over budget: dense
            out = m.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref) and s.cache.layers[0].physical_len == 45


@pytest.mark.parametrize("spec,match", [("expected_attention:future=0", "future"),
                                        ("expected_attention:decode_budget=10:sink=4:recent=8", "decode_budget"),
                                        ("expected_attention:epsilon=-1", "epsilon")])
def test_bad_settings_name_the_argument(spec, match):
    with pytest.raises(ValueError, match=match):
        longattn.parse(spec)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_the_models_own_rope_is_found_and_inverted(arch):
    """``hf.Rope``: un-rotating the layer's post-RoPE keys and rotating them back is exact, a rotation keeps
    norms, and the mean rotation over one position is that rotation (every architecture's RoPE convention)."""
    from longattn.hf import rope_of

    m = tiny_model(arch)
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    grabbed = {}
    with torch.no_grad(), longattn.apply(m, "dense") as s, s.observe(lambda i, q, k, v, kv: grabbed.setdefault(i, q)):
        m(ids, use_cache=True)
        att = next(a for a in m.modules() if hasattr(a, "scaling") and getattr(a, "layer_idx", None) == 0)
        rope = rope_of(att)
        q = grabbed[0].float()
        pos = torch.arange(24).view(1, -1)
        cos, sin = rope.cos_sin(pos, q)
        pre = rope.unrotate(q, cos, sin)
        torch.testing.assert_close(rope.rotate(pre, cos, sin), q, rtol=1e-5, atol=1e-5)
        scaling = (cos**2 + sin**2).mean(-1).sqrt()[:, None, :]  # YaRN rotaries scale as they rotate
        torch.testing.assert_close(pre.norm(dim=-1) * scaling, q.norm(dim=-1), rtol=1e-4, atol=1e-5)
        one = rope.mean_rotation(torch.tensor([7]), q.shape[-1])
        torch.testing.assert_close(pre[..., 7, :] @ one, q[..., 7, :], rtol=1e-4, atol=1e-5)
        # the mean over many positions (by the averaged tables) equals the average of the rotations themselves
        many = torch.arange(30, 30 + 97)
        torch.testing.assert_close(rope.mean_rotation(many, q.shape[-1]), rope.explicit_mean_rotation(many, q.shape[-1]),
                                   rtol=1e-5, atol=1e-6)
        assert not torch.allclose(rope.mean_rotation(many, q.shape[-1]), one, atol=1e-2)
        # the same tokens 5 positions later: other post-RoPE queries in layer 0, the same ones before RoPE (its
        # input does not depend on position), so the inversion follows the model's own convention
        grabbed.clear()
        m(ids, position_ids=pos + 5, use_cache=True)
        q5 = grabbed[0].float()
        cos5, sin5 = rope.cos_sin(pos + 5, q5)
        assert not torch.allclose(q5, q, atol=1e-3)
        torch.testing.assert_close(rope.unrotate(q5, cos5, sin5), pre, rtol=1e-4, atol=1e-4)
