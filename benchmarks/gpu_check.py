"""The GPU check: longattn's kernels and methods on a CUDA device, as is (the torch already installed there; no
install step, no network, no model files: tiny random configs and random tensors only).

1. op tests on CUDA: every prefill pattern's example layout through each backend that can run there (flex,
   gather, dense) against ``reference.attention`` under the pattern's mask; split-K and gathered decode
   attention against the reference; float32 and bfloat16;
2. ``ops-bench`` prefill (sink_window, vertical_slash, block_topk, xattention, flexprefill) and decode (every
   selector) against SDPA on CUDA at ``--lengths`` (default 32768,131072);
3. one end-to-end row: a tiny random Llama generating on CUDA with dense, a sparse prefill pattern, a KV policy
   and a decode selector at full budget, which must decode dense's tokens.

Writes ``--out`` (JSON: every check with its error and every timing row) and exits 1 on any mismatch. Without a
CUDA device it prints one line and exits 0 (CI runs it everywhere).

    python benchmarks/gpu_check.py --out gpu_check.json [--lengths 32768,131072] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def op_checks(dev, dtypes, log) -> list[dict]:
    import torch

    from longattn import reference, registry
    from longattn.ops.decode import gather_attention, split_k_attention
    from longattn.ops.dispatch import BACKENDS, block_sparse_attention

    out = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for dt_name in dtypes:
        dt = getattr(torch, dt_name)
        tol = 2e-3 if dt == torch.float32 else 3e-2
        q = torch.randn(2, 4, 256, 64, generator=g).to(dev, dt)
        k = torch.randn(2, 2, 256, 64, generator=g).to(dev, dt)
        v = torch.randn(2, 2, 256, 64, generator=g).to(dev, dt)
        for e in registry.entries("prefill"):
            for i, ex in enumerate(e.cls.examples):
                if any(str(x) == "<profile>" for x in ex.values()) or "image" in ex:
                    continue
                p = e.cls(**ex)
                try:
                    lay = p.layout(q, k)
                except Exception as err:  # a pattern that cannot build its layout on CUDA is a failure
                    out.append({"check": f"layout {e.name}-{i}", "dtype": dt_name, "ok": False, "error": repr(err)})
                    continue
                mask = lay.to_dense_mask(causal=p.is_causal(), heads=q.shape[1])
                want, _ = reference.attention(q, k, v, causal=p.is_causal(), mask=mask)
                for be in BACKENDS:
                    try:
                        got = block_sparse_attention(q, k, v, lay, causal=p.is_causal(), backend=be)
                        err = float((got.float() - want.float()).abs().max())
                        out.append({"check": f"prefill {e.name}-{i}", "backend": be, "dtype": dt_name,
                                    "max_err": err, "ok": err <= tol})
                    except (RuntimeError, ValueError, NotImplementedError) as err_:
                        out.append({"check": f"prefill {e.name}-{i}", "backend": be, "dtype": dt_name,
                                    "skipped": repr(err_)[:200], "ok": True})
        qd = q[:, :, -1:]
        want, _ = reference.attention(qd, k, v, causal=False)
        for splits in (1, 3, 8):
            got, _ = split_k_attention(qd, k, v, splits=splits)
            err = float((got.float() - want.float()).abs().max())
            out.append({"check": f"split_k splits={splits}", "dtype": dt_name, "max_err": err, "ok": err <= tol})
        idx = torch.randperm(256, generator=g)[:64].sort().values.to(dev).view(1, 1, 64).expand(2, 2, 64)
        mask = torch.zeros(2, 4, 1, 256, dtype=torch.bool, device=dev)
        mask[:, :, :, idx[0, 0]] = True
        want, _ = reference.attention(qd, k, v, causal=False, mask=mask)
        got, _ = gather_attention(qd, k, v, idx)
        err = float((got.float() - want.float()).abs().max())
        out.append({"check": "gather_attention", "dtype": dt_name, "max_err": err, "ok": err <= tol})
    log(f"gpu_check: {sum(not r['ok'] for r in out)} of {len(out)} op checks failed")
    return out


def end_to_end(dev, log) -> list[dict]:
    import torch

    import longattn
    from longattn.models import tiny_model

    m = tiny_model("llama", num_hidden_layers=4).to(dev)
    ids = torch.randint(3, 128, (1, 600), generator=torch.Generator().manual_seed(1)).to(dev)
    out = []
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = m.generate(ids, max_new_tokens=8, do_sample=False)
        dense_s = time.perf_counter() - t0
        for recipe, same in [("dense", True), ("sink_window:sink=64:window=4096", True),
                             ("quest:budget=4096:dense_layers=", True), ("snapkv:ratio=0.5", False),
                             ("xattention:threshold=1.0:stride=8", True)]:
            t0 = time.perf_counter()
            with longattn.apply(m, recipe):
                got = m.generate(ids, max_new_tokens=8, do_sample=False)
            sec = time.perf_counter() - t0
            ok = bool(torch.equal(got, ref)) if same else got.shape == ref.shape
            out.append({"check": f"generate {recipe}", "ok": ok, "s": sec, "dense_s": dense_s})
    log(f"gpu_check: end to end {sum(r['ok'] for r in out)}/{len(out)} ok")
    return out


def timings(dev, lengths, quick, log) -> list[dict]:
    from longattn.bench.decode_ops import DecodeBenchConfig, run_decode_ops
    from longattn.bench.ops import OpsBenchConfig, run_ops

    pats = ("sink_window:sink=64:window=1024", "vertical_slash", "block_topk", "xattention", "flexprefill")
    recs = run_ops(OpsBenchConfig(patterns=pats[:2] if quick else pats, lengths=tuple(lengths),
                                  dtypes=("bfloat16",), heads=32, kv_heads=8, dim=128, qk="random",
                                  repeats=3, progress=False, device=str(dev)), log=log)
    recs += run_decode_ops(DecodeBenchConfig(lengths=tuple(lengths), dtypes=("bfloat16",), repeats=5,
                                             progress=False, device=str(dev),
                                             **({"selectors": ("quest", "split_k:splits=8")} if quick else {})),
                           log=log)
    return recs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="longattn on a CUDA GPU: op checks, timings, one end-to-end row")
    ap.add_argument("--out", default="gpu_check.json", help="JSON file to write (replaced)")
    ap.add_argument("--lengths", default="32768,131072", help="ops-bench lengths (comma-separated)")
    ap.add_argument("--quick", action="store_true", help="two patterns and two selectors only")
    ap.add_argument("--no-timings", action="store_true", help="op checks and the end-to-end row only")
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu runs the same checks here (a smoke test)")
    a = ap.parse_args(argv)
    import torch

    if a.device not in ("cuda", "cpu"):
        print(f"error: --device must be cuda or cpu, got {a.device!r}", file=sys.stderr)
        return 2
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here: skipped")
        return 0
    try:
        lengths = [int(x) for x in a.lengths.split(",") if x]
    except ValueError:
        print(f"error: --lengths must be comma-separated integers, got {a.lengths!r}", file=sys.stderr)
        return 2
    dev = torch.device(a.device)

    def log(s):
        print(s, file=sys.stderr, flush=True)

    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    log(f"gpu_check: {name}, torch {torch.__version__}")
    report = {"device": name, "torch": torch.__version__}
    report["ops"] = op_checks(dev, ("float32", "bfloat16"), log)
    report["end_to_end"] = end_to_end(dev, log)
    if not a.no_timings:
        report["timings"] = timings(dev, lengths, a.quick, log)
    bad = [r for r in report["ops"] + report["end_to_end"] if not r["ok"]]
    report["failed"] = len(bad)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    for r in bad[:20]:
        log(f"FAILED {r}")
    log(f"gpu_check: {len(bad)} failures; wrote {a.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
