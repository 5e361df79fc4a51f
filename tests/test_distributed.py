"""Sequence-parallel attention on gloo (2 and 4 local processes) against the single-process reference, and
linear attention against its quadratic and recurrent references."""

import sys

import pytest
import torch

import _dist_workers as W
from longattn import cli
from longattn.distributed.blocks import pair_work, rank_ranges, shard, split_lengths, unshard
from longattn.distributed.launch import spawn
from longattn.ops.linear import (
    chunk_state,
    lightning_attention,
    linear_attention_naive,
    linear_attention_recurrent,
    linear_decode_step,
)

TOL = 1e-5


def _ok(results):
    for r in results:
        assert r["ok"], f"rank {r['rank']}: {r.get('error')}\n{r.get('traceback', '')}"
    return [r["result"] for r in results]


@pytest.fixture(scope="module", params=[2, 4])
def methods(request):
    p = request.param
    n = 37
    lengths = [11, 26] if p == 2 else [3, 11, 9, 14]
    return p, _ok(spawn(W.check_methods, p, (n, lengths), timeout_s=60))


EXPECTED = {  # collectives per call: forward, backward (lengths given)
    "ring": (lambda p: {"send": p - 1}, lambda p: {"send": p}),
    "allgather": (lambda p: {"all_gather": 1}, lambda p: {"reduce_scatter": 1}),
    "ulysses": (lambda p: {"all_to_all": 2}, lambda p: {"all_to_all": 2}),
}


def test_every_method_equals_the_reference_with_gradients(methods):
    p, per_rank = methods
    for rank, res in enumerate(per_rank):
        for case, m in res.items():
            if case == "ring/exchange":
                continue
            for key in ("out", "lse", "dq", "dk", "dv"):
                if m[key] is not None:
                    assert m[key] < TOL, f"P={p} rank {rank} {case}: {key} off by {m[key]:.2e}"


def test_collectives_per_call_are_what_the_algorithm_says(methods):
    p, per_rank = methods
    for res in per_rank:
        for case, m in res.items():
            if case == "ring/exchange":
                assert m == {"send": p - 1, "lengths": 1}
                continue
            fwd, bwd = EXPECTED[case.split("/")[0]]
            assert m["fwd"] == fwd(p), case
            assert m["bwd"] == bwd(p), case


@pytest.mark.parametrize("world", [2, 4])
def test_decode_lasp2_and_hybrid_equal_references(world):
    for rank, res in enumerate(_ok(spawn(W.check_decode_and_linear, world, timeout_s=60))):
        assert res["dist_decode"]["out"] < TOL and res["dist_decode"]["lse"] < TOL
        assert res["dist_decode"]["calls"] == {"all_gather": 1}
        for key in ("out", "dq", "dk", "dv"):
            assert res["lasp2"][key] < 1e-4, (rank, key, res["lasp2"][key])
        assert res["lasp2"]["fwd"] == {"all_gather": 1} and res["lasp2"]["bwd"] == {"all_reduce": 1}
        assert res["lasp2h"]["out"] < 1e-4


@pytest.mark.parametrize("mode,timeout", [("die", 20), ("hang", 3)])
def test_a_lost_rank_fails_the_others_clearly_within_the_timeout(mode, timeout):
    res = spawn(W.die_or_hang, 2, (mode,), timeout_s=timeout, startup_s=20)
    assert not res[1]["ok"]  # died, or killed by the launcher while hanging
    r0 = res[0]
    assert r0["ok"], r0.get("error")
    err = r0["result"]["error"]
    assert err is not None and "PeerLostError: ring_attention: rank 0 lost contact with its peers" in err
    assert r0["result"]["elapsed"] < timeout + 5


@pytest.mark.parametrize("slow", [1, 0], ids=["slow_rank_1", "slow_rank_0_hosting_the_store"])
def test_shutdown_waits_until_every_rank_has_finished(slow):
    res = _ok(spawn(W.shutdown_waits_for_the_slowest, 2, (slow,), timeout_s=30))
    fast = res[1 - slow]
    assert fast["after"] >= res[slow]["before"] and not any(r["initialised"] for r in res)


# ---- single process ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 4, 8])
def test_zigzag_balances_causal_work(world):
    n = 4096
    sizes = split_lengths(n, 2 * world)
    zig = [pair_work(rr, [x for r2 in rank_ranges([sizes[i] + sizes[2 * world - 1 - i] for i in range(world)],
                                                  "zigzag") for x in r2], True)
           for rr in rank_ranges([sizes[i] + sizes[2 * world - 1 - i] for i in range(world)], "zigzag")]
    cont_r = rank_ranges(split_lengths(n, world), "contiguous")
    cont = [pair_work(rr, [x for r2 in cont_r for x in r2], True) for rr in cont_r]
    assert max(zig) / min(zig) < 1.01
    assert max(cont) / min(cont) > 2 * world - 2
    assert sum(zig) == sum(cont) == n * (n + 1) // 2


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_shard_unshard_roundtrip(layout):
    x = torch.arange(2 * 37).view(1, 2, 37, 1)
    parts = [shard(x, layout, 3, r) for r in range(3)]
    assert torch.equal(unshard(parts, layout), x)
    with pytest.raises(ValueError, match="layout must be one of contiguous, zigzag"):
        shard(x, "ring", 3, 0)
    with pytest.raises(ValueError, match="zigzag: rank 0 holds 5 tokens"):
        rank_ranges([5, 5, 27], "zigzag")


def test_methods_refuse_without_a_process_group():
    from longattn.distributed import ring_attention

    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        ring_attention(q, q, q, lengths=[4])


@pytest.mark.parametrize("block", [16, 33, 64, 128, 256])
@pytest.mark.parametrize("n", [1, 50, 300])
def test_lightning_equals_naive_and_recurrent(block, n):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, n, 8, generator=g)
    k, v = torch.randn(2, 2, n, 8, generator=g), torch.randn(2, 2, n, 6, generator=g)
    lam = torch.tensor([0.9, 0.99, 1.0, 0.7])
    ref = linear_attention_naive(q, k, v, decay=lam)
    out, state = lightning_attention(q, k, v, decay=lam, block_size=block, return_state=True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    rec, rstate = linear_attention_recurrent(q, k, v, decay=lam)
    torch.testing.assert_close(rec, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state, rstate, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(chunk_state(k, v, decay=lam, q_heads=4), state, rtol=1e-4, atol=1e-4)


def test_lightning_gradients_equal_naive():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 70, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    w = torch.randn(1, 2, 70, 8, generator=g, dtype=torch.float64)
    grads = []
    for fn in (lambda: linear_attention_naive(q, k, v, decay=0.95),
               lambda: lightning_attention(q, k, v, decay=0.95, block_size=16)):
        q.grad = k.grad = v.grad = None
        (fn() * w).sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_decode_step_continues_the_chunked_prefill():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=g) for _ in range(3))
    lam = torch.tensor([0.9, 0.98])
    ref = linear_attention_naive(q, k, v, decay=lam)
    out, state = lightning_attention(q[:, :, :33], k[:, :, :33], v[:, :, :33], decay=lam, block_size=16,
                                     return_state=True)
    steps = []
    for t in range(33, 40):
        o, state = linear_decode_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state, decay=lam)
        steps.append(o)
    torch.testing.assert_close(torch.cat([out] + steps, 2), ref, rtol=1e-5, atol=1e-5)


def test_non_causal_and_cross_forms():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 20, 8, generator=g)
    k, v = torch.randn(1, 2, 50, 8, generator=g), torch.randn(1, 2, 50, 4, generator=g)
    ref = linear_attention_naive(q, k, v, causal=False)
    torch.testing.assert_close(lightning_attention(q, k, v, causal=False), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref, q @ (k.transpose(-1, -2) @ v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(decay=1.5), r"decay: every value must be in \(0, 1\]"),
    (dict(decay=0.9, causal=False), "decay: only the causal form"),
    (dict(block_size=0), "block_size must be an int >= 1"),
    (dict(decay=torch.ones(3)), r"decay: expected a float or a \[2\] tensor"),
])
def test_linear_bad_arguments(kwargs, match):
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match=match):
        lightning_attention(q, q, q, **kwargs)


def test_dist_bench_runs_and_checks_its_output(capsys, tmp_path):
    import json

    from longattn import cli

    assert cli.main(["dist-bench", "--nproc", "2", "--method", "zigzag", "--seq", "96", "--repeats", "1",
                     "--heads", "4", "--kv-heads", "2", "--dim", "8", "--json", str(tmp_path / "d.json")]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[2:]]
    assert len(rows) == 2 and all(r[0] == "zigzag" for r in rows)
    assert float(rows[0][-1]) < 1e-5  # max error of the gathered output vs the single process
    recs = json.loads((tmp_path / "d.json").read_text())  # each record names the machine it ran on
    assert len(recs) == 2 and all(r["cpu"] and r["isa"] and r["versions"]["torch"] == torch.__version__ for r in recs)
    assert all(r["kernel_isa"] == torch.backends.cpu.get_cpu_capability() and r["threads"] == 1 for r in recs)


@pytest.mark.parametrize("argv", [
    ["dist-bench", "--nproc", "0", "--method", "ring", "--seq", "64"],
    ["dist-bench", "--nproc", "2", "--method", "ulysses", "--seq", "64", "--heads", "3", "--kv-heads", "1"],
    ["dist-bench", "--nproc", "2", "--method", "ring", "--seq", "64", "--kernel", "cuda"],
    ["dist-bench", "--nproc", "2", "--method", "ring", "--seq", "64", "--kv-heads", "3"],
])
def test_dist_bench_bad_arguments_exit_2(argv, capsys):
    from longattn import cli

    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("longattn: error:")


def test_linear_ops_bench_records_and_skips():
    from longattn.bench.linear_ops import LinearBenchConfig, linear_table, run_linear_ops

    recs = run_linear_ops(LinearBenchConfig(lengths=(64, 256), heads=2, dim=8, repeats=1, naive_max=64,
                                            softmax_max=256, progress=False))
    by = {(r["pattern"], r["N"]): r for r in recs}
    assert by[("naive", 256)]["ms"] is None and by[("naive", 64)]["ms"] > 0
    assert by[("lightning", 256)]["us_per_token"] == pytest.approx(by[("lightning", 256)]["ms"] * 1e3 / 256)
    assert "skipped" in linear_table(recs)
    contract = ("op", "pattern", "N", "dtype", "heads", "dim", "density", "recall", "backend", "est_ms", "kernel_ms",
                "ms", "dense_ms", "speedup")
    assert all(set(contract) <= set(r) for r in recs)


def test_ops_bench_linear_and_decode_together_is_refused(capsys):
    from longattn import cli

    assert cli.main(["ops-bench", "--linear", "--decode"]) == 2
    assert "choose one" in capsys.readouterr().err
    assert cli.main(["ops-bench", "--cab", "--linear"]) == 2


@pytest.mark.parametrize("method", ["dist_decode", "lasp2", "ulysses"])
def test_dist_bench_other_methods(method):
    from longattn.distributed.bench import DistBenchConfig, run_dist_bench

    recs = run_dist_bench(DistBenchConfig(method=method, nproc=2, seq=64, heads=4, kv_heads=2, dim=8, repeats=1),
                          log=lambda s: None)
    assert len(recs) == 2 and recs[0]["max_err"] < 1e-4 and recs[0]["bytes_sent"] > 0


@pytest.mark.parametrize("world", [2, 4])
def test_sparse_block_layout_runs_sequence_parallel(world):
    for rank, res in enumerate(_ok(spawn(W.check_sparse, world, timeout_s=60))):
        assert "block_size 16 must divide" in res.pop("misaligned")
        for case, m in res.items():
            for key, err in m.items():
                assert err < TOL, f"P={world} rank {rank} {case}: {key} off by {err:.2e}"


# ---- a real model's prefill split across processes (generate --dist) -----------------------------------------
def _one_process(arch, ids, new):
    """The reference: the same tiny model in one process, transformers' own attention, greedy."""
    from longattn.hf import layer_kinds
    from longattn.models import tiny_model

    m = tiny_model(arch, seed=0)
    x = torch.tensor([ids])
    with torch.no_grad():
        out = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    cfg = m.config
    per_layer_token = 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    return out.sequences[0, len(ids):].tolist(), torch.stack([lg[0].float() for lg in out.logits]), \
        (per_layer_token, layer_kinds(m))


# sliding windows (gemma3_text, mistral-window: 16 and 64 tokens), sink logits and MoE (gpt_oss), q/k norms (qwen3)
SP_ARCHS = ("llama", "qwen3", "gemma3_text", "mistral-window", "gpt_oss")


@pytest.mark.parametrize("world", [2, 3], ids=["2-ranks", "3-ranks"])
def test_sequence_parallel_prefill_decodes_what_one_process_decodes(world):
    ids = torch.randint(4, 128, (37,), generator=torch.Generator().manual_seed(1)).tolist()  # 37: no even split
    new = 6
    modes = ("ring", "zigzag", "ulysses") if world == 2 else ("ring", "zigzag")  # 4 heads: ulysses needs P | 4
    cases = [(arch, mode) for arch in SP_ARCHS for mode in modes if not (mode == "ulysses" and arch == "gpt_oss")]
    results = _ok(spawn(W.sp_model_generate, world, (cases, ids, new), timeout_s=180))
    for arch in SP_ARCHS:
        tokens, logits, (per_token, kinds) = _one_process(arch, ids, new)
        for mode in modes:
            if (arch, mode) not in cases:
                continue
            got = [r[(arch, mode)] for r in results]
            for rank, g in enumerate(got):
                assert g["tokens"] == tokens, (arch, mode, rank)
                assert torch.allclose(g["logits"], logits, atol=1e-4), (arch, mode, rank)
                # full layers: this rank's shard of the prompt (plus the decoded tokens fed back), not the whole
                # cache; sliding layers: the window on every rank, as one process holds it (the last window - 1
                # tokens, a view of the window-token storage the last step's concatenation made)
                held = sum(g["lengths"][rank] + new - 1 if kind == "full_attention" else min(window, len(ids) + new - 1)
                           for kind, window in kinds)
                assert g["cache_bytes"] == held * per_token, (arch, mode, rank)
            assert sum(got[0]["lengths"]) == len(ids) and max(got[0]["lengths"]) <= len(ids) // world + 2


def test_sequence_parallel_prefill_refuses_what_it_cannot_run_exactly():
    from longattn.distributed.model import check_model, local_lengths
    from longattn.models import tiny_model

    with pytest.raises(ValueError, match="caps its attention logits"):
        check_model(tiny_model("gemma2"), "ring", 2)
    with pytest.raises(ValueError, match="sink logits, which need the merged log-sum-exp"):
        check_model(tiny_model("gpt_oss"), "ulysses", 2)
    with pytest.raises(ValueError, match="query heads are not divisible by 3 ranks"):
        check_model(tiny_model("llama"), "ulysses", 3)
    with pytest.raises(ValueError, match="--dist must be one of ring, zigzag, ulysses"):
        check_model(tiny_model("llama"), "allgather", 2)
    with pytest.raises(ValueError, match="cannot be cut into 4 chunks"):
        local_lengths(3, "zigzag", 2)
    assert local_lengths(37, "zigzag", 2) == [19, 18] and local_lengths(37, "ring", 3) == [13, 12, 12]


@pytest.mark.parametrize("argv,match", [
    (["--dist", "ring"], "run under torchrun"),
    (["--dist", "ring", "--recipe", "snapkv"], "runs dense attention"),
    (["--dist", "ring", "--dist-backend", "deepspeed"], "only with --dist ulysses"),
    (["--dist", "mesh"], "invalid choice"),
])
def test_generate_dist_bad_arguments_exit_2(argv, match, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello")
    try:
        rc = cli.main(["generate", "--prompt-file", str(prompt), *argv])
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]


def test_generate_dist_under_torchrun_prints_what_one_process_prints(tmp_path):
    import subprocess
    import sys

    from longattn.distributed.launch import free_port
    from longattn.models import tiny_model, tiny_tokenizer

    tiny_model("llama").save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    prompt = tmp_path / "p.txt"
    prompt.write_text("The quick brown fox jumps over the lazy dog, again and again.")
    args = ["generate", "--model", str(tmp_path / "m"), "--prompt-file", str(prompt), "--max-new-tokens", "8"]
    one = subprocess.run([sys.executable, "-m", "longattn.cli", *args], capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          f"--master-port={free_port()}", "-m", "longattn.cli", *args, "--dist", "zigzag"],
                         capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, _why(two.stderr)
    assert two.stdout == one.stdout and one.stdout.strip()
    line = [ln for ln in two.stderr.splitlines() if ln.startswith("[longattn] dist=zigzag ranks=2")]
    assert len(line) == 1 and "local_tokens=" in line[0] and "kv_cache_bytes_per_rank=" in line[0]


def _why(stderr: str) -> str:
    """What a failed torchrun said: the ranks' own error lines (torchrun's summary at the end hides them)."""
    keys = ("Error", "error:", "terminate", "what()", "Fatal", "Traceback", "[rank")
    said = [ln for ln in stderr.splitlines() if any(k in ln for k in keys) and "elastic" not in ln]
    return "\n".join(said[:40])[:3000] + "\n--- tail ---\n" + stderr[-1500:]


def _torchrun(args, nproc=2, timeout=240):
    import subprocess

    from longattn.distributed.launch import free_port

    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                           f"--master-port={free_port()}", "-m", "longattn.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_bench_dist_rows_beside_dense_in_one_run_and_resume(tmp_path):
    """``bench --dist zigzag`` under torchrun: per sample a dense row (one process) and a dist row that answers
    the same, matches dense's logits, holds a share of the cache per rank that sums to the whole prompt's, and
    is written once by rank 0; ``--resume`` recomputes nothing; an existing --out is refused on every rank."""
    import json

    from longattn.models import tiny_model, tiny_tokenizer

    tiny_model("llama").save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    out = tmp_path / "runs"
    args = ["bench", "--model", str(tmp_path / "m"), "--task", "passkey", "--lengths", "200", "--samples", "2",
            "--dist", "zigzag", "--out", str(out)]
    run = _torchrun(args)
    assert run.returncode == 0, _why(run.stderr)
    lines = (out / "results.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert sorted((r["method"], r["sample"]) for r in recs) == [("dense", 0), ("dense", 1),
                                                               ("dist:zigzag:nproc=2", 0), ("dist:zigzag:nproc=2", 1)]
    for i in (0, 1):
        d = next(r for r in recs if r["method"] == "dense" and r["sample"] == i)
        p = next(r for r in recs if r["method"] != "dense" and r["sample"] == i)
        assert p["prediction"] == d["prediction"] and p["dist"]["same_answer"]
        assert p["kl"] < 1e-6 and p["top1_agree"] == 1.0 and p["dist"]["fidelity_tokens"] >= 1
        assert p["threads"] * 2 == d["threads"]
        per = p["dist"]["kv_cache_bytes_per_rank"]
        assert len(per) == 2 and sum(per) == p["plain_bytes"] and p["kv_cache_bytes"] == max(per)
        assert sum(p["dist"]["lengths"]) == p["n_tokens"] == d["n_tokens"]
        assert p["prefill_s"] == max(p["dist"]["prefill_s_per_rank"])
    assert "dist:zigzag:nproc=2" in (out / "table.txt").read_text()
    again = _torchrun(args + ["--resume"])
    assert again.returncode == 0, _why(again.stderr)
    assert (out / "results.jsonl").read_text().splitlines() == lines
    refused = _torchrun(args)
    assert refused.returncode != 0
    said = [ln for ln in refused.stderr.splitlines() if ln.startswith("longattn: error:")]
    assert len(said) == 1 and "already holds 4 records" in said[0], refused.stderr[-3000:]
    assert (out / "results.jsonl").read_text().splitlines() == lines


@pytest.mark.parametrize("argv,match", [
    (["--dist", "ring"], "--dist ring: run under torchrun"),
    (["--dist-backend", "deepspeed"], "--dist-backend: only with --dist ulysses"),
    (["--dist", "mesh"], "invalid choice"),
])
def test_bench_dist_bad_arguments_exit_2(argv, match, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    try:
        rc = cli.main(["bench", *argv])
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]


@pytest.mark.parametrize("kw,match", [
    ({"methods": ("dense", "snapkv:ratio=0.5")}, "--methods must be dense (got snapkv:ratio=0.5)"),
    ({"tasks": ("shared_context",)}, "runs the shared_context protocol"),
    ({"peer": "kvpress"}, "--peer kvpress runs in one process"),
])
def test_bench_dist_refuses_what_it_does_not_run(kw, match):
    import re

    from longattn.bench.dist_runner import _check
    from longattn.bench.runner import BenchConfig

    with pytest.raises(ValueError, match=re.escape(match)):
        _check(BenchConfig(**{"methods": ("dense",), **kw}), "zigzag", "torch")
    with pytest.raises(ValueError, match="only with --dist ulysses"):
        _check(BenchConfig(methods=("dense",)), "ring", "deepspeed")
    _check(BenchConfig(methods=("dense",), tasks=("passkey", "niah")), "ulysses", "deepspeed")  # allowed


def test_ulysses_through_deepspeed_equals_ours_and_the_reference():
    pytest.importorskip("deepspeed", reason="deepspeed not installed (the optional Ulysses backend)")
    for rank, res in enumerate(_ok(spawn(W.check_deepspeed, 2, timeout_s=120, startup_s=120))):
        for backend in ("torch", "deepspeed"):
            for name in ("out", "dq", "dk", "dv"):
                assert res[backend][name] < 1e-5, (rank, backend, name, res[backend][name])
        assert torch.allclose(res["torch"]["out_tensor"], res["deepspeed"]["out_tensor"], atol=1e-6)
        tokens, logits, _ = _one_process("llama", torch.randint(4, 128, (36,), generator=torch.Generator().manual_seed(1))
                                         .tolist(), 4)  # generate --dist ulysses --dist-backend deepspeed
        assert res["model"]["tokens"] == tokens and torch.allclose(res["model"]["logits"], logits, atol=1e-4)


def test_ulysses_deepspeed_without_deepspeed_is_one_clear_line(capsys):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    assert cli.main(["dist-bench", "--nproc", "2", "--method", "ulysses_deepspeed", "--seq", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the deepspeed package" in err[0] and "allowed without it: ring" in err[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_ranks_die_with_the_process_that_launched_them(tmp_path):
    """A killed caller (a bench stopped with kill) must not leave its ranks computing."""
    import os
    import signal
    import subprocess
    import time

    code = ("import sys; sys.path.insert(0, 'tests'); import _dist_workers as W; "
            "from longattn.distributed.launch import spawn; "
            f"spawn(W.report_pid_and_sleep, 2, ({str(tmp_path)!r},), timeout_s=300)")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("rank*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = [int(p.read_text()) for p in tmp_path.glob("rank*")]
        assert len(pids) == 2
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()

    def alive(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its reaper is dead
            return f.read().split()[2] != "Z"

    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)
