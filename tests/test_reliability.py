"""Nothing lost, nothing silently wrong: results on disk, the weights cache, caches inside and after apply(),
generation modes, several models, and one clear line for every bad input (issue 13's hostile cases)."""

import json
import os
import weakref

import pytest
import torch
from transformers import DynamicCache

import longattn
from _helpers import ids_batch
from longattn import models
from longattn.bench.records import ResultsFile, read_results, record_key
from longattn.cli import main
from longattn.models import tiny_model
from longattn.outputs import check_output_file, safe_name


def _rec(i=0, **kw):
    r = {"task": "passkey", "method": "dense", "length": 256, "sample": i, "score": 1.0, "correct": True,
         "kv_cache_bytes": 10, "prefill_s": 1.0, "decode_tok_s": 2.0, "kl": 0.0, "top1_agree": 1.0, "model": "m",
         "seed": 0, "key": {"task": "passkey", "method": "dense", "length": 256, "sample": i, "model": "m", "seed": 0,
                            "protocol": "qa/question_agnostic"}}
    r.update(kw)
    return r


# ---- results on disk ----------------------------------------------------------------------------------------
def test_an_existing_results_file_is_never_deleted_without_being_asked(tmp_path):
    (tmp_path / "results.jsonl").write_text(json.dumps(_rec()) + "\n")
    with pytest.raises(ValueError, match=r"already holds 1 records; add --resume .* or --overwrite"):
        with ResultsFile(tmp_path):
            pass
    assert len(read_results(tmp_path / "results.jsonl")) == 1  # untouched
    with ResultsFile(tmp_path, resume=True) as rf:
        assert len(rf.done) == 1
        rf.append(_rec(1))
    assert len(read_results(tmp_path / "results.jsonl")) == 2
    with ResultsFile(tmp_path, overwrite=True) as rf:
        assert not rf.done
    assert read_results(tmp_path / "results.jsonl") == []


def test_a_second_concurrent_writer_is_refused(tmp_path):
    with ResultsFile(tmp_path) as rf:
        rf.append(_rec())
        with pytest.raises(ValueError, match=rf"another longattn bench \(pid {os.getpid()}\) is writing"):
            with ResultsFile(tmp_path, resume=True):
                pass
        rf.append(_rec(1))
    with ResultsFile(tmp_path, resume=True) as rf:  # released on exit
        assert len(rf.done) == 2


def test_resume_repairs_a_torn_tail(tmp_path):
    good = json.dumps(_rec(0)) + "\n"
    torn = json.dumps(_rec(1))[:40]
    (tmp_path / "results.jsonl").write_text(good + torn)
    warns = []
    with ResultsFile(tmp_path, resume=True, warn=warns.append) as rf:
        assert len(rf.done) == 1
        rf.append(_rec(2))
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(x)["sample"] for x in lines] == [0, 2]  # every line parses
    assert (tmp_path / "results.jsonl.torn").read_text().strip() == torn  # kept aside, not lost
    assert any("torn" in w for w in warns)


def test_record_key_holds_everything_that_defines_a_record():
    base = _rec()
    for field, other in (("seed", 7), ("model", "other"), ("method", "snapkv:ratio=0.5"), ("task", "niah"),
                         ("length", 512), ("protocol", "qa/query_aware")):
        r = _rec()
        r["key"] = dict(r["key"], **{field: other})
        assert record_key(r) != record_key(base), field


@pytest.mark.model
def test_resume_with_another_seed_or_model_reruns(smollm2, tmp_path):
    from longattn.bench.runner import BenchConfig, run

    model, tok = smollm2
    cfg = BenchConfig(lengths=(256,), samples=1, methods=("dense",), out_dir=str(tmp_path), progress=False)
    first = run(cfg, model=model, tokenizer=tok)
    cfg.resume, cfg.seed = True, 7
    second = run(cfg, model=model, tokenizer=tok)
    assert second[0]["seed"] == 7 and second[0]["run_id"] != first[0]["run_id"]  # really ran again
    assert len(read_results(tmp_path / "results.jsonl")) == 2
    again = run(cfg, model=model, tokenizer=tok)  # the same key: skipped
    assert again[0]["run_id"] == second[0]["run_id"]
    for r in first:  # records describe what ran
        for f in ("run_id", "commit", "settings", "versions", "context_sha", "cpu", "isa", "threads", "key"):
            assert f in r, f
        assert set(r["versions"]) == {"python", "torch", "transformers"}


def test_outputs_are_checked_before_any_work(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ValueError, match="--json: cannot create the directory"):
        check_output_file(f / "sub" / "r.json", "--json")
    with pytest.raises(ValueError, match="exists; add --overwrite"):
        check_output_file(f, "--json")
    check_output_file(f, "--json", overwrite=True)
    assert f.read_text() == "x"  # the check writes nothing
    from longattn.bench.runner import BenchConfig, run

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the output paths were checked")

    cfg = BenchConfig(json_path=str(f / "r.json"), progress=False)
    with pytest.raises(ValueError, match="--json"):
        run(cfg, model=None, tokenizer=None, log=boom)
    with pytest.raises(ValueError, match="--out: .* is a file"):
        run(BenchConfig(out_dir=str(f), progress=False))


def test_report_names_stay_inside_the_directory(tmp_path):
    pytest.importorskip("matplotlib")
    from longattn.bench.report import render_dir

    out = tmp_path / "rep"
    recs = [_rec(0, task="../../ESCAPED"), _rec(0, task="/abs/ESC", method="snapkv:ratio=0.5")]
    render_dir(recs, out)
    assert not list(tmp_path.glob("ESCAPED*")) and not (tmp_path.parent / "ESCAPED").exists()
    for p in out.rglob("*"):
        assert out in p.resolve().parents
    assert safe_name("../../x") == "x" and "/" not in safe_name("/a/b")


def test_report_refuses_a_file_with_no_valid_record(tmp_path, capsys):
    (tmp_path / "results.jsonl").write_text("{not json\n" + json.dumps({"task": "p"}) + "\n")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no valid record" in err and "missing field" in err


def test_paired_ratios_are_formed_within_one_run():
    from longattn.bench.report import paired_ratio

    recs = [_rec(0, run_id="a", prefill_s=1.0), _rec(0, run_id="a", method="x", prefill_s=0.5),
            _rec(0, run_id="b", prefill_s=10.0), _rec(1, run_id="b", method="x", prefill_s=5.0)]
    # run b's method row has no dense row of its own sample: only run a's pair counts
    assert paired_ratio(recs, "prefill_s") == {("passkey", 256, "x"): 2.0, ("passkey", 256, "dense"): 1.0}


def test_bench_table_gives_each_speed_ratio_its_per_sample_spread():
    from longattn.bench.report import bench_table, paired_spread

    recs = [_rec(0, run_id="a", prefill_s=1.0), _rec(0, run_id="a", method="x", prefill_s=0.5),
            _rec(1, run_id="a", prefill_s=3.0), _rec(1, run_id="a", method="x", prefill_s=2.0),
            _rec(2, run_id="b", method="x", prefill_s=0.1)]  # no dense of its own run: not a pair
    assert paired_spread(recs, "prefill_s") == {("passkey", 256, "x"): (1.5, 2.0)}
    row = next(ln for ln in bench_table(recs).splitlines() if " x " in f" {ln} " and "passkey" in ln)
    assert "1.60 (1.50-2.00)" in row  # sum(dense) / sum(x) = 4 / 2.5, beside the per-sample extremes


def test_accuracy_interval():
    from longattn.bench.report import wilson

    lo, hi = wilson(5, 5)
    assert hi == pytest.approx(1.0) and 0.5 < lo < 0.6  # Wilson 95% for 5/5: [0.566, 1]
    lo, hi = wilson(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-3)


# ---- the converted-weights cache -----------------------------------------------------------------------------
def _fake_converted(tmp_path):
    src = tmp_path / "src.gguf"
    src.write_bytes(os.urandom(1 << 20))
    out = tmp_path / "conv"
    out.mkdir()
    (out / "model.safetensors").write_bytes(os.urandom(3 << 20))
    (out / "config.json").write_text("{}")
    models.write_stamp(out, src)
    return src, out


def test_weights_cache_detects_damage_and_truncation(tmp_path):
    src, out = _fake_converted(tmp_path)
    assert models.check_converted(out, src) is None
    w = out / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[1 << 20 : (1 << 20) + 300_000] = os.urandom(300_000)  # damaged, same size
    w.write_bytes(bytes(data))
    assert "damaged" in models.check_converted(out, src)
    w.write_bytes(bytes(data[: len(data) // 2]))
    assert "bytes" in models.check_converted(out, src)
    (out / "longattn.json").unlink()
    assert models.check_converted(out, src) == "no valid stamp"


def test_a_user_folder_without_the_stamp_is_never_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGATTN_CACHE_DIR", str(tmp_path))
    mine = tmp_path / "smollm2-135m"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    monkeypatch.setattr(models, "_gguf_path", lambda name: tmp_path / "x.gguf")
    (tmp_path / "x.gguf").write_bytes(b"0" * 10)
    with pytest.raises(ValueError, match="was not written by longattn"):
        models.resolve("smollm2-135m", log=lambda s: None)
    assert (mine / "notes.txt").read_text() == "mine"


def test_cache_dir_naming_a_file_is_refused(tmp_path, monkeypatch):
    f = tmp_path / "f"
    f.write_text("")
    monkeypatch.setenv("LONGATTN_CACHE_DIR", str(f))
    with pytest.raises(ValueError, match="LONGATTN_CACHE_DIR .* is a file"):
        models.cache_dir()


def test_model_dir_without_weights_or_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no model_type"):
        models.resolve(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="no weights"):
        models.resolve(str(tmp_path))


# ---- caches inside and after apply() ----------------------------------------------------------------------------
@pytest.mark.parametrize("kw", ["past_key_values", "cache"])
def test_a_cache_the_user_passes_is_adopted(kw):
    m = tiny_model("llama")
    ids, _ = ids_batch(1, 40, pad=(0,))
    with torch.no_grad():
        c0 = DynamicCache()
        m(ids[:, :-1], use_cache=True, past_key_values=c0)
        ref = m(ids[:, -1:], use_cache=True, past_key_values=c0).logits
        with longattn.apply(m, "dense") as s:
            c = DynamicCache()
            m(ids[:, :-1], use_cache=True, **{kw if kw == s.cache_kwarg else "past_key_values": c})
            got = m(ids[:, -1:], use_cache=True, **{kw if kw == s.cache_kwarg else "past_key_values": c}).logits
            assert s.cache is c
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_a_compressed_cache_refuses_use_after_the_block():
    m = tiny_model("llama")
    ids, _ = ids_batch(1, 80, pad=(0,))
    with torch.no_grad():
        with longattn.apply(m, "adaptive_heads:ratio=0.5:inner=snapkv/obs_window=8") as s:
            c = DynamicCache()
            m(ids, use_cache=True, **{s.cache_kwarg: c})
            assert c.layers[0].compressed
        with pytest.raises(ValueError, match="only valid there"):
            m(ids[:, -1:], use_cache=True, past_key_values=c)
        with longattn.apply(m, "dense") as s:  # valid again inside an apply() block
            m(ids[:, -1:], use_cache=True, **{s.cache_kwarg: c})


def test_dropped_tokens_are_freed_not_just_hidden():
    """After compression no reference keeps the full key tensor alive: its storage is returned to the allocator
    (a weak reference to it dies), and the cache's storage bytes drop."""
    from longattn.cache import LongattnLayer, cache_nbytes

    m = tiny_model("llama")
    ids, _ = ids_batch(1, 200, pad=(0,))
    full = []
    real = LongattnLayer.compress

    def spy(self, idx, lengths):
        full.append(weakref.ref(self.keys))
        return real(self, idx, lengths)

    with torch.no_grad():
        dense = DynamicCache()
        m(ids, use_cache=True, past_key_values=dense)
        LongattnLayer.compress = spy
        try:
            with longattn.apply(m, "snapkv:ratio=0.75:obs_window=8") as s:
                c = DynamicCache()
                m(ids, use_cache=True, **{s.cache_kwarg: c})
        finally:
            LongattnLayer.compress = real
    import gc

    gc.collect()
    assert full and all(r() is None for r in full), "the uncompressed keys are still alive somewhere"
    assert cache_nbytes(c) <= 0.26 * cache_nbytes(dense)


@pytest.mark.parametrize("recipe", ["snapkv:ratio=0.5:obs_window=8", "adaptive_heads:ratio=0.5:inner=snapkv/obs_window=8"])
def test_several_return_sequences_and_beams_over_a_compressed_cache(recipe):
    m = tiny_model("llama")
    ids, _ = ids_batch(1, 60, pad=(0,))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4)
    with torch.no_grad(), longattn.apply(m, recipe):
        one = m.generate(ids, do_sample=False, **kw)
        two = m.generate(ids, do_sample=False, num_return_sequences=2, num_beams=2, **kw)
        torch.manual_seed(0)
        sampled = m.generate(ids, do_sample=True, num_return_sequences=3, **kw)
    assert two.shape == (2, 64) and sampled.shape == (3, 64)
    assert torch.equal(two[:, :60], ids.expand(2, -1))
    assert one.shape == (1, 64)


def test_beams_refused_clearly_after_a_selector_with_state():
    m = tiny_model("llama", num_hidden_layers=4)
    ids, _ = ids_batch(1, 150, pad=(0,))
    with torch.no_grad(), longattn.apply(m, "squeezed:budget=48:cluster_tokens=8"):
        with pytest.raises(ValueError, match="cannot follow reordered or repeated batch rows"):
            m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, num_beams=2, do_sample=False)


def test_two_models_each_behave_as_alone():
    a, b = tiny_model("llama", seed=1), tiny_model("qwen2", seed=2)
    ids, _ = ids_batch(1, 80, pad=(0,))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        ra = longattn_generate(a, ids, "snapkv:ratio=0.5:obs_window=8", kw)
        rb = longattn_generate(b, ids, "streaming_llm:ratio=0.5", kw)
        with longattn.apply(a, "snapkv:ratio=0.5:obs_window=8"), longattn.apply(b, "streaming_llm:ratio=0.5"):
            assert torch.equal(b.generate(ids, **kw), rb)  # nested across models
            assert torch.equal(a.generate(ids, **kw), ra)
        assert a.config._attn_implementation == b.config._attn_implementation == "sdpa"


def longattn_generate(m, ids, recipe, kw):
    with longattn.apply(m, recipe):
        return m.generate(ids, **kw)


def test_two_models_sharing_one_config_are_not_mixed_up():
    from transformers import AutoModelForCausalLM

    cfg = models.tiny_config("llama")
    a = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    b = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    if b.config is not a.config:
        pytest.skip("this transformers copies the config per model")
    ids, _ = ids_batch(1, 30, pad=(0,))
    with torch.no_grad(), longattn.apply(a, "dense"):
        a(ids)
        with pytest.raises(RuntimeError, match="did two models share one config"):
            b(ids)


# ---- lengths --------------------------------------------------------------------------------------------------
def test_lengths_beyond_the_model_positions_are_refused_before_any_work():
    from longattn.bench.runner import BenchConfig, run

    m = tiny_model("llama", max_position_embeddings=512)
    with pytest.raises(ValueError, match=r"--lengths: 1024 tokens exceeds the model's 512 positions.*--extrapolate"):
        run(BenchConfig(lengths=(1024,), samples=1, methods=("dense",), progress=False), model=m, tokenizer=None)
    assert models.max_positions("smollm2-135m") == 8192


# ---- one line, exit 2 ----------------------------------------------------------------------------------------
BAD_CLI = [
    (["bench", "--methods", "+"], "empty method between"),
    (["bench", "--methods", "snapkv:ratio=0.5:ratio=0.9"], "given twice"),
    (["bench", "--task", "passkey", "--data", "x.jsonl"], "--data is read by --task custom only"),
    (["bench", "--resume"], "--resume needs --out"),
    (["bench", "--resume", "--overwrite", "--out", "d"], "choose one"),
    (["bench", "--lengths", "100000", "--methods", "dense"], "exceeds the model's 8192 positions"),
]


@pytest.mark.parametrize("argv,msg", BAD_CLI, ids=[" ".join(a)[:40] for a, _ in BAD_CLI])
def test_bad_input_is_one_line_and_exit_2(argv, msg, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("conf,msg", [({"lengths": 512}, "lengths must be a list"),
                                      ({"samples": "3"}, "samples must be an integer"),
                                      ({"lengths": [512, "x"]}, "list of integers"),
                                      ({"bogus": 1}, "unknown key 'bogus'")])
def test_config_values_are_type_checked(conf, msg, tmp_path, capsys):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(conf))
    assert main(["bench", "--config", str(p)]) == 2
    assert msg in capsys.readouterr().err


def test_config_methods_as_a_comma_string(tmp_path):
    from longattn.cli import _config_value

    assert _config_value("methods", "dense,snapkv:ratio=0.5", "list-str") == ("dense", "snapkv:ratio=0.5")


@pytest.mark.parametrize("content,msg", [(b"\x00\x01binary", "binary file"), ("caf\xe9".encode("latin-1"), "not UTF-8"),
                                         (b"   \n", "is empty")])
def test_prompt_and_data_files_must_be_text(content, msg, tmp_path, capsys):
    p = tmp_path / "p.txt"
    p.write_bytes(content)
    assert main(["generate", "--prompt-file", str(p)]) == 2
    err = capsys.readouterr().err
    assert "--prompt-file" in err and msg in err
    from longattn.bench.tasks.custom import load_jsonl

    with pytest.raises(ValueError, match=f"--data.*{msg}" if msg != "is empty" else "--data"):
        load_jsonl(str(p))


def test_custom_task_arguments_in_the_spec(tmp_path):
    from longattn.bench.runner import BenchConfig, make_task

    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"context": "c" * 20, "question": "q?", "answers": ["a"]}) + "\n")
    cfg = BenchConfig(tasks=("custom:scorer=rouge",), data=str(p))
    cfg.validate()
    assert make_task("custom:scorer=rouge", cfg).scorer == "rouge"


def test_the_amdahl_bound_and_the_attention_share():
    """bound = 1/((1-s)+s d); s from dense's rows (attention seconds over the prefill's), d the method's kept work;
    the session times only full-attention layers."""
    from longattn.bench.report import amdahl, attention_share, kept_work

    assert amdahl(0.5, 0.1) == pytest.approx(1 / 0.55) and amdahl(None, 0.5) is None and amdahl(0.3, 1.0) == 1.0
    recs = [{"task": "t", "length": 8, "method": "dense", "attn_prefill_s": 1.0, "prefill_s": 4.0, "attn_decode_s": 1.0,
             "decode_s": 2.0}]
    assert attention_share(recs)[("t", 8)] == (0.25, 0.5)
    assert kept_work([{"prefill_density": 0.2, "decode_density": None, "kv_cache_bytes": 30, "plain_bytes": 100}]) \
        == (0.2, 0.3)
    m = tiny_model("gemma3_text", num_hidden_layers=2)  # one sliding, one full layer
    ids, _ = ids_batch(1, 40, pad=(0,))
    with torch.no_grad(), longattn.apply(m, "dense") as s:
        m(ids, use_cache=True)
        full = s.attention_seconds["prefill"]
    assert full > 0 and s.attention_seconds["decode"] == 0.0


def test_compilation_in_a_sliding_layer_is_not_taken_off_the_full_layers_attention_time(monkeypatch):
    """Gemma 3's sliding layers may compile FlexAttention during a dense prefill: that compilation is left out of
    the time of the layer that compiled, not of the full layers' (a dense 8K prefill once read -15 s there).
    Simulated: the sliding call takes 60 ms of which 50 compiling, the full call 30 ms of which 10 compiling."""
    import time as _time

    import longattn.session as session_mod
    from longattn.ops import flex

    real = session_mod.dense_attention

    def fake(q, k, v, key_valid, scale, window=None, *rest):
        if window is not None:
            _time.sleep(0.06)
            flex._COMPILE_S[0] += 0.05
        else:
            _time.sleep(0.03)
            flex._COMPILE_S[0] += 0.01
        return real(q, k, v, key_valid, scale, window, *rest)

    monkeypatch.setattr(session_mod, "dense_attention", fake)
    from longattn.bench import decoding

    m = tiny_model("gemma3_text", num_hidden_layers=2)  # one sliding, one full layer
    ids, _ = ids_batch(1, 40, pad=(0,))
    with torch.no_grad(), longattn.apply(m, "dense") as s:
        _, prefill_s, _, _, extra = decoding.prefill(m, s, s.recipe, ids[0].tolist(), DynamicCache(config=m.config),
                                                     s.cache_kwarg)
    assert extra["compile_s"] == pytest.approx(0.06)
    assert extra["attn_prefill_s"] >= 0.02, "the full layer's 20 ms left after its own compilation"
    assert extra["attn_prefill_s"] <= prefill_s, "attention is part of the prefill, not more than it"


def test_interleaved_timing_alternates_the_calls_and_reports_the_spread():
    from longattn.bench.ops import ratio_stats, time_interleaved

    calls = []
    ts = time_interleaved({"dense": lambda: calls.append("d"), "method": lambda: calls.append("m")}, 3)
    assert calls == ["d", "m"] + ["d", "m"] * 3, "one warm-up each, then the two in turn every round"
    assert len(ts["dense"]) == len(ts["method"]) == 3
    st = ratio_stats([2.0, 4.0, 3.0], [1.0, 1.0, 2.0])
    assert st["dense_ms"] == 3000.0 and st["ms"] == 1000.0 and st["speedup"] == 3.0
    assert (st["speedup_min"], st["speedup_max"]) == (1.5, 4.0)
