"""ACT (calibrate slot) against a loop-by-loop reference of the paper's calibration, and through apply()."""

import json
import math

import pytest
import torch

from longattn import api, models
from longattn.calibrate.act import ACT, act_attention


def _reference(q, k, v, key_valid, scale, alpha, beta, keep_first, sinks=None):
    """Every row, head and key by hand, float64: softmax over the visible keys; a key is a sink when its mean
    attention over the valid queries exceeds alpha / (valid keys); sinks get beta x, the rest share the mass."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    g = h // k.shape[1]
    valid = [[True] * nk for _ in range(b)] if key_valid is None else key_valid.tolist()
    out = torch.zeros(b, h, nq, d, dtype=torch.float64)
    found = torch.zeros(b, h, nk, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            probs = []
            for i in range(nq):
                pos = nk - nq + i
                vis = [j for j in range(nk) if j <= pos and valid[bi][j]]
                row = [0.0] * nk
                if vis:
                    s = [float(q[bi, hi, i].double() @ k[bi, hi // g, j].double()) * scale for j in vis]
                    m = max(s)
                    z = sum(math.exp(x - m) for x in s)
                    for j, x in zip(vis, s):
                        row[j] = math.exp(x - m) / z
                probs.append(row)
            if sinks is None:
                readers = [i for i in range(nq) if valid[bi][nk - nq + i]]
                n_keys = sum(valid[bi])
                first = valid[bi].index(True)
                for j in range(nk):
                    mean = sum(probs[i][j] for i in readers) / max(len(readers), 1)
                    if valid[bi][j] and mean > alpha / n_keys and not (keep_first and j == first):
                        found[bi, hi, j] = True
            else:
                found[bi, hi] = sinks[bi, hi]
            for i in range(nq):
                row = probs[i]
                sink_mass = sum(row[j] for j in range(nk) if found[bi, hi, j])
                rest = sum(row[j] for j in range(nk) if not found[bi, hi, j])
                new = []
                for j in range(nk):
                    if rest <= 0:
                        new.append(row[j])
                    elif found[bi, hi, j]:
                        new.append(beta * row[j])
                    else:
                        new.append(row[j] * (1 + (1 - beta) * sink_mass / rest))
                for j in range(nk):
                    out[bi, hi, i] += new[j] * v[bi, hi // g, j].double()
    return out, found


def _planted(b=2, h=4, hk=2, n=16, d=8, sink=5, seed=0):
    """Random q, k, v with key ``sink`` aligned with every query (a hidden sink, not the first token)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g)
    k = torch.randn(b, hk, n, d, generator=g)
    v = torch.randn(b, hk, n, d, generator=g)
    c = torch.randn(d, generator=g)
    c = c / c.norm()
    q = q + 2.0 * c  # every query shares a direction the sink key points along
    k[:, :, sink] = 4.0 * c
    return q, k, v


@pytest.mark.parametrize("keep_first", [True, False])
def test_act_matches_the_loop_reference_and_finds_the_planted_sink(keep_first):
    q, k, v = _planted()
    key_valid = torch.ones(2, 16, dtype=torch.bool)
    key_valid[1, :3] = False  # left padding in row 1
    scale = 1 / math.sqrt(8)
    out, sinks = act_attention(q, k, v, key_valid, scale, alpha=2.0, beta=0.3, keep_first=keep_first, block=5)
    ref, ref_sinks = _reference(q, k, v, key_valid, scale, 2.0, 0.3, keep_first)
    assert torch.equal(sinks, ref_sinks)
    assert ref_sinks[:, :, 5].all(), "the planted key is a sink in every head"
    valid_rows = key_valid[:, None, :, None].expand_as(out)
    assert torch.allclose(out[valid_rows].double(), ref[valid_rows], atol=1e-5)
    if keep_first:
        assert not sinks[0, :, 0].any() and not sinks[1, :, 3].any(), "the first (valid) token is never calibrated"
    # calibration changed the output (the sink's attention went elsewhere)
    dense = act_attention(q, k, v, key_valid, scale, alpha=2.0, beta=1.0)[0]
    assert (out - dense)[valid_rows].abs().max() > 1e-3


def test_beta_one_is_dense_and_given_sinks_are_used():
    from longattn.ops.dense import dense_attention

    q, k, v = _planted(b=1)
    scale = 0.3
    out, _ = act_attention(q, k, v, None, scale, alpha=2.0, beta=1.0)
    assert torch.allclose(out, dense_attention(q, k, v, None, scale, None), atol=1e-5)
    given = torch.zeros(1, 4, 16, dtype=torch.bool)
    given[..., 7] = True
    out, used = act_attention(q[:, :, -1:], k, v, None, scale, beta=0.0, sinks=given)
    ref, _ = _reference(q[:, :, -1:], k, v, None, scale, 5.0, 0.0, True, sinks=given)
    assert torch.equal(used, given) and torch.allclose(out.double(), ref, atol=1e-5)


class _Layer:
    def __init__(self):
        self.decode_state = {}


def test_decode_steps_reuse_the_prompts_sinks_and_heads_are_filtered():
    q, k, v = _planted(b=1, n=17)
    scale = 1 / math.sqrt(8)
    act = ACT(alpha=2.0, beta=0.2)
    layer = _Layer()
    act.attend(layer, 0, q[:, :, :16], k[:, :, :16], v[:, :, :16], None, scale)
    stored = layer.decode_state["act_sinks"]
    assert stored[..., 5].all()
    out = act.attend(layer, 0, q[:, :, 16:], k, v, None, scale)
    given = torch.cat([stored, torch.zeros(1, 4, 1, dtype=torch.bool)], -1)
    ref, _ = _reference(q[:, :, 16:], k, v, None, scale, 2.0, 0.2, True, sinks=given)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    # only heads 1 and 2 calibrated: the others are dense
    from longattn.ops.dense import dense_attention

    object.__setattr__(act, "_mask", [[False, True, True, False]])
    out = act.attend(_Layer(), 0, q, k, v, None, scale)
    dense = dense_attention(q, k, v, None, scale, None)
    full, _ = act_attention(q, k, v, None, scale, alpha=2.0, beta=0.2)
    assert torch.allclose(out[:, [0, 3]], dense[:, [0, 3]], atol=1e-6)
    assert torch.allclose(out[:, [1, 2]], full[:, [1, 2]], atol=1e-6)


def test_apply_routes_every_full_attention_layer_through_act():
    """The o_proj input of each layer equals ACT of that layer's q, k, v (seen by an observer)."""
    torch.manual_seed(0)
    model = models.tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (1, 24))
    seen, fed = {}, {}
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(
        lambda m, inp, i=i: fed.__setitem__(i, inp[0].detach().clone()))
        for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad(), api.apply(model, "act:alpha=1.5:beta=0.1") as s, \
                s.observe(lambda li, q, k, v, kv: seen.__setitem__(li, (q.clone(), k.clone(), v.clone()))):
            model(ids)
    finally:
        for hk in hooks:
            hk.remove()
    scale = model.model.layers[0].self_attn.scaling
    assert len(seen) == model.config.num_hidden_layers
    for li, (q, k, v) in seen.items():
        ref, _ = _reference(q, k, v, None, scale, 1.5, 0.1, True)
        got = fed[li].view(1, 24, q.shape[1], q.shape[3]).transpose(1, 2)
        assert torch.allclose(got.double(), ref, atol=1e-4), f"layer {li}"
    # and it changed something against dense
    with torch.no_grad():
        dense = model(ids).logits
        with api.apply(model, "act:alpha=1.5:beta=0.1"):
            cal = model(ids).logits
    assert (dense - cal).abs().max() > 1e-4


def test_generate_with_act_and_refusals(tmp_path):
    torch.manual_seed(0)
    model = models.tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad(), api.apply(model, "act:beta=1.0"):
        same = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(same, plain), "beta=1 changes nothing, through prefill and decode"
    with pytest.raises(ValueError, match="cannot be combined with snapkv"):
        api.parse("act+snapkv:ratio=0.5")
    with pytest.raises(ValueError, match="beta must be in"):
        ACT(beta=1.5)
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"query_head_scores": [[1.0]]}))
    with pytest.raises(ValueError, match="layers x"):
        with api.apply(model, f"act:heads={bad}"):
            pass
    with pytest.raises(ValueError, match="no such file"):
        with api.apply(model, "act:heads=missing.json"):
            pass
    with pytest.raises(ValueError, match="past the model"):
        with api.apply(model, "act:layers=99"):
            pass


def test_a_profile_selects_the_heads(tmp_path):
    torch.manual_seed(0)
    model = models.tiny_model("llama")
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    gains = [[-1.0] * H for _ in range(L)]
    gains[1][2] = 0.5
    p = tmp_path / "act.json"
    p.write_text(json.dumps({"num_layers": L, "num_kv_heads": 2, "scores": [[0, 0]] * L,
                             "query_head_scores": gains}))
    act = ACT(heads=str(p))
    act.prepare(model)
    assert act.head_mask(1, H) == [h == 2 for h in range(H)] and not any(act.head_mask(0, H))


def test_act_refuses_attention_sink_logits():
    model = models.tiny_model("gpt_oss")
    with pytest.raises(ValueError, match="sink logits"):
        with api.apply(model, "act"):
            pass
