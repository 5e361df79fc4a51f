"""Every mainstream decoder architecture, by capability: tiny random configs of each (hybrid sliding-window,
softcap, attention sinks, MoE, MHA), the invariants that must hold on all of them."""

import pytest
import torch
from transformers import DynamicCache

import longattn
from _helpers import ids_batch
from longattn import hf
from longattn.cache import cache_nbytes
from longattn.models import TINY_ARCHS, tiny_model

KV = "snapkv:ratio=0.5:obs_window=8"
PREFILL = "sink_window:sink=4:window=16:block_size=16"
DECODE = "quest:budget=32:page=16:dense_layers="


def _plain_bytes(m, ids, am):
    c = DynamicCache(config=m.config)
    with torch.no_grad():
        m(ids, attention_mask=am, use_cache=True, **{hf.cache_kwarg_name(m): c})
    return cache_nbytes(c)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_dense_equals_the_plain_model_and_restores_it(arch):
    m = tiny_model(arch)
    impl = m.config._attn_implementation
    ids, am = ids_batch(2, 48, pad=(0, 11))
    with torch.no_grad():
        ref = m(ids, attention_mask=am).logits
        with longattn.apply(m, "dense"):
            out = m(ids, attention_mask=am).logits
            gen = m.generate(ids, attention_mask=am, max_new_tokens=4, do_sample=False)
        gen_ref = m.generate(ids, attention_mask=am, max_new_tokens=4, do_sample=False)
    valid = am.bool()
    torch.testing.assert_close(out[valid], ref[valid], rtol=0, atol=1e-5)
    assert torch.equal(gen, gen_ref)
    assert m.config._attn_implementation == impl and not m._forward_pre_hooks


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_a_dense_recipe_never_holds_more_than_the_plain_model(arch):
    m = tiny_model(arch)
    ids, am = ids_batch(1, 48, pad=(0,))
    with torch.no_grad(), longattn.apply(m, "dense") as s:
        c = DynamicCache(config=m.config)
        m(ids, attention_mask=am, use_cache=True, **{s.cache_kwarg: c})
    assert cache_nbytes(c) <= _plain_bytes(m, ids, am)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_one_method_of_each_slot_runs_and_kv_policies_hold_less(arch):
    m = tiny_model(arch, num_hidden_layers=4)
    ids, am = ids_batch(1, 48, pad=(0,))
    plain = _plain_bytes(m, ids, am)
    for recipe in (PREFILL, KV, DECODE, f"{PREFILL}+{KV}+{DECODE}"):
        with torch.no_grad(), longattn.apply(m, recipe) as s:
            out = m.generate(ids, attention_mask=am, max_new_tokens=3, do_sample=False)
            held = cache_nbytes(s.cache)
        assert out.shape == (1, 51)
        if "snapkv" in recipe and "quest" not in recipe:
            assert held < plain, f"{arch} {recipe}: {held} bytes, the plain model holds {plain}"


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_a_full_budget_gives_dense_greedy_tokens(arch):
    m = tiny_model(arch, num_hidden_layers=4)
    ids, am = ids_batch(1, 48, pad=(0,))
    kw = dict(attention_mask=am, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = m.generate(ids, **kw)
        for recipe in ("quest:budget=4096:dense_layers=", "sink_window:sink=64:window=4096:block_size=16",
                       "snapkv:ratio=0.0"):
            with longattn.apply(m, recipe):
                got = m.generate(ids, **kw)
            assert torch.equal(got.sequences, ref.sequences), recipe
            for a, b in zip(got.scores, ref.scores):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


FULL_ONLY = [a for a in TINY_ARCHS if all(k == "full_attention" for k, _ in hf.layer_kinds(tiny_model(a)))]


@pytest.mark.parametrize("arch", FULL_ONLY)
def test_a_left_padded_batch_decodes_like_each_prompt_alone(arch):
    """(Sliding-window models are left out: plain transformers itself counts the window in cache slots, padding
    included, so a padded row sees fewer real tokens than the prompt alone; there ours equals the plain batch.)"""
    m = tiny_model(arch)
    pad = 16
    ids, am = ids_batch(2, 60, pad=(0, pad))
    kw = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad(), longattn.apply(m, KV):
        both = m.generate(ids, attention_mask=am, **kw)
        alone = m.generate(ids[1:, pad:], attention_mask=am[1:, pad:], **kw)
    assert torch.equal(both.sequences[1, 60:], alone.sequences[0, 60 - pad:])
    for a, b in zip(both.scores, alone.scores):
        torch.testing.assert_close(a[1], b[0], rtol=1e-4, atol=1e-4)


def test_hybrid_layers_hold_their_window_and_compress_only_full_layers():
    m = tiny_model("gemma3_text", num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2)
    ids, am = ids_batch(1, 48, pad=(0,))
    with torch.no_grad(), longattn.apply(m, KV) as s:
        c = DynamicCache(config=m.config)
        m(ids, attention_mask=am, use_cache=True, **{s.cache_kwarg: c})
    sliding, full = c.layers[0], c.layers[1]
    assert sliding.window == 16 and sliding.physical_len == 15 and not sliding.compressed  # as transformers
    assert full.window is None and full.compressed and full.physical_len == 24  # half of 48
    assert sliding.get_seq_length() == full.get_seq_length() == 48


def test_a_sliding_layer_compressed_inside_its_window_applies_it_by_position():
    """Mistral's all-sliding layers: a prompt inside the window is compressed like a full layer; as decoding goes
    past the window, kept tokens that left it are masked by their positions, as the plain model drops them. With
    StreamingLLM (no sinks) keeping positions 5..19 of a 20-token prompt and a 24-token window, a query at
    position >= 28 sees exactly what the plain model sees (one layer, so that no cached state depends on earlier,
    different attention)."""
    m = tiny_model("mistral-window", sliding_window=24, num_hidden_layers=1)
    ids, _ = ids_batch(1, 34, pad=(0,))
    kw = hf.cache_kwarg_name(m)

    def logits(recipe):
        out = []
        with torch.no_grad(), longattn.apply(m, recipe) as s:
            c = DynamicCache(config=m.config)
            out.append(m(ids[:, :20], use_cache=True, **{kw: c}).logits[0, -1])
            for t in range(20, 34):
                out.append(m(ids[:, t : t + 1], use_cache=True, **{kw: c}).logits[0, -1])
            assert s.cache.layers[0].compressed == (recipe != "dense")
        return out  # out[i]: the logits of the query at position 19 + i

    ref, got = logits("dense"), logits("streaming_llm:ratio=0.25:sink=0")
    assert (got[1] - ref[1]).abs().max() > 1e-3  # while positions 0..4 are still in the plain window: differs
    for i in range(9, 15):
        torch.testing.assert_close(got[i], ref[i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["gemma2", "gpt_oss"])
def test_softcap_and_sinks_equal_the_models_own_eager_attention(arch):
    """gemma2 caps its logits, gpt-oss adds per-head sinks: the plain model (eager) is the reference, and a method
    that attends sparsely still applies them (checked at a full budget, where it must equal the eager model)."""
    m = tiny_model(arch, num_hidden_layers=4)
    feats = [mod for mod in m.modules() if hasattr(mod, "sinks") or hasattr(mod, "attn_logit_softcapping")]
    assert feats, "the tiny config carries the feature"
    ids, am = ids_batch(2, 40, pad=(0, 9))
    with torch.no_grad():
        ref = m(ids, attention_mask=am).logits
        with longattn.apply(m, "block_topk:topk=64:sink=0:block_size=16"):
            out = m(ids, attention_mask=am).logits
    torch.testing.assert_close(out[am.bool()], ref[am.bool()], rtol=0, atol=1e-5)


def test_unknown_attention_arguments_are_refused_by_name():
    m = tiny_model("llama")
    attn = m.model.layers[0].self_attn
    with pytest.raises(ValueError, match="passes the attention argument.*mystery"):
        hf.call_features(attn, {"scaling": 0.25, "mystery": 1})
    with pytest.raises(ValueError, match="dropout"):
        hf.call_features(attn, {"dropout": 0.1})


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_bfloat16_models_run_within_twice_the_reference_error(arch):
    """In the model's own dtype: our dense path in bfloat16 stays within twice the error the plain bfloat16 model
    makes against its float32 self."""
    ids, am = ids_batch(1, 40, pad=(0,))
    f32 = tiny_model(arch, dtype=torch.float32)
    b16 = tiny_model(arch, dtype=torch.bfloat16)
    with torch.no_grad():
        truth = f32(ids, attention_mask=am).logits.double()
        plain = b16(ids, attention_mask=am).logits.double()
        with longattn.apply(b16, "snapkv:ratio=0.0"):
            ours = b16(ids, attention_mask=am).logits.double()
    assert (ours - truth).abs().max() <= 2 * (plain - truth).abs().max() + 1e-3


# ---- the second embedded model ---------------------------------------------------------------------------------------
def test_gemma3_270m_is_a_hybrid_that_runs_dense_and_compressed(gemma3):
    """Gemma 3 270M from its PyPI chunks (SHA-256 checked before conversion): 32K positions, 5 sliding layers of
    512 per global one; dense = the plain model; a KV policy compresses the global layers only."""
    m, tok = gemma3
    kinds = hf.layer_kinds(m)
    assert m.config.max_position_embeddings == 32768 and len(kinds) == 18
    assert [k for k, _ in kinds[:6]] == ["sliding_attention"] * 5 + ["full_attention"] and kinds[0][1] == 512
    text = "The pass key is 71432. Remember it. " + "The grass is green. The sky is blue. " * 90
    ids = tok(text + "What is the pass key? The pass key is", return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 600  # past the sliding window
    am = torch.ones_like(ids)
    kw = dict(attention_mask=am, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        ref = m.generate(ids, **kw)
        plain = _plain_bytes(m, ids, am)
        with longattn.apply(m, "dense") as s:
            assert torch.equal(m.generate(ids, **kw), ref)
        with longattn.apply(m, "snapkv:ratio=0.5") as s:
            m.generate(ids, **kw)
            layers = s.cache.layers
    assert all(layer.compressed == (kind == "full_attention") for layer, (kind, _) in zip(layers, kinds))
    assert cache_nbytes(s.cache) < plain


def test_bench_caches_hold_the_sliding_window_as_generate_does():
    """The bench builds its cache from the model's config: a hybrid model's sliding layers keep their window (a bare
    DynamicCache() would keep every token there, 3.6x the plain model's cache on Gemma 3 at 4K)."""
    from longattn.bench.protocols import run_qa
    from longattn.bench.tasks.base import Sample
    from longattn.models import tiny_tokenizer

    m = tiny_model("gemma3_text", num_hidden_layers=4)
    tok = tiny_tokenizer()
    res = run_qa(m, tok, "dense", Sample("s", "x" * 300, "q?", "a:", ["1"]), 2, None)
    assert res["kv_cache_bytes"] <= 1.05 * res["plain_bytes"]
