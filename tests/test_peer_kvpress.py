"""--peer kvpress plumbing, with a stand-in ``kvpress`` module (the real one pins transformers<5.3 and is not
installed here): peer rows run the same samples, positions stay those of the full sequence, fidelity is
teacher-forced against dense."""

import contextlib
import sys
import types

import pytest

from longattn.bench.runner import BenchConfig, run


class _Press:
    keep_all = True

    def __init__(self, compression_ratio=0.0, seed=None):
        self.compression_ratio = compression_ratio

    def compress(self, cache):
        if self.keep_all:
            return
        for layer in cache.layers:  # keep the most recent (1 - ratio) of the tokens
            keep = layer.keys.shape[2] - int(layer.keys.shape[2] * self.compression_ratio)
            layer.keys, layer.values = layer.keys[:, :, -keep:].clone(), layer.values[:, :, -keep:].clone()

    @contextlib.contextmanager
    def __call__(self, model):
        h = model.register_forward_hook(lambda m, a, kw, out: self.compress(kw.get("cache") or kw["past_key_values"]), with_kwargs=True)
        try:
            yield
        finally:
            h.remove()


@pytest.fixture
def fake_kvpress(monkeypatch):
    mod = types.ModuleType("kvpress")
    mod.SnapKVPress = type("SnapKVPress", (_Press,), {})
    mod.StreamingLLMPress = type("StreamingLLMPress", (_Press,), {"keep_all": False})
    for name in ("KnormPress", "TOVAPress", "PyramidKVPress", "ObservedAttentionPress", "RandomPress"):
        setattr(mod, name, type(name, (_Press,), {}))
    monkeypatch.setitem(sys.modules, "kvpress", mod)
    return mod


def test_peer_needs_kvpress_and_an_equivalent(monkeypatch, fake_kvpress):
    with pytest.raises(ValueError, match="none of --methods is a KV policy with a kvpress equivalent"):
        BenchConfig(methods=("dense", "sink_window"), peer="kvpress").validate()
    monkeypatch.setitem(sys.modules, "kvpress", None)
    with pytest.raises(ValueError, match="kvpress is not installed"):
        BenchConfig(methods=("dense", "snapkv:ratio=0.5"), peer="kvpress").validate()


@pytest.mark.model
def test_peer_rows_beside_ours(smollm2, fake_kvpress):
    model, tok = smollm2
    cfg = BenchConfig(lengths=(256,), samples=2, methods=("dense", "snapkv:ratio=0.5", "streaming_llm:ratio=0.5"),
                      peer="kvpress", progress=False)
    recs = run(cfg, model=model, tokenizer=tok)
    by = {}
    for r in recs:
        by.setdefault(r["method"], []).append(r)
    assert set(by) == {"dense", "snapkv:ratio=0.5", "streaming_llm:ratio=0.5", "kvpress:SnapKVPress:ratio=0.5",
                       "kvpress:StreamingLLMPress:ratio=0.5"}
    for a, b in zip(by["dense"], by["kvpress:SnapKVPress:ratio=0.5"]):  # a press that keeps all = dense
        assert b["peer"] == "kvpress" and b["prediction"] == a["prediction"] and b["kl"] < 1e-6
        assert b["kv_cache_bytes"] == a["kv_cache_bytes"]
    for a, b in zip(by["dense"], by["kvpress:StreamingLLMPress:ratio=0.5"]):
        assert abs(b["kv_cache_bytes"] / a["kv_cache_bytes"] - 0.5) < 0.01 and b["kl"] > 0


@pytest.mark.model
def test_a_press_that_raises_is_said_once_and_the_run_goes_on(smollm2, fake_kvpress):
    """kvpress's ExpectedAttentionPress raises on Gemma 3 (its rotary call): one line, no rows of that press, every
    other row written."""
    def broken(self, cache):
        raise AttributeError("'Gemma3RotaryEmbedding' object has no attribute 'None_inv_freq'")

    fake_kvpress.SnapKVPress.compress = broken
    model, tok = smollm2
    said = []
    cfg = BenchConfig(lengths=(256,), samples=2, methods=("dense", "snapkv:ratio=0.5", "streaming_llm:ratio=0.5"),
                      peer="kvpress", progress=False)
    recs = run(cfg, model=model, tokenizer=tok, log=said.append)
    methods = sorted({r["method"] for r in recs})
    assert methods == ["dense", "kvpress:StreamingLLMPress:ratio=0.5", "snapkv:ratio=0.5", "streaming_llm:ratio=0.5"]
    assert len(recs) == 8
    assert len(said) == 1 and "kvpress:SnapKVPress:ratio=0.5 failed on smollm2-135m (AttributeError" in said[0]
