"""Every trainable mixer on one task, one budget, one machine: accuracy vs sequence length vs time and memory.

    python benchmarks/mixer_table.py --task mqar --seqs 64,128,256 --steps 1500 --out runs/mixers [--jobs 2]

Each (mixer, length) is one `longattn train` run (its causal form where it has one) written to
``OUT/<mixer>_<seq>/``; a run whose ``summary.json`` exists is kept (resume), so an interrupted sweep goes on where
it stopped. ``--jobs`` runs that many trainings side by side, one thread each (seconds per step are then
single-thread seconds, comparable between mixers of one sweep). Writes ``OUT/table.json`` and ``OUT/table.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path


def _one(job):
    import torch

    torch.set_num_threads(1)
    from longattn.train import TrainConfig, train

    mixer, seq, args, out = job
    cfg = TrainConfig(task=args["task"], mixer=mixer, seq=seq, steps=args["steps"], lr=args["lr"], dim=args["dim"],
                      layers=args["layers"], batch=args["batch"], eval_every=max(args["steps"] // 10, 1),
                      seed=args["seed"], pairs=(seq // args["seq_per_pair"]) if args["seq_per_pair"] else None)
    Path(out).mkdir(parents=True, exist_ok=True)
    return mixer, seq, train(cfg, out, progress=False)


def main(argv=None) -> int:
    from longattn import registry

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="mqar", help="mqar, selective_copy or listops")
    ap.add_argument("--seqs", default="64,128,256", help="comma-separated sequence lengths")
    ap.add_argument("--mixers", default="", help="comma-separated mixer specs (default: every registered mixer)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seq-per-pair", type=int, default=16,
                    help="mqar: pairs = seq / this (Zoology-like: 4 pairs at 64 tokens); 0: seq / 3, the densest")
    ap.add_argument("--jobs", type=int, default=1, help="trainings side by side, one thread each")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    try:
        seqs = [int(s) for s in a.seqs.split(",") if s.strip()]
    except ValueError:
        print(f"mixer_table: error: --seqs must be comma-separated integers, got {a.seqs!r}", file=sys.stderr)
        return 2
    mixers = [m.strip() for m in a.mixers.split(",") if m.strip()] or registry.names("mixer")
    bad = [m for m in mixers if m.split(":")[0] not in registry.names("mixer")]
    if bad or not seqs or a.jobs < 1:
        print(f"mixer_table: error: --mixers must be among {', '.join(registry.names('mixer'))} (got {bad}); "
              "--seqs and --jobs >= 1 are needed", file=sys.stderr)
        return 2
    if a.task == "lm":  # a language model needs the causal form: refused when named, left out of the default
        bidir = [m for m in mixers if True not in registry.get(m.split(":")[0], "mixer").cls.supports_causal]
        if bidir and a.mixers.strip():
            print(f"mixer_table: error: --task lm needs causal mixers; {', '.join(bidir)} "
                  "have only a bidirectional form", file=sys.stderr)
            return 2
        if bidir:
            print(f"mixer_table: --task lm: leaving out {', '.join(bidir)} (bidirectional only)", file=sys.stderr)
            mixers = [m for m in mixers if m not in bidir]
    out = Path(a.out)
    args = {k: getattr(a, k) for k in ("task", "steps", "lr", "dim", "layers", "batch", "seed", "seq_per_pair")}
    rows, todo = [], []
    for m in mixers:
        for n in seqs:
            d = out / f"{m.replace(':', '_').replace('=', '')}_{n}"
            if (d / "summary.json").exists():
                rows.append((m, n, json.loads((d / "summary.json").read_text())))
            else:
                todo.append((m, n, args, str(d)))
    from tqdm.auto import tqdm

    # a fresh process per run: its peak RSS is that run's own
    with ProcessPoolExecutor(max_workers=a.jobs, max_tasks_per_child=1) as ex, tqdm(total=len(todo), desc="mixers", unit="run") as bar:
        futs = {ex.submit(_one, j): j for j in todo}
        failed = []
        for f in as_completed(futs):
            try:
                m, n, s = f.result()
            except Exception as e:  # noqa: BLE001 - one training's failure is reported, the others' table kept
                m, n = futs[f][:2]
                failed.append(f"{m} @{n}: {type(e).__name__}: {e}")
                bar.update()
                continue
            rows.append((m, n, s))
            bar.set_postfix_str(f"{m} {n}: {s['best_acc']:.2f}")
            bar.update()
    for line in failed:
        print(f"mixer_table: failed: {line}", file=sys.stderr)
    if not rows:
        return 1
    rows.sort(key=lambda r: (mixers.index(r[0]), r[1]))
    (out / "table.json").write_text(json.dumps([{"mixer": m, "seq": n, **s} for m, n, s in rows], indent=1))
    lm = a.task == "lm"  # perplexity (final evaluation, whole sequence and its first / last 16 bytes)
    extra = [f"ppl @{n}" for n in seqs] + [f"ppl first/last 16 @{n}" for n in seqs] if lm else []
    head = ([f"acc @{n}" for n in seqs] + extra + [f"ms/step @{n}" for n in seqs])
    lines = [f"| mixer | form | {' | '.join(head)} | peak MiB | params |", "|---|---|" + "---|" * (len(head) + 2)]
    for m in mixers:
        got = {n: s for mm, n, s in rows if mm == m}
        if not got:
            continue
        s0 = next(iter(got.values()))
        cells = [f"{got[n]['best_acc']:.2f}" if n in got else "-" for n in seqs]
        if lm:
            cells += [f"{_ppl(got[n]):.2f}" if n in got else "-" for n in seqs]
            cells += [_ends(got[n]) if n in got else "-" for n in seqs]
        cells += [f"{got[n]['s_per_step'] * 1e3:.0f}" if n in got else "-" for n in seqs]
        peak = max(s["peak_rss_bytes"] for s in got.values()) / 2**20
        lines.append(f"| {m} | {'causal' if s0['causal'] else 'bidir'} | {' | '.join(cells)} | {peak:.0f} | "
                     f"{s0['params']} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


def _ppl(summary: dict) -> float:
    """The whole sequence's perplexity from the per-position buckets of the final evaluation: exp of the mean
    NLL, each bucket weighted by its positions."""
    import math

    b = summary["ppl_by_position"]
    w = [x["to"] - x["from"] + 1 for x in b]
    return math.exp(sum(wi * math.log(x["ppl"]) for wi, x in zip(w, b)) / sum(w))


def _ends(summary: dict) -> str:
    b = summary["ppl_by_position"]
    return f"{b[0]['ppl']:.2f} / {b[-1]['ppl']:.2f}"


if __name__ == "__main__":
    raise SystemExit(main())
