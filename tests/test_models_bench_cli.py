import json

import pytest
import torch

import longattn
from longattn import cli, models
from longattn.bench.report import bench_table
from longattn.bench.runner import BenchConfig, encode, read_results, run
from longattn.bench.tasks import Passkey


@pytest.mark.parametrize("arch", models.TINY_ARCHS)
def test_tiny_configs(arch):
    cfg = models.tiny_config(arch)
    assert cfg.model_type == models.TINY_CONFIGS[arch][0] and arch.split("-")[0] == cfg.model_type
    from longattn.hf import kv_heads

    assert kv_heads(cfg) < cfg.num_attention_heads or arch == "gpt_neox"  # GQA everywhere but GPT-NeoX (MHA)
    with pytest.raises(ValueError, match="arch must be one of"):
        models.tiny_config("gpt2")


def test_resolve_rejects_unknown_model(tmp_path):
    with pytest.raises(ValueError, match="neither an embedded model.*nothing is downloaded"):
        models.resolve(str(tmp_path / "missing"))


def test_local_model_directory(tmp_path):
    m = models.tiny_model("qwen2")
    m.save_pretrained(tmp_path)
    assert models.resolve(str(tmp_path)) == tmp_path


def test_passkey_deterministic_and_scorer(smollm2):
    _, tok = smollm2
    t = Passkey()
    a, b, c = t.make(tok, 512, 3, 0), t.make(tok, 512, 3, 0), t.make(tok, 512, 4, 0)
    assert a == b and a.answers != c.answers
    key = a.answers[0]
    assert t.score(f" {key}.", a) == 1.0
    assert t.score(f" {key[:-1]}", a) == 0.0 and t.score(" " + key[::-1], a) == float(key[::-1] == key)
    ctx, rest = encode(tok, a)
    assert 440 <= len(ctx) + len(rest) <= 512


@pytest.mark.model
def test_embedded_model_loads_from_cache_and_compresses(smollm2):
    model, tok = smollm2
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    assert (models.cache_dir() / "smollm2-135m" / "model.safetensors").exists()
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad(), longattn.apply(model, "snapkv:ratio=0.5:obs_window=4") as s:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3 and s.compressions == model.config.num_hidden_layers


@pytest.mark.model
def test_bench_records_resume_and_corrupt_lines(smollm2, tmp_path):
    model, tok = smollm2
    cfg = BenchConfig(lengths=(256,), samples=2, methods=("dense", "snapkv:ratio=0.5"), out_dir=str(tmp_path),
                      json_path=str(tmp_path / "r.json"), progress=False)
    recs = run(cfg, model=model, tokenizer=tok)
    assert len(recs) == 4
    for r in recs:
        for f in ("task", "method", "length", "sample", "correct", "score", "kv_cache_bytes", "peak_bytes",
                  "prefill_s", "decode_tok_s", "method_s", "kl", "top1_agree", "model", "seed", "decode_s"):
            assert f in r
    dense = [r for r in recs if r["method"] == "dense"]
    snap = [r for r in recs if r["method"] != "dense"]
    assert all(r["kl"] == 0.0 and r["top1_agree"] == 1.0 for r in dense)
    assert all(0.45 < s["kv_cache_bytes"] / d["kv_cache_bytes"] < 0.55 for s, d in zip(snap, dense))
    from longattn.bench.report import amdahl

    for s, d in zip(snap, dense):  # the contract's derived fields, against the dense record of the same sample
        assert s["sample"] == d["sample"] and s["dense_prefill_s"] == d["prefill_s"] and s["compile_s"] == 0.0
        assert s["prefill_x"] == pytest.approx(d["prefill_s"] / s["prefill_s"])
        assert s["decode_x"] == pytest.approx(s["decode_tok_s"] / d["decode_tok_s"])
        assert s["prefill_attention_share"] == pytest.approx(d["attn_prefill_s"] / d["prefill_s"])
        assert 0 < s["decode_attention_share"] < 1
        assert s["decode_amdahl_bound"] == pytest.approx(amdahl(s["decode_attention_share"],
                                                                s["kv_cache_bytes"] / s["plain_bytes"]))
        assert s["prefill_amdahl_bound"] == pytest.approx(1.0) and d["prefill_x"] == 1.0
    assert json.loads((tmp_path / "r.json").read_text()) == recs
    # resume after a crash that lost the last record and corrupted a line
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:2] + ["{not json"]) + "\n")
    warnings = []
    cfg.resume = True
    cfg.json_path = None
    recs2 = run(cfg, model=model, tokenizer=tok, log=warnings.append)
    assert any("corrupt" in w for w in warnings)
    key = lambda r: (r["method"], r["sample"])  # noqa: E731
    a = {key(r): (r["correct"], r["kv_cache_bytes"], r["prediction"]) for r in recs}
    b = {key(r): (r["correct"], r["kv_cache_bytes"], r["prediction"]) for r in recs2}
    assert a == b
    assert "dense" in bench_table(recs2)
    assert len(read_results(tmp_path / "results.jsonl", warn=lambda s: None)) == 4


@pytest.mark.model
def test_decode_steps_lengthen_the_timed_decode_not_the_answer(smollm2):
    model, tok = smollm2
    base = dict(lengths=(256,), samples=1, methods=("dense", "tova:ratio=0.5"), progress=False)
    short = run(BenchConfig(**base), model=model, tokenizer=tok)
    long = run(BenchConfig(**base, decode_steps=24), model=model, tokenizer=tok)
    for a, b in zip(short, long):
        assert a["method"] == b["method"] and a["prediction"] == b["prediction"] and a["kl"] == b["kl"]
        assert a["decode_steps"] < 24 == b["decode_steps"]
        assert b["decode_tok_s"] == pytest.approx(24 / b["decode_s"])
        assert b["kv_cache_bytes"] == a["kv_cache_bytes"] and b["kv_cache_bytes_end"] > a["kv_cache_bytes_end"]
        assert b["key"]["decode_steps"] == 24 and "decode_steps" not in a["key"]


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--decode-steps", "-1"],
        ["bench", "--methods", "nope"],
        ["bench", "--lengths", "-5"],
        ["bench", "--lengths", "abc"],
        ["bench", "--task", "nope"],
        ["bench", "--samples", "0"],
        ["bench", "--methods", ","],
        ["bench", "--resume"],
        ["ops-bench", "--patterns", "nope"],
        ["ops-bench", "--dtypes", "int8"],
        ["list", "--kind", "nope"],
        ["generate", "--prompt-file", "/nonexistent", "--recipe", "snapkv:ratio=2"],
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        raise SystemExit(cli.main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("longattn: error:")


def test_cli_list(capsys):
    assert cli.main(["list", "--kind", "kv"]) == 0
    out = capsys.readouterr().out
    assert "snapkv" in out and "arxiv.org/abs/2404.14469" in out


def test_report_renders_from_fixture(tmp_path, capsys):
    import shutil
    from pathlib import Path

    shutil.copy(Path(__file__).parent / "fixtures" / "results.jsonl", tmp_path / "results.jsonl")
    assert cli.main(["report", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "novelty:ratio=0.875" in out and "corrupt" in err
    html = (tmp_path / "report.html").read_text()
    assert "<img src=\"data:image/png;base64," in html and "snapkv:ratio=0.5" in html
    names = {p.name for p in tmp_path.glob("*.png")}
    assert "passkey_256_accuracy_vs_ratio.png" in names and "passkey_prefill_s_vs_length.png" in names


def test_family_and_ratio():
    from longattn.bench.plots import family_and_ratio

    assert family_and_ratio("snapkv:ratio=0.5:obs_window=32") == ("snapkv:obs_window=32", 0.5)
    assert family_and_ratio("sink_window+knorm:ratio=0.25") == ("sink_window+knorm", 0.25)
    assert family_and_ratio("dense") == ("dense", 0.0)


def _write(tmp_path, lines):
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


@pytest.mark.parametrize(
    "line,match",
    [
        ('{"context": "c", "question": "q"}', ":1: field 'answers' must be a non-empty list"),
        ('{"context": "", "question": "q", "answers": ["a"]}', ":1: field 'context' must be a non-empty string"),
        ('{"context": "c", "question": "q", "answers": ["a"], "foo": 1}', ":1: unknown field"),
        ("[1, 2]", ":1: expected a JSON object"),
        ("{broken", ":1: not valid JSON"),
        ('{"context": "c", "question": "q", "answers": ["a"], "turns": {}}', ":1: field 'turns' must be a list"),
        ('{"context": "c", "question": "q", "answers": ["a"], "turns": [{"question": "q2"}]}',
         r":1: turns\[0\]: field 'answers'"),
        ('{"context": "c", "question": "q", "answers": ["a"], "mode": "chat"}', ":1: field 'mode' must be one of"),
    ],
)
def test_custom_data_validation_names_line_and_field(tmp_path, line, match):
    from longattn.bench.tasks.custom import load_jsonl

    good = '{"context": "c", "question": "q", "answers": ["a"]}'
    with pytest.raises(ValueError, match=match):
        load_jsonl(_write(tmp_path, [line, good]))
    with pytest.raises(ValueError, match=match.replace(":1:", ":2:")):
        load_jsonl(_write(tmp_path, [good, line]))


def test_custom_scorers():
    from longattn.bench.tasks.base import Sample
    from longattn.bench.tasks.custom import Custom, rouge_l

    s = Sample("1", "c", "q", "", ["Paris"])
    assert rouge_l("the cat sat", "the cat sat") == 1.0 and rouge_l("a b", "c d") == 0.0

    class T(Custom):
        def __post_init__(self):
            pass

    assert T(scorer="contains").score(" It is paris.", s) == 1.0
    assert T(scorer="exact").score(" Paris. ", s) == 1.0 and T(scorer="exact").score("Paris is", s) == 0.0
    assert T(scorer="contains").score(" Pari", s) == 0.0
    with pytest.raises(ValueError, match="--scorer must be one of contains, exact, rouge"):
        Custom(data="x", scorer="bleu")


@pytest.mark.model
def test_custom_task_runs_on_the_model(smollm2, tmp_path):
    model, tok = smollm2
    ctx = "Alice lives in Paris. " + "The weather is mild. " * 30 + "Bob lives in Rome. "
    path = _write(tmp_path, [json.dumps({"context": ctx, "question": "Where does Bob live?",
                                         "answer_prefix": "Bob lives in", "answers": ["Rome"], "id": "bob"})])
    cfg = BenchConfig(tasks=("custom",), data=path, samples=3, methods=("dense", "tova:ratio=0.5"),
                      progress=False)
    recs = run(cfg, model=model, tokenizer=tok)
    # a custom record's length is its sample's token count (issue 13: it said 0); what was asked is target_length
    assert len(recs) == 2 and all(r["length"] == r["n_tokens"] > 100 and r["target_length"] == 0 for r in recs)
    assert recs[0]["correct"], recs[0]["prediction"]


def test_cli_custom_needs_data(capsys):
    assert cli.main(["bench", "--task", "custom"]) == 2
    assert "--task custom needs --data" in capsys.readouterr().err
    assert cli.main(["bench", "--data", "x.jsonl"]) == 2


@pytest.mark.parametrize("spec", ["niah", "niah:haystack=filler:keys=3"])
def test_niah_deterministic_depth_and_length(smollm2, spec):
    from longattn.api import parse_method

    _, tok = smollm2
    t = parse_method(spec, "task")
    a, b = t.make(tok, 768, 4, 0), t.make(tok, 768, 4, 0)
    assert a == b and a.meta["depth"] == 0.4
    assert t.make(tok, 768, 10, 0).meta["depth"] == 1.0
    needle = f"is: {a.answers[0]}."
    assert a.context.count(needle) == 1
    assert abs(a.context.index(needle) / len(a.context) - 0.4) < 0.15
    ctx, rest = encode(tok, a)
    assert 600 <= len(ctx) + len(rest) <= 768
    assert t.score(f" {a.answers[0]}.", a) == 1.0 and t.score(f" {a.answers[0][:-1]}", a) == 0.0
    if "keys=3" in spec:
        assert a.context.count("special magic number for") == 3


def test_niah_bad_arguments():
    from longattn.api import parse_method

    with pytest.raises(ValueError, match="haystack must be one of stdlib, filler"):
        parse_method("niah:haystack=web", "task")
    with pytest.raises(ValueError, match="keys must be an int in"):
        parse_method("niah:keys=0", "task")


@pytest.mark.model
def test_memory_cap_demo_a_capped_process_fails_dense_and_bad_input_is_named(smollm2, tmp_path, capsys):
    """benchmarks/memory_cap.py: with room to spare dense answers; with 1 MiB above the warmed-up process it
    cannot (the allocation error is reported, not a crash); a bad recipe exits 2 before any subprocess."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "memory_cap.py"
    spec = importlib.util.spec_from_file_location("memory_cap", path)
    mc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mc)
    out = tmp_path / "cap.json"
    assert mc.main(["--length", "256", "--cap-mib", "2000", "--recipes", "dense", "--json", str(out)]) == 0
    roomy = json.loads(out.read_text())["rows"][0]
    assert roomy["fits"] and roomy["correct"], roomy
    assert mc.main(["--length", "256", "--cap-mib", "1", "--recipes", "dense", "--json", str(out),
                    "--overwrite"]) == 0
    tight = json.loads(out.read_text())["rows"][0]
    assert not tight["fits"] and tight["error"]
    assert mc.main(["--recipes", "nosuch", "--json", str(tmp_path / "x.json")]) == 2
    assert "nosuch" in capsys.readouterr().err


def test_select_share_is_selection_per_token_over_a_dense_step_of_the_same_run():
    from longattn.bench.report import bench_table, select_share

    base = {"task": "passkey", "length": 1024, "sample": 0, "score": 1.0, "kv_cache_bytes": 1, "prefill_s": 1.0, "kl": 0.0,
            "top1_agree": 1.0}
    recs = [{**base, "run_id": "a", "method": "dense", "decode_tok_s": 10.0, "decode_s": 1.0},
            {**base, "run_id": "a", "method": "quest", "decode_tok_s": 8.0, "decode_s": 1.0, "select_decode_s": 0.16},
            {**base, "run_id": "b", "method": "quest", "decode_tok_s": 8.0, "decode_s": 1.0, "select_decode_s": 5.0}]
    share = select_share(recs)  # 0.16 s over 8 tokens = 0.02 s per token; dense's step 0.1 s; run b has no dense
    assert share == {("passkey", 1024, "quest"): pytest.approx(0.2)}
    assert "sel/step" in bench_table(recs).splitlines()[0]


def test_interleaved_decode_benchmark_pairs_rounds_and_bounds_each_method(tmp_path, capsys):
    """benchmarks/decode_interleaved.py on a tiny model: every method decodes the same number of steps from its
    own cache; a full-budget selector decodes dense's tokens (every step equal), a small budget attends a
    fraction of the cache (kept < 1, so a bound > 1 from dense's attention share); ratios are dense's median
    step over the method's; bad input exits 2 naming the argument; an existing file is not overwritten."""
    import importlib.util
    from pathlib import Path

    from longattn.models import tiny_model, tiny_tokenizer

    path = Path(__file__).parents[1] / "benchmarks" / "decode_interleaved.py"
    spec = importlib.util.spec_from_file_location("decode_interleaved", path)
    di = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(di)
    m, tok = tiny_model("llama", num_hidden_layers=2), tiny_tokenizer()
    res = di.run(m, tok, ["dense", "landmark:budget=4096", "landmark:budget=32:block_size=16"], 300, 5,
                 progress=False)
    d, full, small = (res["methods"][k] for k in ("dense", "landmark:budget=4096", "landmark:budget=32:block_size=16"))
    assert d["decode_x"] == 1.0 and d["kept"] == 1.0 and d["amdahl_bound"] == pytest.approx(1.0)
    assert full["tokens_equal_to_dense"] == 5 and full["kept"] == pytest.approx(1.0)
    assert 0 < small["kept"] < 0.5 and small["amdahl_bound"] > 1.0 and 0 < res["dense_attention_share"] < 1
    assert small["decode_x"] == pytest.approx(d["ms_per_step"] / small["ms_per_step"])
    assert small["x_p10"] <= small["x_paired_median"] <= small["x_p90"]
    out = tmp_path / "d.json"
    out.write_text("{}")
    assert di.main(["--methods", "landmark,dense", "--json", str(tmp_path / "x.json")]) == 2
    assert "--methods must start with dense" in capsys.readouterr().err
    assert di.main(["--methods", "dense,nosuch", "--json", str(tmp_path / "x.json")]) == 2
    assert "nosuch" in capsys.readouterr().err
    assert di.main(["--json", str(out)]) == 2 and out.read_text() == "{}"
    assert "exists" in capsys.readouterr().err
