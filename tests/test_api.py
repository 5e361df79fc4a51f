import dataclasses

import pytest
import torch

import longattn
from _helpers import ids_batch as _ids
from longattn import api, registry
from longattn.cache import LongattnLayer, RaggedKV, cache_nbytes
from longattn.kv import SnapKV, StreamingLLM
from longattn.models import tiny_model
from longattn.ops.ragged import attend_compressed
from longattn.reference import attention

ARCHS = ["llama", "qwen2", "mistral"]  # the original three; every architecture: tests/test_architectures.py


# ---------------------------------------------------------------- parsing and registry
def test_parse_recipe_slots():
    r = api.parse("sink_window:window=128:block_size=32+snapkv:ratio=0.5:obs_window=16")
    assert r.prefill == longattn.SinkWindow(window=128, block_size=32)
    assert r.kv == SnapKV(ratio=0.5, obs_window=16)
    assert str(r) == "sink_window:window=128:block_size=32+snapkv:ratio=0.5:obs_window=16"
    assert api.parse("kv=streaming_llm:ratio=0.25:sink=2").kv == StreamingLLM(ratio=0.25, sink=2)
    assert api.parse("dense").kv.is_noop and api.parse("dense").prefill is None


@pytest.mark.parametrize(
    "spec,match",
    [
        ("nope", "unknown method 'nope'.*allowed: .*snapkv"),
        ("snapkv:ratio=1.0", "^snapkv: ratio.*\\[0, 1\\)"),
        ("snapkv:ratio=-0.1", "ratio.*\\[0, 1\\)"),
        ("snapkv:ratio=abc", "ratio='abc' is not a valid float"),
        ("snapkv:bogus=1", "unknown argument 'bogus'; allowed: ratio, obs_window, kernel"),
        ("snapkv:ratio=0.5:ratio=0.9", "ratio= is given twice"),
        ("snapkv:window=8:obs_window=8", "window= is the old name of obs_window="),
        ("snapkv:ratio", "expected key=value"),
        ("snapkv+streaming_llm", "kv slot twice"),
        ("sink_window:block_size=48", "^sink_window: block_size must be a power of two"),
        ("kvzip:plus=maybe", "plus='maybe' is not a valid bool \\(true/false"),
        ("passkey", "unknown method 'passkey'"),
        ("cache=snapkv", "slot must be one of prefill, kv, decode"),
        ("snapkv:obs_window=0", "obs_window must be an int >= 1"),
    ],
)
def test_parse_errors_name_the_argument(spec, match):
    with pytest.raises(ValueError, match=match):
        api.parse(spec)


def test_registry_equals_exported_api():
    exported = {getattr(longattn, n) for n in longattn.__all__}
    for kind in ("prefill", "kv", "decode", "calibrate"):
        for e in registry.entries(kind):
            assert e.cls in exported, f"{e.name} ({e.cls.__name__}) is registered but not exported"
            assert e.paper and e.summary
            assert dataclasses.is_dataclass(e.cls) and e.cls.__dataclass_params__.frozen
    for name in longattn.__all__:
        obj = getattr(longattn, name)
        if isinstance(obj, type) and hasattr(obj, "kind") and obj.__name__ not in ("KVPolicy", "PrefillPattern",
                                                                                   "DecodeSelector", "Calibration"):
            assert registry.get(obj.name, obj.kind).cls is obj


def test_import_has_no_side_effects():
    import subprocess
    import sys

    code = (
        "import longattn, transformers\n"
        "from transformers import AttentionInterface\n"
        "assert 'longattn' not in AttentionInterface._global_mapping\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- apply(): exactness and restore
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("recipe", ["dense", "snapkv:ratio=0", "streaming_llm:ratio=0.0"])
def test_noop_recipe_gives_identical_logits_and_restores(arch, recipe):
    m = tiny_model(arch)
    ids, am = _ids()
    impl = m.config._attn_implementation
    with torch.no_grad():
        ref = m(ids, attention_mask=am).logits
        with longattn.apply(m, recipe) as s:
            assert m.config._attn_implementation == "longattn"
            out = m(ids, attention_mask=am).logits
        assert s.compressions == 0
        after = m(ids, attention_mask=am).logits
    valid = am.bool()
    torch.testing.assert_close(out[valid], ref[valid], rtol=0, atol=1e-5)
    assert torch.equal(after, ref)
    assert m.config._attn_implementation == impl
    assert not m._forward_pre_hooks
    from longattn import hf

    assert not hf._SESSIONS


def test_apply_restores_after_error():
    m = tiny_model("llama")
    with pytest.raises(RuntimeError, match="boom"):
        with longattn.apply(m, "snapkv:ratio=0.5"):
            raise RuntimeError("boom")
    assert m.config._attn_implementation == "sdpa" and not m._forward_pre_hooks


def test_nested_apply_refused():
    m = tiny_model("llama")
    ids, _ = _ids()
    with longattn.apply(m, "snapkv:ratio=0.5") as outer:
        with pytest.raises(ValueError, match="already active"):
            with longattn.apply(m, "dense"):
                pass
        # the refused inner apply left the outer one intact
        with torch.no_grad():
            m(ids, use_cache=True)
        assert outer.compressions == m.config.num_hidden_layers
    assert m.config._attn_implementation == "sdpa"


def test_unsupported_model_type():
    """Support is by capability: a bidirectional encoder is refused by what it is, before any work (a GPT-2, whose
    attention is causal like the others, runs)."""
    from transformers import BertConfig, BertModel

    m = BertModel(BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                             vocab_size=64)).eval()
    with pytest.raises(ValueError, match="model: 'bert' has non-causal attention"):
        with longattn.apply(m, "dense"):
            pass
    m.train()
    from longattn.models import tiny_model

    t = tiny_model("llama").train()
    with pytest.raises(ValueError, match="call model.eval"):
        with longattn.apply(t, "dense"):
            pass


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decoding_equals_full_forward(arch):
    m = tiny_model(arch)
    ids, am = _ids()
    with torch.no_grad(), longattn.apply(m, "dense"):
        out = m.generate(ids, attention_mask=am, max_new_tokens=6, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
        full_am = torch.cat([am, torch.ones(2, 6, dtype=am.dtype)], 1)
        full = m(out.sequences, attention_mask=full_am).logits
    steps = torch.stack(out.logits, 1)  # [b, 6, vocab]
    torch.testing.assert_close(steps, full[:, ids.shape[1] - 1 : -1], rtol=0, atol=1e-4)


# ---------------------------------------------------------------- real memory, kept = top-scored
@pytest.mark.parametrize("arch", ARCHS)
def test_snapkv_halves_the_cache_and_generates_with_padding(arch):
    m = tiny_model(arch)
    ids, am = _ids(b=2, n=128, pad=(0, 0))
    from transformers import DynamicCache

    with torch.no_grad(), longattn.apply(m, "dense") as s:
        full = DynamicCache()
        m(ids, attention_mask=am, use_cache=True, **{s.cache_kwarg: full})
    dense_bytes = cache_nbytes(full)
    with torch.no_grad(), longattn.apply(m, "snapkv:ratio=0.5:obs_window=8") as s:
        cache = DynamicCache()
        m(ids, attention_mask=am, use_cache=True, **{s.cache_kwarg: cache})
        kv_bytes = cache_nbytes(cache)
        assert s.compressions == m.config.num_hidden_layers
        # GQA kept unrepeated: kv heads in the cache
        assert cache.layers[0].kept_positions.shape == (2, m.config.num_key_value_heads, 64)
        assert cache.get_seq_length() == 128  # logical length
    # half the tokens; metadata = int32 positions (4 bytes per kept token per kv head)
    kept = 64 * 2 * m.config.num_key_value_heads * m.config.num_hidden_layers
    assert kv_bytes == dense_bytes // 2 + kept * 4
    # and generate works with left padding, batch 2
    ids, am = _ids(b=2, n=128, pad=(0, 21))
    with torch.no_grad(), longattn.apply(m, "snapkv:ratio=0.5:obs_window=8") as s:
        out = m.generate(ids, attention_mask=am, max_new_tokens=5, do_sample=False)
        lens = s.cache.layers[0].kept_lengths()
    assert out.shape == (2, 133)
    assert lens[0].tolist() == [64, 64] and lens[1].tolist() == [53, 53]  # int(107 * 0.5)


def test_metadata_overhead_under_two_percent_for_real_dims():
    k = torch.randn(1, 3, 1000, 64)
    layer = LongattnLayer()
    layer.update(k, k.clone())
    idx = torch.arange(500).expand(1, 3, 500)
    layer.compress(idx, torch.full((1, 3), 500))
    dense_half = k.numel() * 4  # half of (keys + values)
    assert layer.nbytes() <= dense_half * 1.02


def _capture_qkv(m, layer_idx, ids, am):
    """Recompute layer ``layer_idx``'s post-RoPE q, k, v from its captured input."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    seen = {}
    attn = m.model.layers[layer_idx].self_attn

    def hook(mod, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        seen["pe"] = kwargs["position_embeddings"]

    h = attn.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        m(ids, attention_mask=am)
    h.remove()
    x = seen["h"]
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *seen["pe"])
    return q, k, v


@pytest.mark.parametrize("policy", ["snapkv:ratio=0.6:obs_window=8", "streaming_llm:ratio=0.5:sink=3"])
def test_kept_positions_are_the_top_scored(policy):
    m = tiny_model("llama")
    ids, am = _ids(b=2, n=100, pad=(0, 9))
    q, k, v = _capture_qkv(m, 1, ids, am)
    pol = api.parse(policy).kv
    key_valid = am.bool()
    scores = pol.score(q, k, v, key_valid).masked_fill(~key_valid[:, None, :], float("-inf"))
    with torch.no_grad(), longattn.apply(m, policy) as s:
        m(ids, attention_mask=am, use_cache=True)
        layer = s.cache.layers[1]
    for b in range(2):
        for h in range(k.shape[1]):
            pos = layer.kept(b, h)
            n_keep = int(key_valid[b].sum() * (1 - pol.ratio))
            assert len(pos) == n_keep
            kept = scores[b, h, pos.long()]
            dropped = scores[b, h].clone()
            dropped[pos.long()] = float("-inf")
            # every kept token scores at least as high as every dropped one
            assert kept.min() >= dropped.max() - 1e-6
    if policy.startswith("streaming_llm"):
        pos = layer.kept(1, 0)
        assert pos[:3].tolist() == [9, 10, 11]  # sinks: first valid tokens of the padded row
        assert pos[-1].item() == 99


@pytest.mark.parametrize("features", [False, True], ids=["plain", "softcap-sinks-window"])
@pytest.mark.parametrize("ragged", [False, True], ids=["uniform", "ragged"])
@pytest.mark.parametrize("nq", [1, 5], ids=["decode", "chunk"])
def test_compressed_attention_equals_reference(ragged, nq, features):
    b, hk, g, n, d, t = 2, 2, 3, 40, 16, 7
    k, v = torch.randn(b, hk, n, d), torch.randn(b, hk, n, d)
    layer = LongattnLayer()
    layer.update(k, v)
    lengths = torch.tensor([[20, 11], [5, 30]]) if ragged else torch.full((b, hk), 17)
    idx = torch.stack([torch.stack([torch.randperm(n)[:30].sort().values for _ in range(hk)]) for _ in range(b)])
    layer.compress(idx, lengths)
    assert (layer.prefix is not None) == ragged and layer.get_seq_length() == n
    for bi in range(b):
        for hi in range(hk):
            assert layer.kept(bi, hi).tolist() == idx[bi, hi, : lengths[bi, hi]].tolist()
    kt, vt = torch.randn(b, hk, t, d), torch.randn(b, hk, t, d)
    layer.update(kt, vt)
    assert layer.get_seq_length() == n + t
    q = torch.randn(b, hk * g, nq, d)
    softcap, sinks, window = (1.5, torch.randn(hk * g), 20) if features else (None, None, None)
    out = attend_compressed(layer, q, None, d**-0.5, softcap, sinks, window)
    # reference: full keys, mask = kept prefix tokens + causal tail
    full_k, full_v = torch.cat([k, kt], 2), torch.cat([v, vt], 2)
    mask = torch.zeros(b, hk * g, nq, n + t, dtype=torch.bool)
    for bi in range(b):
        for hi in range(hk):
            keep = idx[bi, hi, : lengths[bi, hi]]
            mask[bi, hi * g : (hi + 1) * g, :, keep] = True
    mask[..., n:] = True
    ref, _ = attention(q, full_k, full_v, mask=mask, causal=True, softcap=softcap, sinks=sinks, window=window)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_ragged_pack_is_exact_and_frees_memory():
    k = torch.randn(2, 2, 10, 4)
    idx = torch.tensor([[[1, 3, 0], [2, 5, 9]], [[0, 0, 0], [4, 6, 8]]])
    lengths = torch.tensor([[2, 3], [1, 3]])
    r = RaggedKV.gather(k, k, idx, lengths)
    assert r.keys.shape == (9, 4)
    for b in range(2):
        for h in range(2):
            kk, _, pos = r.row(b, h)
            assert torch.equal(kk, k[b, h, idx[b, h, : lengths[b, h]]])
            assert pos.tolist() == idx[b, h, : lengths[b, h]].tolist()
    layer = LongattnLayer()
    layer.update(k, k)
    layer.compress(idx, lengths)
    with pytest.raises(ValueError, match="nothing to compress"):
        layer.compress(idx, lengths)
    # a second chunk, compressed on its own (chunked prefill): positions continue after the first chunk
    layer.update(k[:, :, :4], k[:, :, :4])
    layer.compress(torch.tensor([[[1, 3], [0, 2]], [[2, 3], [0, 1]]]), torch.tensor([[2, 1], [2, 2]]))
    assert layer.get_seq_length() == 14
    assert layer.kept(0, 0).tolist() == [1, 3, 11, 13] and layer.kept(0, 1).tolist() == [2, 5, 9, 10]
    assert layer.kept(1, 0).tolist() == [0, 12, 13]
    kk = layer.prefix.row(0, 0)[0]
    assert torch.equal(kk, torch.cat([k[0, 0, [1, 3]], k[0, 0, [1, 3]]]))
    # beam search reorders the packed rows (issue 13: it was refused), repeats included
    before = [[layer.kept(b, h).tolist() for h in range(2)] for b in range(2)]
    layer.reorder_cache(torch.tensor([1, 0]))
    assert [[layer.kept(b, h).tolist() for h in range(2)] for b in range(2)] == before[::-1]
    assert torch.equal(layer.prefix.row(1, 0)[0], kk)
    layer.batch_repeat_interleave(2)
    assert layer.prefix.batch == 4 and layer.kept(3, 1).tolist() == before[0][1]


@pytest.mark.parametrize("recipe", ["snapkv:ratio=0.5:obs_window=8", "streaming_llm:ratio=0.7",
                                    "sink_window:window=32:sink=16:block_size=16+snapkv:ratio=0.4"])
def test_batched_with_left_padding_equals_unbatched(recipe):
    """Each row is compressed by its own valid length: a padded batch decodes like each prompt alone.
    (The padding is a whole number of 16-token blocks, so block-granular patterns select the same tokens.)"""
    m = tiny_model("llama")
    for layer in m.model.layers:  # sharper attention: no near-ties among scores for float noise to flip
        layer.self_attn.q_proj.weight.data *= 8
    ids, am = _ids(b=2, n=120, pad=(0, 32), seed=3)
    kw = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), longattn.apply(m, recipe):
        both = m.generate(ids, attention_mask=am, **kw)
        alone = [m.generate(ids[i : i + 1, am[i].bool()], **kw) for i in range(2)]
    for i in range(2):
        assert torch.equal(both.sequences[i, -6:], alone[i].sequences[0, -6:])
        torch.testing.assert_close(torch.stack(both.logits, 1)[i], torch.stack(alone[i].logits, 1)[0],
                                   rtol=0, atol=1e-4)
