"""Memory a user can feel: under a memory cap, dense prefill of a long prompt fails and a recipe fits and answers.

Each recipe runs in its own subprocess: it loads the embedded model, runs one short warm-up forward (so the
thread pool and allocator arenas exist), then caps its address space (``RLIMIT_AS``) at what it already maps plus
``--cap-mib`` and answers one passkey prompt of ``--length`` tokens with ``model.generate`` inside
``longattn.apply(model, recipe)``. A recipe that needs more than the cap fails with an allocation error; the
parent collects one line per recipe (fits or not, the answer, the peak resident memory above the warm-up) and
writes JSON. Linux only (``/proc/self/status``, ``RLIMIT_AS``).

    python benchmarks/memory_cap.py --length 8192 --cap-mib 300 \
        --recipes "dense,chunked:ratio=0.875:chunk=512:inner=tova" --json runs/memory_cap.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def _status_kib(field: str) -> int:
    from longattn.bench.metrics import status_kib

    kib = status_kib(field)
    if kib is None:
        raise RuntimeError(f"no {field} in /proc/self/status")
    return kib


def child(recipe: str, length: int, cap_mib: int, model_name: str, seed: int) -> dict:
    import torch

    from longattn import api, models
    from longattn.bench.prompts import encode
    from longattn.bench.tasks import Passkey

    model, tok = models.load(model_name)
    task = Passkey()
    sample = task.make(tok, length, 0, seed)
    ctx, rest = encode(tok, sample)
    ids = torch.tensor([ctx + rest])
    with torch.no_grad():
        model(ids[:, :16])  # warm-up: threads and allocator arenas exist before the cap
    base_vm, base_rss = _status_kib("VmSize"), _status_kib("VmRSS")
    limit = (base_vm + cap_mib * 1024) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    out = {"recipe": recipe, "length": len(ctx) + len(rest), "cap_mib": cap_mib}
    try:
        with torch.no_grad(), api.apply(model, recipe):
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=task.max_new_tokens,
                                 do_sample=False)
        text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        out.update(fits=True, answer=text.strip(), correct=bool(task.score(text, sample)))
    except (MemoryError, RuntimeError) as e:  # torch reports a failed allocation as RuntimeError
        msg = str(e).splitlines()[0][:160]
        if not isinstance(e, MemoryError) and "alloc" not in msg.lower() and "memory" not in msg.lower():
            raise
        out.update(fits=False, error=f"{type(e).__name__}: {msg}")
    out["peak_rss_above_base_mib"] = round((_status_kib("VmHWM") - base_rss) / 1024, 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="dense,chunked:ratio=0.875:chunk=512:inner=tova",
                    help="comma-separated recipes, each run in its own capped subprocess")
    ap.add_argument("--length", type=int, default=8192, help="passkey prompt tokens (default 8192)")
    ap.add_argument("--cap-mib", type=int, default=300,
                    help="address space allowed above what the warmed-up process maps (default 300 MiB)")
    ap.add_argument("--model", default="smollm2-135m", help="embedded model name or local directory")
    ap.add_argument("--seed", type=int, default=0, help="passkey sample seed")
    ap.add_argument("--json", default=None, help="write the results as JSON here")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child is not None:
        print(json.dumps(child(a.child, a.length, a.cap_mib, a.model, a.seed)))
        return 0
    from longattn import api
    from longattn.outputs import check_output_file, write_atomic

    try:
        if a.cap_mib < 1 or a.length < 64:
            raise ValueError(f"--cap-mib must be >= 1 and --length >= 64, got {a.cap_mib}, {a.length}")
        recipes = [r.strip() for r in a.recipes.split(",") if r.strip()]
        for r in recipes:
            api.parse(r)  # a bad recipe is named before any subprocess starts
        if a.json:
            check_output_file(a.json, "--json", overwrite=a.overwrite)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = []
    for r in recipes:
        cmd = [sys.executable, __file__, "--child", r, "--length", str(a.length), "--cap-mib", str(a.cap_mib),
               "--model", a.model, "--seed", str(a.seed)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if p.returncode != 0 or not lines:  # killed or crashed without a line: report it, do not guess
            tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1][:160]
            rows.append({"recipe": r, "fits": False, "error": f"exit {p.returncode}: {tail}", "cap_mib": a.cap_mib})
        else:
            rows.append(json.loads(lines[-1]))
        row = rows[-1]
        what = (f"fits, answers {row['answer']!r} ({'correct' if row['correct'] else 'wrong'})" if row["fits"]
                else f"does not fit ({row['error']})")
        peak = row.get("peak_rss_above_base_mib")
        print(f"{r}: {what}" + (f"; peak RSS +{peak} MiB" if peak is not None else ""), flush=True)
    if a.json:
        write_atomic(a.json, json.dumps({"cap_mib": a.cap_mib, "length": a.length, "model": a.model,
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
