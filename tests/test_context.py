"""Saved contexts: compress once, save, load, answer; token for token the in-memory path; refused elsewhere."""

import json

import pytest
import torch
from transformers import DynamicCache

import longattn
from _helpers import ids_batch
from longattn.bench.decoding import forward, greedy_model
from longattn.context import FORMAT, load_context, read_header, save_context
from longattn.models import tiny_model, tiny_tokenizer

RECIPES = ["snapkv:ratio=0.5:obs_window=8", "adaptive_heads:ratio=0.6:inner=snapkv/obs_window=8",
           "snapkv:ratio=0.5:obs_window=8+quest:budget=32:page=16:dense_layers=",
           "squeezed:budget=48:cluster_tokens=8", "h2o:ratio=0.5:decode_budget=40:recent=4",
           "sink_window:sink=4:window=32:block_size=16+knorm:ratio=0.5", "kvzip:ratio=0.6:chunk=64"]
TOK = tiny_tokenizer()  # KVzip's reconstruction prompt


def _answer(m, recipe, ctx, rest, cache=None, path=None, eos=frozenset()):
    """Greedy answer to ``rest`` after ``ctx``: prefilled now (saving to ``path``), or from a loaded ``cache``."""
    with torch.no_grad(), longattn.apply(m, recipe, tokenizer=TOK) as s:
        kw = s.cache_kwarg
        if cache is None:
            cache = DynamicCache(config=m.config)
            forward(m, ctx, cache, kw)
            if path is not None:
                save_context(path, s.cache, m, recipe, n_tokens=len(ctx))
        s.set_compression(False)
        logits = forward(m, rest, cache, kw)[0, -1]
        gen, _ = greedy_model(m, logits, cache, kw, 8, set(eos))
    return gen


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@pytest.mark.parametrize("recipe", RECIPES, ids=[r.split(":")[0] + ("+" + r.split("+")[1].split(":")[0] if "+" in r else "")
                                              for r in RECIPES])
def test_a_loaded_context_answers_token_for_token_as_in_memory(recipe, arch, tmp_path):
    m = tiny_model(arch, num_hidden_layers=4)
    ids, _ = ids_batch(1, 150, pad=(0,))
    ctx, rest = ids[0, :140].tolist(), ids[0, 140:].tolist()
    want = _answer(m, recipe, ctx, rest, path=tmp_path / "c.safetensors")
    for _ in range(2):  # any number of questions from one file
        cache, header = load_context(tmp_path / "c.safetensors", m, recipe)
        assert header["format"] == FORMAT and header["n_tokens"] == 140
        assert _answer(m, recipe, ctx, rest, cache=cache) == want


def test_a_context_is_refused_by_another_model_recipe_or_format(tmp_path):
    m = tiny_model("llama")
    ids, _ = ids_batch(1, 60, pad=(0,))
    p = tmp_path / "c.safetensors"
    _answer(m, "snapkv:ratio=0.5:obs_window=8", ids[0, :50].tolist(), ids[0, 50:].tolist(), path=p)
    with pytest.raises(ValueError, match="made with another model"):
        load_context(p, tiny_model("llama", seed=1))
    with pytest.raises(ValueError, match="compressed with the recipe 'snapkv:ratio=0.5:obs_window=8', not"):
        load_context(p, m, "tova:ratio=0.5")
    load_context(p, m, "snapkv:obs_window=8:ratio=0.5")  # the same recipe spelt otherwise
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(p), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = json.loads(f.metadata()["longattn"])
    header["format"] = "longattn.context/9"
    save_file(tensors, str(tmp_path / "new.safetensors"), metadata={"longattn": json.dumps(header)})
    with pytest.raises(ValueError, match="has format 'longattn.context/9'"):
        load_context(tmp_path / "new.safetensors", m)
    (tmp_path / "torn.safetensors").write_bytes(p.read_bytes()[:100])
    with pytest.raises(ValueError, match="is not a longattn saved context"):
        read_header(tmp_path / "torn.safetensors")


@pytest.mark.model
def test_compress_then_generate_from_the_command_line(smollm2, tmp_path, capsys, monkeypatch):
    from longattn import cli, models
    from longattn.bench.prompts import encode
    from longattn.bench.tasks.base import Sample

    model, tok = smollm2
    monkeypatch.setattr(models, "load", lambda *a, **k: (model, tok))
    context = "Alice keeps the red key. Bob keeps the blue key. " * 20 + "The vault code is 4471."
    (tmp_path / "ctx.txt").write_text(context)
    (tmp_path / "q.txt").write_text("What is the vault code?")
    out = tmp_path / "ctx.safetensors"
    assert cli.main(["compress", "--recipe", "tova:ratio=0.5", "--context-file", str(tmp_path / "ctx.txt"),
                     "--out", str(out)]) == 0
    assert cli.main(["compress", "--recipe", "tova:ratio=0.5", "--context-file", str(tmp_path / "ctx.txt"),
                     "--out", str(out)]) == 2  # not replaced without --overwrite
    capsys.readouterr()
    answers = []
    for _ in range(2):
        assert cli.main(["generate", "--context", str(out), "--prompt-file", str(tmp_path / "q.txt"),
                         "--max-new-tokens", "8"]) == 0
        answers.append(capsys.readouterr().out.strip())
    ctx, rest = encode(tok, Sample("cli", context, "What is the vault code?", "", []))
    gen = _answer(model, "tova:ratio=0.5", ctx, rest, eos=frozenset(tok.all_special_ids))
    want = tok.decode(gen, skip_special_tokens=True).strip()
    assert answers[0] == answers[1] == want
    assert cli.main(["generate", "--context", str(out), "--recipe", "knorm:ratio=0.5", "--prompt-file",
                     str(tmp_path / "q.txt")]) == 2
    assert "compressed with the recipe" in capsys.readouterr().err
