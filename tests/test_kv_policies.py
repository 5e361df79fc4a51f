import json

import pytest
import torch
from transformers import DynamicCache

import longattn
from _helpers import ids_batch as _ids
from longattn import api, registry
from longattn.cache import cache_nbytes
from longattn.kv import Novelty, PyramidKV
from longattn.kv.moa_budgets import distribute
from longattn.models import tiny_model, tiny_tokenizer
from longattn.profiles import EXAMPLE

L, H = 2, 2  # tiny model: layers, kv heads
TOK = tiny_tokenizer()  # for policies that encode text of their own (KVzip)


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    p = tmp_path_factory.mktemp("prof") / "tiny.json"
    p.write_text(json.dumps({"num_layers": L, "num_kv_heads": H, "scores": [[0.9, 0.1], [0.05, 0.5]]}))
    return str(p)


def _spec(name: str, ratio: float, prof: str) -> str:
    """``name`` (its first example) or ``name-i`` (its i-th): the policy's declared example settings with
    ``ratio``; a ``profile`` example names the tiny profile."""
    base, _, i = name.partition("-")
    cls = registry.get(base, "kv").cls
    ex = dict(cls.examples[int(i or 0)])
    ex = {k: (prof if v == EXAMPLE else v) for k, v in ex.items()}
    return ":".join([f"{base}:ratio={ratio}"] + [f"{k}={v}" for k, v in ex.items()])


KV_NAMES = [n if len(registry.get(n, "kv").cls.examples) == 1 else f"{n}-{i}"
            for n in registry.names("kv") if n != "dense" for i in range(len(registry.get(n, "kv").cls.examples))]


@pytest.mark.parametrize("name", KV_NAMES)
def test_ratio_zero_gives_identical_logits(name, tiny_profile):
    m = tiny_model("llama")
    ids, am = _ids()
    with torch.no_grad():
        ref = m(ids, attention_mask=am).logits
        with longattn.apply(m, _spec(name, 0.0, tiny_profile), tokenizer=TOK) as s:
            out = m(ids, attention_mask=am, use_cache=True).logits
            gen = m.generate(ids, attention_mask=am, max_new_tokens=4, do_sample=False)
        gen_ref = m.generate(ids, attention_mask=am, max_new_tokens=4, do_sample=False)
    assert s.compressions == 0
    torch.testing.assert_close(out[am.bool()], ref[am.bool()], rtol=0, atol=1e-5)
    assert torch.equal(gen, gen_ref)


@pytest.mark.parametrize("name", KV_NAMES)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_batch2_left_padding_gqa_frees_memory(name, arch, tiny_profile):
    m = tiny_model(arch)
    ids, am = _ids(b=2, n=128, pad=(0, 21))
    with torch.no_grad(), longattn.apply(m, _spec(name, 0.5, tiny_profile), tokenizer=TOK) as s:
        full = DynamicCache()
        s.set_compression(False)
        m(ids, attention_mask=am, use_cache=True, **{s.cache_kwarg: full})
        s.set_compression(True)
        out = m.generate(ids, attention_mask=am, max_new_tokens=5, do_sample=False)
        cache = s.cache
    assert out.shape == (2, 133)
    layer = cache.layers[0]
    assert layer.compressed and layer.kept_lengths().shape == (2, m.config.num_key_value_heads)
    # the cache holds less than the uncompressed one, after 5 more tokens too
    assert cache_nbytes(cache) < 0.75 * cache_nbytes(full)


@pytest.mark.parametrize("name", ["snapkv", "streaming_llm", "knorm", "tova", "h2o", "random", "novelty",
                                  "pyramidkv"])
def test_kept_tokens_are_the_top_scored(name, tiny_profile):
    m = tiny_model("llama")
    ids, am = _ids(b=2, n=100, pad=(0, 9))
    pol = api.parse(_spec(name, 0.6, tiny_profile)).kv
    captured = {}

    def grab(layer_idx, q, k, v, kv):
        if layer_idx == 1:
            captured["qkv"] = (q, k, v, kv)

    with torch.no_grad(), longattn.apply(m, pol) as s, s.observe(grab):
        m(ids, attention_mask=am, use_cache=True)
        layer = s.cache.layers[1]
    q, k, v, kv = captured["qkv"]
    module = m.model.layers[1].self_attn
    scores = pol.score(q, k, v, kv, module).masked_fill(~kv[:, None, :], float("-inf"))
    budgets = pol.budgets(kv.sum(-1), k.shape[1], 1, m.config.num_hidden_layers)
    for b in range(2):
        for h in range(k.shape[1]):
            pos = layer.kept(b, h).long()
            assert len(pos) == int(budgets[b, h])
            dropped = scores[b, h].clone()
            dropped[pos] = float("-inf")
            assert scores[b, h, pos].min() >= dropped.max() - 1e-6


def test_novelty_keeps_rare_values():
    n, d = 200, 16
    base = torch.randn(5, d)
    v = base[torch.arange(n) % 5].clone()  # a 5-token pattern repeated 40 times
    rare = torch.tensor([50, 120, 121])
    v[rare] = torch.randn(3, d) * 3
    v = v.view(1, 1, n, d)
    k = torch.randn(1, 1, n, d)
    idx, lengths = Novelty(ratio=0.9, sink=2, recent=4).keep(k.expand(1, 2, n, d), k, v)
    kept = set(idx[0, 0, : lengths[0, 0]].tolist())
    assert lengths[0, 0] == int(200 * (1 - 0.9))  # 19, as kvpress rounds
    assert {50, 120, 121, 0, 1, 196, 197, 198, 199} <= kept


def test_pyramid_budgets_sum_to_total():
    p = PyramidKV(ratio=0.6)
    for n in (50, 128, 1000):
        got = p.layer_budgets(n, 30)
        assert sum(got) == 30 * int(n * 0.4)
        assert got == sorted(got, reverse=True) and all(1 <= x <= n for x in got)
    low = PyramidKV(ratio=0.1).layer_budgets(100, 8)  # the pyramid would exceed n: capped, excess moved
    assert sum(low) == 8 * 90 and max(low) == 100


def test_adaptive_heads_budgets_sum_and_floor():
    m = tiny_model("llama", num_key_value_heads=2)
    ids, am = _ids(b=1, n=120, pad=(0,))
    with torch.no_grad(), longattn.apply(m, "adaptive_heads:ratio=0.75:alpha=0.5:inner=snapkv/obs_window=8") as s:
        m(ids, use_cache=True)
    for layer in s.cache.layers:
        lens = layer.kept_lengths()[0]
        assert int(lens.sum()) == 2 * int(120 * 0.25)
        assert int(lens.min()) >= int(0.5 * 30)


def test_moa_and_duo_budgets(tiny_profile):
    moa = api.parse(f"moa_budgets:ratio=0.5:profile={tiny_profile}").kv
    b = moa.head_budgets(100)
    assert sum(map(sum, b)) == L * H * 50 and b[0][0] > b[0][1]
    assert sorted(distribute([1, 1, 1], 10, 4)) == [3, 3, 4]
    assert distribute([10, 0, 0], 9, 4)[0] == 4 and sorted(distribute([10, 0, 0], 9, 4)) == [2, 3, 4]
    assert distribute([3, 1], 100, 60) == [60, 40] and sum(distribute([1, 2, 3], 1000, 10)) == 30
    duo = api.parse(f"duo_attention:ratio=0.45:profile={tiny_profile}:sink=4:recent=6").kv
    stream = duo.streaming_heads(100)
    assert stream == {(1, 0), (0, 1)}  # the two lowest-scored heads: 2 of 4 heads x (1 - 10/100) = 0.45
    m = tiny_model("llama")
    ids, _ = _ids(b=1, n=100, pad=(0,))
    with torch.no_grad(), longattn.apply(m, duo) as s:
        m(ids, use_cache=True)
    assert s.cache.layers[1].kept_lengths()[0].tolist() == [10, 100]
    assert s.cache.layers[0].kept_lengths()[0].tolist() == [100, 10]


def test_chunked_compresses_each_chunk_and_bounds_the_cache():
    m = tiny_model("llama")
    ids, _ = _ids(b=1, n=200, pad=(0,))
    with torch.no_grad(), longattn.apply(m, "chunked:ratio=0.5:chunk=64:inner=snapkv/obs_window=8") as s:
        assert m.generation_config.prefill_chunk_size == 64
        out = m.generate(ids, max_new_tokens=3, do_sample=False)
        layer = s.cache.layers[0]
    assert m.generation_config.prefill_chunk_size is None  # restored
    assert out.shape == (1, 203)
    # chunks of 64, 64, 64, 8 tokens, each halved, then 2 generated tokens appended uncompressed
    assert s.compressions == 4 * m.config.num_hidden_layers
    assert int(layer.kept_lengths()[0, 0]) == 32 + 32 + 32 + 4
    pos = layer.kept(0, 0).tolist()
    assert pos == sorted(pos) and pos[-1] >= 192


def test_compose_keeps_the_composed_budget():
    m = tiny_model("llama")
    ids, _ = _ids(b=1, n=100, pad=(0,))
    with torch.no_grad(), longattn.apply(m, "compose:ratio=0.75:first=knorm:second=snapkv/obs_window=8") as s:
        m(ids, use_cache=True)
    assert s.cache.layers[0].kept_lengths()[0].tolist() == [25, 25]
    with pytest.raises(ValueError, match="compose scorers only"):
        api.parse("compose:ratio=0.5:first=duo_attention")
    with pytest.raises(ValueError, match="cannot be nested"):
        api.parse("compose:ratio=0.5:first=adaptive_heads")


@pytest.mark.parametrize(
    "spec,match",
    [
        ("h2o:ratio=1", "ratio"),
        ("tova:ratio=1.2", "ratio"),
        ("snapkv:ratio=0.5:obs_window=-1", "window must be an int >= 1"),
        ("streaming_llm:ratio=0.5:sink=-2", "sink"),
        ("h2o:ratio=0.5:recent=-1", "recent"),
        ("chunked:ratio=0.5:chunk=4", "chunk must be an int >= 16"),
        ("adaptive_heads:ratio=0.5:alpha=2", "alpha"),
        ("adaptive_heads:ratio=0.5:inner=snapkv/ratio=0.3", "give ratio= to the wrapper"),
        ("query_aware:ratio=0.5:inner=nope", "unknown method 'nope'"),
        ("duo_attention:ratio=0.5:profile=/nonexistent.json", "profile: no such file"),
        ("novelty:ratio=0.5:ref=2", "ref must be an int >= 8"),
        ("novelty:ratio=0.5:k=300", "k must be <= ref"),
        ("pyramidkv:ratio=0.5:beta=0.5", "beta"),
    ],
)
def test_bad_input(spec, match):
    with pytest.raises(ValueError, match=match):
        api.parse(spec)


def test_profile_with_wrong_shape_is_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"num_layers": 3, "num_kv_heads": 2, "scores": [[1, 2], [3, 4], [5, 6]]}))
    m = tiny_model("llama")
    with pytest.raises(ValueError, match="profile is for 3 layers x 2 kv heads, the model has 2 x 2"):
        with longattn.apply(m, f"duo_attention:ratio=0.5:profile={bad}"):
            pass
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"num_layers": 2, "num_kv_heads": 2, "scores": [[1, 2], [3]]}))
    with pytest.raises(ValueError, match="must be 2 layers x 2 kv heads"):
        api.parse(f"moa_budgets:ratio=0.5:profile={broken}")


def test_real_memory_per_head_budgets_within_two_percent():
    """Ragged per-head budgets store exactly the kept tokens: (1 - r) dense + int32 positions (<2% at d=64)."""
    m = tiny_model("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    ids, _ = _ids(b=1, n=400, pad=(0,))
    with torch.no_grad():
        with longattn.apply(m, "dense") as s:
            full = DynamicCache()
            m(ids, use_cache=True, **{s.cache_kwarg: full})
        with longattn.apply(m, "adaptive_heads:ratio=0.75:inner=snapkv/obs_window=8") as s:
            cache = DynamicCache()
            m(ids, use_cache=True, **{s.cache_kwarg: cache})
    assert cache.layers[0].prefix is not None  # ragged
    assert cache_nbytes(cache) <= 0.25 * cache_nbytes(full) * 1.02
    assert cache_nbytes(cache) >= 0.25 * cache_nbytes(full)


def test_h2o_decode_budget_evicts_while_generating():
    m = tiny_model("llama")
    ids, _ = _ids(b=1, n=100, pad=(0,))
    with torch.no_grad(), longattn.apply(m, "h2o:ratio=0.5:decode_budget=40:recent=4") as s:
        out = m.generate(ids, max_new_tokens=8, do_sample=False)
        layer = s.cache.layers[1]
    assert out.shape == (1, 108)
    assert layer.physical_len == 40 and layer.get_seq_length() == 107
    pos = layer.kept(0, 0).tolist()
    assert pos == sorted(pos) and pos[-4:] == [103, 104, 105, 106]  # the newest are protected
    assert layer.scores.shape == (1, 2, 40)


def test_evict_keeps_recent_and_top_scored():
    from longattn.cache import LongattnLayer

    k = torch.randn(1, 1, 10, 4)
    layer = LongattnLayer()
    layer.update(k, k)
    layer.scores = torch.tensor([[[5.0, 0.1, 3.0, 0.2, 4.0, 0.3, 0.0, 0.0, 0.0, 0.0]]])
    layer.evict(5, 2)
    assert layer.kept(0, 0).tolist() == [0, 2, 4, 8, 9]
    assert torch.equal(layer.keys[0, 0], k[0, 0, [0, 2, 4, 8, 9]])
    assert layer.get_seq_length() == 10
    with pytest.raises(ValueError, match="decode_budget must exceed recent"):
        api.parse("h2o:ratio=0.5:decode_budget=4:recent=8")


def test_duo_gates_mixing_and_training_smoke():
    from longattn.profile.duo_train import mixed_attention, train_gates
    from longattn.reference import attention, dense_mask

    q, k, v = torch.randn(1, 4, 40, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    full, _ = attention(q, k, v)
    pos = torch.arange(40)
    stream_m = dense_mask(40, 40) & ((pos[None, :] < 3) | (pos[:, None] - pos[None, :] < 5))
    stream, _ = attention(q, k, v, mask=stream_m)
    out = mixed_attention(q, k, v, torch.tensor([1.0, 0.0]), 3, 5, 8**-0.5)
    torch.testing.assert_close(out[:, :2], full[:, :2], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[:, 2:], stream[:, 2:], rtol=0, atol=1e-5)

    class Tok:  # a character-level stand-in tokenizer for the tiny model
        chat_template = None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [3 + (ord(c) % 120) for c in text]}

    m = tiny_model("llama")
    gates = train_gates(m, Tok(), steps=2, length=300, keys=2, progress=False)
    assert len(gates) == 2 and len(gates[0]) == 2 and all(0 <= x <= 1 for r in gates for x in r)
    assert any(x < 1 for r in gates for x in r)  # the L1 term moved them
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("b,h", [(2, 3), (1, 1)], ids=["batch2-heads3", "batch1-head1"])
def test_decode_appends_go_into_reserved_room_not_a_copy_of_the_cache(b, h):
    """Plain transformers copies every layer's whole cache at every decode step (torch.cat); ours appends into
    reserved room (max(16, n/16) tokens; from 4096 tokens on rounded to whole pages), equal to the concatenation, with the room counted in nbytes. (With one
    row and one kv head, as Gemma 3 270M, the head of the buffer is contiguous: the room must still be found.)
    Storage the layer did not allocate is never written past its tokens."""
    from longattn.cache.layer import GROW_MIN, LongattnLayer, grown_capacity

    g = torch.Generator().manual_seed(0)
    lay = LongattnLayer()
    big = torch.randn(b, h, 60, 8, generator=g)
    k0, v0 = big[:, :, :40], torch.randn(b, h, 40, 8, generator=g)  # a user's view with storage behind it
    tail = big[:, :, 40:].clone()
    lay.update(k0.contiguous(), v0)
    lay.keys = k0  # adopted as it is (no copy)
    ks, vs, ptrs = [k0.clone()], [v0], []
    first_cap = grown_capacity(40, 1)  # 40 + 1 + 16 (a short cache: not rounded)
    assert first_cap == 57
    for _ in range(first_cap - 40 + 3):
        k, v = torch.randn(b, h, 1, 8, generator=g), torch.randn(b, h, 1, 8, generator=g)
        fk, fv = lay.update(k, v)
        ks.append(k)
        vs.append(v)
        assert torch.equal(fk, torch.cat(ks, 2)) and torch.equal(fv, torch.cat(vs, 2))
        ptrs.append(fk.data_ptr())
    assert torch.equal(big[:, :, 40:], tail)  # the user's storage past its view is untouched
    assert len(set(ptrs[: first_cap - 40])) == 1  # the first steps wrote in place (at least GROW_MIN of them)
    assert first_cap - 40 >= GROW_MIN
    assert len(set(ptrs)) == 2  # then one copy into a new buffer with room again
    n = lay.physical_len
    per_token = 2 * b * h * 8 * 4  # keys and values, dim 8, float32
    assert lay.nbytes() == grown_capacity(first_cap, 1) * per_token  # the storage held is counted
    assert n * per_token < lay.nbytes() <= (n + max(GROW_MIN, n // 16) + 1) * per_token
    lay.crop(-5)  # a shorter view: the next append copies into a fresh buffer, still equal
    fk, _ = lay.update(ks[1], vs[1])
    assert torch.equal(fk, torch.cat([torch.cat(ks, 2)[:, :, : n - 5], ks[1]], 2))
