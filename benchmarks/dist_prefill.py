"""A real model's prefill split across processes (``generate --dist``) against one process, in the same run.

For each length, a passkey prompt of the embedded model: the parent process prefills it and decodes greedily with
transformers' own SDPA attention on ``--nproc`` threads (the same cores the ranks get), ``--repeats`` times;
then, per mode, ``--nproc`` gloo ranks of one thread each run ``longattn.distributed.model.sp_generate`` on it
``--repeats`` times. Reported per mode: prefill seconds (median; the slowest rank), the ratio to the one-process
prefill, decode tokens/s, each rank's cache bytes and peak resident memory above the loaded model, whether the
tokens equal the one-process tokens, and whether the pass key was found. Writes JSON.

    python benchmarks/dist_prefill.py --lengths 4096,8192 --nproc 2 --modes ring,zigzag --json runs/dist_prefill.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def _rss_kib(field: str) -> int:
    from longattn.bench.metrics import status_kib

    return status_kib(field) or 0


def _reset_peak() -> None:
    """Restart the resident high-water mark (VmHWM) from now: the model's load peaks above what it keeps."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _prompt(model_name: str, length: int, seed: int):
    import torch

    from longattn import models
    from longattn.bench.prompts import encode
    from longattn.bench.tasks import Passkey

    model, tok = models.load(model_name)
    task = Passkey()
    sample = task.make(tok, length, 0, seed)
    ctx, rest = encode(tok, sample)
    with torch.no_grad():  # warm-up: the weights (memory-mapped) paged in before the peak is measured
        model(torch.tensor([ctx[:16]]))
    return model, tok, task, sample, ctx + rest


def rank_worker(rank: int, world: int, model_name: str, length: int, seed: int, mode: str, new: int,
                repeats: int) -> dict:
    from longattn.distributed.model import sp_generate

    model, tok, task, sample, ids = _prompt(model_name, length, seed)
    _reset_peak()
    base = _rss_kib("VmRSS")
    runs = [sp_generate(model, ids, mode, new, eos=set(tok.all_special_ids)) for _ in range(repeats)]
    text = tok.decode(runs[-1]["tokens"], skip_special_tokens=True)
    return {"prefill_s": [r["prefill_s"] for r in runs], "decode_s": [r["decode_s"] for r in runs],
            "tokens": runs[-1]["tokens"], "cache_bytes": runs[-1]["cache_bytes"], "lengths": runs[-1]["lengths"],
            "correct": bool(task.score(text, sample)), "peak_rss_above_model_mib": (_rss_kib("VmHWM") - base) / 1024}


def one_process(model_name: str, length: int, seed: int, new: int, repeats: int, threads: int) -> dict:
    import torch
    from transformers import DynamicCache

    from longattn.cache import cache_nbytes
    from longattn.hf import cache_kwarg_name

    torch.set_num_threads(threads)
    model, tok, task, sample, ids = _prompt(model_name, length, seed)
    eos = set(tok.all_special_ids)
    _reset_peak()
    base = _rss_kib("VmRSS")
    pre, dec = [], []
    kw = cache_kwarg_name(model)
    for _ in range(repeats):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1, **{kw: cache})
            pre.append(time.perf_counter() - t0)
            tokens = [int(out.logits[0, -1].argmax())]
            t0 = time.perf_counter()
            while len(tokens) < new and tokens[-1] not in eos:
                out = model(torch.tensor([[tokens[-1]]]), use_cache=True, **{kw: cache})
                tokens.append(int(out.logits[0, -1].argmax()))
            dec.append(time.perf_counter() - t0)
    text = tok.decode(tokens, skip_special_tokens=True)
    return {"prefill_s": pre, "decode_s": dec, "tokens": tokens, "cache_bytes": cache_nbytes(cache),
            "correct": bool(task.score(text, sample)), "n_tokens": len(ids),
            "peak_rss_above_model_mib": (_rss_kib("VmHWM") - base) / 1024}


def main(argv=None) -> int:
    from longattn.distributed.launch import spawn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", default="4096,8192")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--modes", default="ring,zigzag")
    ap.add_argument("--new", type=int, default=12, help="tokens to decode (default 12)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", required=True)
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    if Path(a.json).exists() and not a.overwrite:
        print(f"dist_prefill: error: --json {a.json} exists; add --overwrite to replace it", file=sys.stderr)
        return 2
    from longattn.distributed.model import MODES

    modes = a.modes.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:
        print(f"dist_prefill: error: --modes must be among {', '.join(MODES)}, got {', '.join(bad)}", file=sys.stderr)
        return 2
    recs = []
    for length in (int(x) for x in a.lengths.split(",")):
        one = one_process(a.model, length, a.seed, a.new, a.repeats, a.nproc)
        p1, d1 = statistics.median(one["prefill_s"]), statistics.median(one["decode_s"])
        rec0 = {"mode": "one process", "length": one["n_tokens"], "threads": a.nproc, "prefill_s": p1,
                "prefill_x": 1.0, "decode_tok_s": (len(one["tokens"]) - 1) / d1, "cache_bytes": [one["cache_bytes"]],
                "peak_rss_above_model_mib": [round(one["peak_rss_above_model_mib"])], "same_tokens": True,
                "correct": one["correct"]}
        recs.append(rec0)
        print(json.dumps(rec0), file=sys.stderr)
        for mode in modes:
            res = spawn(rank_worker, a.nproc, (a.model, length, a.seed, mode, a.new, a.repeats), timeout_s=3600,
                        threads=1, startup_s=300)
            bad = [r for r in res if not r["ok"]]
            if bad:
                raise SystemExit(f"dist_prefill: rank {bad[0]['rank']} failed: {bad[0]['error']}")
            rr = [r["result"] for r in res]
            # per repeat, the slowest rank's seconds (the ranks wait for each other)
            pres = [max(t) for t in zip(*(r["prefill_s"] for r in rr))]
            pre = statistics.median(pres)
            dec = statistics.median(max(t) for t in zip(*(r["decode_s"] for r in rr)))
            rec = {"mode": mode, "nproc": a.nproc, "length": one["n_tokens"], "threads": 1, "prefill_s": pre,
                   "prefill_x": p1 / pre, "prefill_s_spread": [min(pres), max(pres)],
                   "decode_tok_s": (len(rr[0]["tokens"]) - 1) / dec, "cache_bytes": [r["cache_bytes"] for r in rr],
                   "local_tokens": rr[0]["lengths"], "peak_rss_above_model_mib": [round(r["peak_rss_above_model_mib"])
                                                                                  for r in rr],
                   "same_tokens": all(r["tokens"] == one["tokens"] for r in rr), "correct": rr[0]["correct"]}
            recs.append(rec)
            print(json.dumps(rec), file=sys.stderr)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(recs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
