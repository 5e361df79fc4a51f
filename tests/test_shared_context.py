"""shared_context: one prefill per sample, multi-turn history, multi-request isolation, per-turn scores."""

import json

import pytest

from longattn.api import parse_method
from longattn.bench import decoding
from longattn.bench.protocols import run_qa, run_turns
from longattn.bench.runner import BenchConfig, followup_ids, run


def test_generator_deterministic_and_scorer(smollm2):
    _, tok = smollm2
    t = parse_method("shared_context:queries=3", "task")
    a, b = t.make(tok, 512, 1, 0), t.make(tok, 512, 1, 0)
    assert a == b and len(a.turns) == 2 and a.mode == "multi_turn"
    qs = a.queries()
    assert len({ans[0] for _, _, ans in qs}) == 3
    for q, prefix, ans in qs:
        assert a.context.count(f"is: {ans[0]}.") == 1 and q.split(" for ")[1].split("?")[0] in prefix
        assert t.score(f" {ans[0]}.", a.__class__(**{**a.__dict__, "answers": ans})) == 1.0
        assert t.score(f" {ans[0][:-1]}", a.__class__(**{**a.__dict__, "answers": ans})) == 0.0
    with pytest.raises(ValueError, match="mode must be one of multi_turn, multi_request"):
        parse_method("shared_context:mode=chat", "task")
    with pytest.raises(ValueError, match="queries must be an int in"):
        parse_method("shared_context:queries=1", "task")


def test_followup_continues_the_chat_template(smollm2):
    _, tok = smollm2
    s = parse_method("shared_context:queries=2", "task").make(tok, 256, 0, 0)
    ids = followup_ids(tok, s, [(s.question, s.answer_prefix + " 123")], "Next?", "It is")
    text = tok.decode(ids)
    assert text.startswith("<|im_end|>") and "<|im_start|>user\nNext?<|im_end|>" in text and text.endswith("It is")


@pytest.mark.model
@pytest.mark.parametrize("mode", ["multi_turn", "multi_request"])
def test_one_prefill_per_sample_and_scores_per_turn(smollm2, mode, monkeypatch):
    model, tok = smollm2
    calls = []
    real = decoding.prefill
    monkeypatch.setattr(decoding, "prefill", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = BenchConfig(tasks=(f"shared_context:queries=3:mode={mode}",), lengths=(512,), samples=1,
                      methods=("dense", "snapkv:ratio=0.5", "quest:budget=64:page=16"), progress=False)
    recs = run(cfg, model=model, tokenizer=tok)
    assert len(calls) == 3  # one prefill per (sample, method): dense (the reference) and the two methods
    for r in recs:
        assert r["mode"] == mode and len(r["turn_scores"]) == 3
        assert r["score"] == pytest.approx(sum(r["turn_scores"]) / 3)
    from longattn.bench.report import bench_table

    assert "accuracy per turn" in bench_table(recs) and "turn 3" in bench_table(recs)
    dense = [r for r in recs if r["method"] == "dense"][0]
    assert dense["kl"] == 0.0 and dense["top1_agree"] == 1.0
    assert all(r["kl"] >= 0 for r in recs)


@pytest.mark.model
def test_multi_request_turns_equal_each_query_alone(smollm2):
    """Nothing leaks between requests: each turn answers exactly as the same query asked alone."""
    model, tok = smollm2
    t = parse_method("shared_context:queries=3:mode=multi_request", "task")
    s = t.make(tok, 512, 2, 0)
    res = run_turns(model, tok, "snapkv:ratio=0.5", s, 12, None)
    for pred, (q, prefix, ans) in zip(res["turn_predictions"], s.queries()):
        alone = s.__class__(s.id, s.context, q, prefix, ans)
        assert run_qa(model, tok, "snapkv:ratio=0.5", alone, 12, None)["prediction"] == pred


@pytest.mark.model
def test_custom_turns_run(smollm2, tmp_path):
    model, tok = smollm2
    ctx = "Alice lives in Paris. " + "The weather is mild. " * 20 + "Bob lives in Rome. "
    line = {"context": ctx, "question": "Where does Bob live?", "answer_prefix": "Bob lives in", "answers": ["Rome"],
            "turns": [{"question": "Where does Alice live?", "answer_prefix": "Alice lives in", "answers": ["Paris"]}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(line) + "\n")
    recs = run(BenchConfig(tasks=("custom",), data=str(path), methods=("dense",), progress=False), model=model,
               tokenizer=tok)
    assert len(recs) == 1 and len(recs[0]["turn_scores"]) == 2 and recs[0]["mode"] == "multi_turn"


@pytest.mark.model
def test_perplexity_task_records_nll_and_fidelity(smollm2, tmp_path):
    from longattn.bench.report import bench_table

    model, tok = smollm2
    cfg = BenchConfig(tasks=("perplexity:eval_tokens=32",), lengths=(256,), samples=1,
                      methods=("dense", "streaming_llm:ratio=0.5", "quest:budget=32:page=16:dense_layers="),
                      out_dir=str(tmp_path), progress=False)
    recs = run(cfg, model=model, tokenizer=tok)
    by = {r["method"]: r for r in recs}
    assert by["dense"]["kl"] == 0.0 and 1.0 < by["dense"]["ppl"] < 1000
    assert by["dense"]["ppl"] == pytest.approx(2.718281828 ** by["dense"]["nll"], rel=1e-5)
    assert by["dense"]["score"] is None and by["dense"]["correct"] is None
    # dense perplexity equals a plain forward over the whole text
    import torch

    ids = tok(parse_method("perplexity:eval_tokens=32", "task").make(tok, 256, 0, 0).context,
              add_special_tokens=False)["input_ids"][:256]
    ids = torch.tensor([[tok.bos_token_id] + ids[:-1]])
    with torch.no_grad():
        logits = model(ids).logits[0, -33:-1]
    nll = float(torch.nn.functional.cross_entropy(logits, ids[0, -32:]))
    assert by["dense"]["nll"] == pytest.approx(nll, abs=1e-4)
    assert by["streaming_llm:ratio=0.5"]["kl"] > 0 and by["quest:budget=32:page=16:dense_layers="]["kl"] > 0
    assert "perplexity (teacher-forced" in bench_table(recs)
    from longattn.bench.report import render_dir

    assert "perplexity" in render_dir(recs, tmp_path)
    assert (tmp_path / "report.html").exists()
