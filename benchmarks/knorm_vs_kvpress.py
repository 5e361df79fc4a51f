"""Does our ``knorm`` keep what kvpress's ``KnormPress`` keeps? Kept positions (Jaccard per layer and kv head),
answers and key-norm ties at the budget's cut, on a passkey set never used while building: other filler
sentences, other needle wording (generated here, seeded), SmolLM2-135M, question-agnostic, ratio 0.75.

Run in an environment with kvpress (it pins transformers < 5.3):
    python benchmarks/knorm_vs_kvpress.py --samples 20 --out knorm_vs_kvpress.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

FILLER = ["A quiet river winds past the old mill.", "The baker opens his shop at dawn.",
          "Children fly kites above the meadow.", "A cat sleeps on the warm windowsill.",
          "Clouds drift slowly over the hills."]
QUESTION = "What is the secret number? Answer with the number only."
PREFIX = "The secret number is"


def samples(n: int, chars: int = 4200, seed: int = 0):
    from longattn.bench.tasks.base import Sample

    out = []
    for i in range(n):
        rng = random.Random(seed * 1000 + i)
        key = str(rng.randint(10000, 99999))
        body = []
        while sum(len(s) + 1 for s in body) < chars:
            body.append(rng.choice(FILLER))
        at = rng.randint(len(body) // 10, len(body) - 2)
        body[at:at] = [f"The secret number is {key}.", f"Keep it in mind: {key}."]
        ctx = " ".join(["Below is a long story with one secret number in it."] + body)
        out.append(Sample(f"unseen-{i}", ctx, QUESTION, PREFIX, [key]))
    return out


def ties_at_cut(keys, ratio: float, rel: float = 1e-6) -> int:
    """Keys (over all layers and heads) whose norm lies within ``rel`` of the kept set's boundary norm."""
    near = 0
    for layer in keys:
        for h in range(layer.shape[1]):
            nrm = layer[0, h].double().norm(dim=-1)
            thr = nrm.sort().values[max(int(len(nrm) * (1 - ratio)) - 1, 0)]
            near += int(((nrm - thr).abs() <= rel * thr).sum()) - 1
    return near


def main(argv=None) -> int:
    import vs_kvpress as V

    from longattn import models
    from longattn.bench.prompts import encode
    from longattn.outputs import check_output_file, write_atomic

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=20, help="how many passkey samples")
    ap.add_argument("--ratio", type=float, default=0.75, help="compression ratio")
    ap.add_argument("--out", default="knorm_vs_kvpress.json", help="JSON file to write")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    a = ap.parse_args(argv)
    try:
        check_output_file(a.out, "--out", overwrite=a.overwrite)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model, tok = models.load("smollm2-135m")
    eos = set(tok.all_special_ids)
    rows = []
    for s in samples(a.samples):
        ctx, rest = encode(tok, s)
        dense_keys, _ = V.dense_keys_of(model, ctx)
        gp, _, _, kept_p = V.run_kvpress(model, V.make_press("knorm", a.ratio), ctx, rest, 10, eos, dense_keys)
        with torch.no_grad():
            go, _, _, kept_o, _ = V.run_ours(model, V.ours_spec("knorm", a.ratio, len(ctx), 3), ctx, rest, 10, eos)
        js = [V.jaccard([[x]], [[y]]) for la, lb in zip(kept_o, kept_p) for x, y in zip(la, lb)]
        po, pp = tok.decode(go, skip_special_tokens=True), tok.decode(gp, skip_special_tokens=True)
        rows.append({"id": s.id, "n_tokens": len(ctx), "jaccard_mean": sum(js) / len(js), "jaccard_min": min(js),
                     "ours_correct": s.answers[0] in po, "kvpress_correct": s.answers[0] in pp,
                     "ours": po, "kvpress": pp, "ties_at_cut": ties_at_cut(dense_keys, a.ratio)})
        print(json.dumps(rows[-1]), flush=True)
    n = len(rows)
    summary = {"samples": n, "ratio": a.ratio, "ours_accuracy": sum(r["ours_correct"] for r in rows) / n,
               "kvpress_accuracy": sum(r["kvpress_correct"] for r in rows) / n,
               "jaccard_min": min(r["jaccard_min"] for r in rows), "rows": rows}
    write_atomic(a.out, json.dumps(summary, indent=1))
    print(f"knorm {summary['ours_accuracy']:.2f}  KnormPress {summary['kvpress_accuracy']:.2f}  "
          f"min Jaccard {summary['jaccard_min']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
