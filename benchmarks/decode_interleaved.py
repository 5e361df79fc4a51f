"""End-to-end decode speed against dense, interleaved step by step in one process, beside the Amdahl bound.

    python benchmarks/decode_interleaved.py --length 8192 --methods dense,landmark,quest --steps 64 \
        --json runs/dec_interleaved.json

Why: on these 2-core machines the same decode ratio moved from 1.34x to 0.84x between two runs, and from 1.20x to
0.95x between two samples of one run; a method timed after dense meets other machine weather. Here every method
prefills the same passkey prompt into its own cache (each under its recipe, ``longattn.apply``), then for
``--steps`` rounds each method decodes one greedy token from its own cache, the order rotating every round, each
step timed alone (the ``apply()`` context around it is entered untimed). Drift hits every method within the same
round, so the per-round ratio to dense is paired.

Per method: median ms per step; ``decode_x`` = dense's median step over the method's; the 10th-90th percentile of
the per-round ratios; the Amdahl bound ``1 / ((1 - s) + s * d)`` with ``s`` dense's attention share of a step (its
full-attention layers' attention time over its step time, medians) and ``d`` the method's attended fraction of
the cache (selectors: tokens selected over tokens cached); ``x / bound``; the selection's ms per step; and how
many of the first greedy tokens equal dense's (a selector that drifts from dense's text decodes other tokens, at
the same cost per step). Writes JSON; a progress bar on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def run(model, tokenizer, methods: list[str], length: int, steps: int, seed: int = 0, progress: bool = True) -> dict:
    """The interleaved measurement (see the module docstring; the rounds are ``longattn.bench.interleave``):
    ``{"methods": {name: {...}}, ...}``."""
    import torch
    from transformers import DynamicCache

    from longattn import api
    from longattn.bench.decoding import forward
    from longattn.bench.interleave import step_rounds, summarize
    from longattn.bench.prompts import encode
    from longattn.bench.report import amdahl
    from longattn.bench.tasks import Passkey

    sample = Passkey().make(tokenizer, length, 0, seed)
    ctx, rest = encode(tokenizer, sample)
    ids = ctx + rest
    states = {}
    with torch.no_grad():
        for name in methods:
            with api.apply(model, name, tokenizer=tokenizer) as s:
                cache = DynamicCache(config=model.config)
                logits = forward(model, ids, cache, s.cache_kwarg, last=True)[0, -1]
            states[name] = {"recipe": name, "cache": cache, "tok": int(logits.argmax())}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="interleaved decode", unit="round", file=sys.stderr)
    try:
        raw = step_rounds(model, states, steps, tokenizer=tokenizer, bar=bar)
    finally:
        if bar is not None:
            bar.close()
    share, out = summarize(raw, methods[0])
    for r in out.values():
        r["amdahl_bound"] = bound = amdahl(share, r["kept"])
        r["x_over_bound"] = (r["decode_x"] / bound) if bound else None
    return {"length": len(ids), "steps": steps, "dense_attention_share": share, "baseline": methods[0],
            "methods": out, "prompt": sample.id}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=8192, help="prompt tokens (a passkey prompt)")
    ap.add_argument("--methods", default="dense,landmark", help="comma-separated recipes; the first is the baseline")
    ap.add_argument("--steps", type=int, default=64, help="rounds (one decode step of every method each)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", required=True, help="where to write the results (refused if it exists)")
    ap.add_argument("--force", action="store_true", help="overwrite --json")
    a = ap.parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    if len(methods) < 2 or methods[0] != "dense" or a.steps < 1 or a.length < 64:
        print("decode_interleaved: error: --methods must start with dense and name at least one more recipe, "
              f"--steps >= 1, --length >= 64 (got {a.methods!r}, {a.steps}, {a.length})", file=sys.stderr)
        return 2
    if Path(a.json).exists() and not a.force:
        print(f"decode_interleaved: error: --json {a.json} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    import torch

    from longattn import api, models

    for m in methods:
        try:
            api.parse(m)
        except ValueError as e:
            print(f"decode_interleaved: error: --methods {m!r}: {e}", file=sys.stderr)
            return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = models.load(a.model)
    res = run(model, tok, methods, a.length, a.steps)
    from longattn.bench.records import environment

    res["environment"] = environment()
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=1))
    print(f"{'method':28} {'ms/step':>8} {'decode x':>9} {'p10-p90':>11} {'bound':>6} {'x/bound':>8} "
          f"{'sel ms':>7} {'same tokens':>11}")
    for name, r in res["methods"].items():
        bound = "-" if r["amdahl_bound"] is None else f"{r['amdahl_bound']:.2f}"
        xb = "-" if r["x_over_bound"] is None else f"{r['x_over_bound']:.2f}"
        print(f"{name:28} {r['ms_per_step']:8.1f} {r['decode_x']:9.2f} {r['x_p10']:5.2f}-{r['x_p90']:<5.2f} "
              f"{bound:>6} {xb:>8} {r['select_ms']:7.1f} {r['tokens_equal_to_dense']:>5}/{res['steps']}")
    print(f"dense attention share {res['dense_attention_share']:.2f}; {res['length']} tokens; json: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
