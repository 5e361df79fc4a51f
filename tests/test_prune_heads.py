"""Head pruning (prune_heads) against zeroing the removed heads' o_proj columns by hand; the modules are restored;
the cache holds only the kept kv heads."""

import copy
import json

import pytest
import torch

from longattn import api, cache_nbytes, models
from longattn.calibrate.prune_heads import PruneHeads, kept_groups


def _profile(tmp_path, scores):
    p = tmp_path / "heads.json"
    p.write_text(json.dumps({"num_layers": len(scores), "num_kv_heads": len(scores[0]), "scores": scores}))
    return str(p)


def test_kept_groups_drop_the_lowest_scores_and_keep_one_per_layer():
    assert kept_groups([[0.1, 0.9], [0.8, 0.7]], 0.25) == [[1], [0, 1]]
    assert kept_groups([[0.1, 0.2], [0.8, 0.7]], 0.5) == [[1], [0, 1]]  # layer 0's best survives
    assert kept_groups([[0.3, 0.2], [0.1, 0.7]], 0.5) == [[0], [1]]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2", "gemma3_text"])
def test_pruned_model_equals_zeroed_heads_and_is_restored(arch, tmp_path):
    torch.manual_seed(0)
    m = models.tiny_model(arch)
    cfg = m.config
    L, hq, hk = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    g, d = hq // hk, cfg.head_dim
    scores = [[float((li * hk + h) * 7 % (L * hk)) for h in range(hk)] for li in range(L)]
    prof = _profile(tmp_path, scores)
    keep = kept_groups(scores, 0.5)
    ref = copy.deepcopy(m)
    with torch.no_grad():
        for li, layer in enumerate(ref.model.layers):
            for h in range(hk):
                if h not in keep[li]:
                    for q in range(h * g, (h + 1) * g):
                        layer.self_attn.o_proj.weight[:, q * d : (q + 1) * d] = 0
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    before = {id(p): p for layer in m.model.layers for p in (layer.self_attn.q_proj, layer.self_attn.o_proj)}
    with torch.no_grad():
        plain = m(ids).logits
        expect = ref(ids).logits
        with api.apply(m, f"prune_heads:ratio=0.5:profile={prof}") as s:
            got = m(ids).logits
            assert m.model.layers[0].self_attn.q_proj.out_features == len(keep[0]) * g * d
            gen = m.generate(ids, max_new_tokens=3, do_sample=False)
            nbytes = cache_nbytes(s.cache)
        after = m(ids).logits
    assert torch.allclose(got, expect, atol=1e-5), "pruning = the removed heads contributing nothing"
    assert (got - plain).abs().max() > 1e-4
    assert torch.equal(after, plain)
    assert all(id(p) in before for layer in m.model.layers for p in (layer.self_attn.q_proj, layer.self_attn.o_proj))
    with torch.no_grad():
        ref_gen = ref.generate(ids, max_new_tokens=3, do_sample=False)
        with api.apply(m, "dense") as s:
            m.generate(ids, max_new_tokens=3, do_sample=False)
            dense_bytes = cache_nbytes(s.cache)
    assert torch.equal(gen, ref_gen)
    kept = sum(len(r) for r in keep) / (L * hk)
    assert nbytes == pytest.approx(kept * dense_bytes, rel=0.01), "the cache holds the kept kv heads only"


def test_prune_heads_refusals(tmp_path):
    m = models.tiny_model("llama")
    with pytest.raises(ValueError, match="ratio"):
        PruneHeads(ratio=1.0)
    bad = _profile(tmp_path, [[0.0]])
    with pytest.raises(ValueError, match="profile"):
        with api.apply(m, f"prune_heads:profile={bad}"):
            pass
    with pytest.raises(ValueError, match="cannot be combined"):
        api.parse("prune_heads:ratio=0.5+snapkv:ratio=0.5")
