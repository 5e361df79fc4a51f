"""``bench --decode-rounds``: interleaved decode timing rounds paired against dense (``bench/interleave.py``)."""

from __future__ import annotations

import pytest
import torch

from longattn.bench import decoding
from longattn.bench.interleave import percentile, step_rounds, summarize
from longattn.bench.report import bench_table, rounds_ratio
from longattn.bench.runner import BenchConfig, run
from longattn.models import tiny_model, tiny_tokenizer


def test_rounds_rotate_the_order_and_feed_each_cache_one_token_per_round(monkeypatch):
    """Round r starts at the r-th method (drift lands on every method within a round); every cache grows by one
    token per round; the token fed next is the previous step's greedy choice."""
    from transformers import DynamicCache

    m = tiny_model("llama", num_hidden_layers=2)
    order, real = [], decoding.forward

    def spy(model, ids, cache, kw, last=False):
        order.append(next(n for n, st in states.items() if st["cache"] is cache))
        return real(model, ids, cache, kw, last=last)

    states = {}
    ids = torch.randint(4, 90, (1, 50))
    for name in ("dense", "landmark:budget=32:block_size=16", "snapkv:ratio=0.5"):
        cache = DynamicCache(config=m.config)
        from longattn import api

        with torch.no_grad(), api.apply(m, name) as s:
            logits = decoding.forward(m, ids, cache, s.cache_kwarg, last=True)[0, -1]
        states[name] = {"recipe": name, "cache": cache, "tok": int(logits.argmax())}
    before = {n: st["cache"].get_seq_length() for n, st in states.items()}
    monkeypatch.setattr(decoding, "forward", spy)
    raw = step_rounds(m, states, 4, compress=False)
    names = list(states)
    assert order == [names[(r + j) % 3] for r in range(4) for j in range(3)]
    for n, st in states.items():
        assert st["cache"].get_seq_length() == before[n] + 4 and len(raw[n]["ms"]) == 4
    assert raw["landmark:budget=32:block_size=16"]["possible"] > raw["landmark:budget=32:block_size=16"]["selected"] > 0
    share, out = summarize(raw, "dense")
    d = out["dense"]
    assert d["decode_x"] == 1.0 and d["kept"] == 1.0 and 0 < share < 1
    for n, o in out.items():
        per_round = sorted(a / b for a, b in zip(raw["dense"]["ms"], raw[n]["ms"]))
        assert o["x_p10"] == per_round[0] and o["x_p90"] == per_round[-1]  # 4 rounds: nearest ranks 0 and 3
        mid = lambda xs: sum(sorted(xs)[1:3]) / 2  # noqa: E731 - the median of 4 values
        assert o["decode_x"] == pytest.approx(mid(raw["dense"]["ms"]) / mid(raw[n]["ms"]))


def test_percentile_is_the_nearest_rank():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert [percentile(xs, p) for p in (0, 0.1, 0.5, 0.9, 1)] == [1.0, 1.0, 3.0, 5.0, 5.0]


def test_rounds_ratio_sums_each_samples_dense_step_over_the_methods():
    recs = [{"task": "passkey", "length": 256, "method": "quest", "decode_x_rounds": x, "decode_step_ms": ms,
             "decode_x_p10": lo, "decode_x_p90": hi} for x, ms, lo, hi in ((2.0, 10.0, 1.5, 2.5), (1.0, 30.0, 0.8, 1.2))]
    x, (lo, hi) = rounds_ratio(recs)[("passkey", 256, "quest")]
    assert x == pytest.approx((2.0 * 10 + 1.0 * 30) / 40) and (lo, hi) == (0.8, 2.5)


def test_bench_decode_rounds_time_every_method_paired_against_dense(tmp_path):
    m, tok = tiny_model("llama", num_hidden_layers=2), tiny_tokenizer()
    cfg = BenchConfig(model="tiny", lengths=(256,), samples=2, decode_rounds=3, progress=False, out_dir=str(tmp_path),
                      methods=("dense", "snapkv:ratio=0.5", "landmark:budget=64:block_size=16"))
    recs = run(cfg, model=m, tokenizer=tok)
    assert len(recs) == 6
    for r in recs:
        assert r["decode_rounds"] == 3 and r["decode_step_ms"] > 0 and r["key"]["decode_rounds"] == 3
        assert r["decode_x_p10"] <= r["decode_x_p90"] and 0 < r["decode_attention_share_rounds"] < 1
        if r["method"] == "dense":
            assert r["decode_x_rounds"] == 1.0
    table = bench_table(recs)
    assert "decode x" in table.splitlines()[0]
    again = run(BenchConfig(**{**cfg.__dict__, "resume": True}), model=m, tokenizer=tok)
    assert [r["run_id"] for r in again] == [r["run_id"] for r in recs]  # resumed: nothing re-run
    with pytest.raises(ValueError, match="--decode-rounds must be an integer >= 0"):
        BenchConfig(decode_rounds=-1).validate()


def test_decode_rounds_say_once_which_tasks_they_leave_out(tmp_path):
    """A multi-turn task has no single-question decode to pair: its rows go without rounds, and the run says so
    in one line instead of skipping silently."""
    m, tok = tiny_model("llama", num_hidden_layers=2), tiny_tokenizer()
    said: list[str] = []
    cfg = BenchConfig(model="tiny", tasks=("shared_context", "passkey"), lengths=(256,), samples=1, decode_rounds=2,
                      progress=False, out_dir=str(tmp_path), methods=("dense",))
    recs = run(cfg, model=m, tokenizer=tok, log=said.append)
    assert [s for s in said if s.startswith("--decode-rounds")] == [
        "--decode-rounds: tasks that are not single-question (qa), their rows have no decode rounds: shared_context"]
    assert {r["task"]: r.get("decode_rounds") for r in recs} == {"shared_context": None, "passkey": 2}
