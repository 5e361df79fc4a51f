"""Terminal tables of bench and ops-bench records."""

from __future__ import annotations

import math
from collections import defaultdict

__all__ = ["bench_table", "decode_table", "ops_table", "render_dir", "rounds_ratio"]


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """95% Wilson score interval of a proportion ``k / n`` (``k`` may be a sum of fractional scores)."""
    if n <= 0:
        return None
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def _pairs(records: list[dict], field: str):
    """``(group, dense value, method value)`` for every record with a dense record of the same run (``run_id``),
    task, length and sample (timings of different runs are never divided by each other)."""
    dense = {(r["task"], r["length"], r["sample"], r.get("run_id")): r.get(field) for r in records
             if r["method"] == "dense" and r.get(field)}
    for r in records:
        d = dense.get((r["task"], r["length"], r["sample"], r.get("run_id")))
        v = r.get(field)
        if d and v:
            yield (r["task"], r["length"], r["method"]), d, v


def paired_ratio(records: list[dict], field: str, dense_over_method: bool = True) -> dict:
    """``(task, length, method) -> ratio`` of a time field against dense over the same-run pairs (``_pairs``):
    ``sum(dense) / sum(method)``."""
    num, den = defaultdict(float), defaultdict(float)
    for g, d, v in _pairs(records, field):
        num[g] += d if dense_over_method else v
        den[g] += v if dense_over_method else d
    return {g: num[g] / den[g] for g in num if den[g] > 0}


def paired_spread(records: list[dict], field: str, dense_over_method: bool = True) -> dict:
    """``(task, length, method) -> (min, max)`` of the per-sample ratios behind ``paired_ratio``: how far one
    sample's ratio moves on a noisy machine. Dense and groups with one pair are left out."""
    ratios = defaultdict(list)
    for g, d, v in _pairs(records, field):
        if g[2] != "dense":
            ratios[g].append(d / v if dense_over_method else v / d)
    return {g: (min(x), max(x)) for g, x in ratios.items() if len(x) > 1}


def rounds_ratio(records: list[dict]) -> dict:
    """``(task, length, method) -> (decode x, (p10, p90))`` from the ``--decode-rounds`` fields: dense's step over
    the method's summed over the samples (each sample's dense step is ``decode_x_rounds * decode_step_ms``, its
    own round's dense), and the lowest 10th / highest 90th percentile of the per-round ratios of any sample."""
    acc = defaultdict(lambda: [0.0, 0.0, [], []])
    for r in records:
        x, ms = r.get("decode_x_rounds"), r.get("decode_step_ms")
        if x and ms:
            a = acc[(r["task"], r["length"], r["method"])]
            a[0] += x * ms
            a[1] += ms
            a[2].append(r["decode_x_p10"])
            a[3].append(r["decode_x_p90"])
    return {g: (d / m, (min(lo), max(hi))) for g, (d, m, lo, hi) in acc.items() if m > 0}


def _with_spread(ratio, spread) -> str:
    text = _fmt(ratio, ".2f")
    return text if spread is None or ratio is None else f"{text} ({spread[0]:.2f}-{spread[1]:.2f})"


def _ratio_mean(rs: list[dict], num: str, den: str):
    pairs = [(r.get(num), r.get(den)) for r in rs]
    pairs = [(a, b) for a, b in pairs if a is not None and b]
    return sum(a for a, _ in pairs) / sum(b for _, b in pairs) if pairs else None


def attention_share(records: list[dict]) -> dict:
    """``{(task, length): (s_prefill, s_decode)}``: the share of dense's prefill time and decode time spent in
    the attention of the full-attention layers (what a method can change), from the dense rows."""
    out = {}
    groups = defaultdict(list)
    for r in records:
        if r["method"] == "dense":
            groups[(r["task"], r["length"])].append(r)
    for g, rs in groups.items():
        out[g] = (_ratio_mean(rs, "attn_prefill_s", "prefill_s"), _ratio_mean(rs, "attn_decode_s", "decode_s"))
    return out


def select_share(records: list[dict]) -> dict:
    """``{(task, length, method): s}``: a decode selector's selection time per generated token over a dense decode
    step of the same run, task and length (the issue's budget: at most 0.2). Per token: ``select_decode_s`` over
    the steps (``decode_tok_s * decode_s``); dense's step is ``1 / decode_tok_s``."""
    dense = defaultdict(list)
    for r in records:
        if r["method"] == "dense" and r.get("decode_tok_s"):
            dense[(r.get("run_id"), r["task"], r["length"])].append(1.0 / r["decode_tok_s"])
    num, den = defaultdict(float), defaultdict(float)
    for r in records:
        sel, tok_s, dec = r.get("select_decode_s"), r.get("decode_tok_s"), r.get("decode_s")
        d = dense.get((r.get("run_id"), r["task"], r["length"]))
        if r["method"] == "dense" or not sel or not tok_s or not dec or not d:
            continue
        g = (r["task"], r["length"], r["method"])
        num[g] += sel / (tok_s * dec)
        den[g] += sum(d) / len(d)
    return {g: num[g] / den[g] for g in num if den[g] > 0}


def amdahl(share: float | None, kept: float | None) -> float | None:
    """The end-to-end speed-up bound ``1 / ((1 - s) + s * d)`` for attention share ``s`` and kept work ``d``."""
    if share is None or kept is None:
        return None
    return 1.0 / ((1.0 - share) + share * kept)


def against_dense(rec: dict, dense: dict) -> dict:
    """The JSON contract's derived fields of one record against dense's result on the same sample in the same
    run (``dense``: that record or protocol result): ``prefill_x``, ``decode_x``, dense's attention shares, the
    record's Amdahl bounds (``kept_work``), and dense's own ``dense_prefill_s`` / ``dense_decode_tok_s``."""
    def ratio(a, b):
        return (a / b) if a and b else None

    sp, sd = ratio(dense.get("attn_prefill_s"), dense.get("prefill_s")), ratio(dense.get("attn_decode_s"),
                                                                                 dense.get("decode_s"))
    dp, dd = kept_work([rec])
    dist = bool(rec.get("dist"))  # sequence parallel keeps all the work: no bound
    return {"prefill_x": ratio(dense.get("prefill_s"), rec.get("prefill_s")),
            "decode_x": ratio(rec.get("decode_tok_s"), dense.get("decode_tok_s")),
            "prefill_attention_share": sp, "decode_attention_share": sd,
            "prefill_amdahl_bound": None if dist else amdahl(sp, dp),
            "decode_amdahl_bound": None if dist else amdahl(sd, dd),
            "dense_prefill_s": dense.get("prefill_s"), "dense_decode_tok_s": dense.get("decode_tok_s")}


def kept_work(rs: list[dict]) -> tuple[float | None, float | None]:
    """A method's kept fraction of the attention work: prefill = its pattern's density (1 without a pattern),
    decode = the selector's density, else the cache it attends over relative to the plain model's."""
    dp = _mean([r.get("prefill_density") for r in rs])
    dd = _mean([r.get("decode_density") for r in rs])
    if dd is None:
        dd = _ratio_mean(rs, "kv_cache_bytes", "plain_bytes")
    return (1.0 if dp is None else dp), (1.0 if dd is None else min(dd, 1.0))


def bench_table(records: list[dict]) -> str:
    """One row per (task, method, length): accuracy with n and its 95% interval, cache MiB, compression vs dense,
    prefill s and speed-up vs dense prefill (same run; with the min-max of the per-sample ratios when there are
    several) beside its Amdahl bound, decode tok/s and its ratio to dense (same run, likewise; with
    ``--decode-rounds``, the interleaved ratio and the 10th-90th percentile of its rounds) beside its bound,
    method s, prefill attention recall, the share of the answer's and of the needle's tokens the compressed
    cache holds (needle tasks, KV policies: ``answer_kept``, ``needle_kept``), KL and top-1 agreement vs dense. Dense is the first row of each group. The bound is ``1 / ((1 - s) + s d)``: ``s`` the share of dense's time in the
    full-attention layers' attention (same task and length), ``d`` the method's kept work (``kept_work``)."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["task"], r["length"], r["method"])].append(r)
    dense_bytes = {(t, n): _mean([r["kv_cache_bytes"] for r in rs])
                   for (t, n, m), rs in groups.items() if m == "dense"}
    prefill_x = paired_ratio(records, "prefill_s")
    decode_x = paired_ratio(records, "decode_tok_s", dense_over_method=False)
    prefill_sp = paired_spread(records, "prefill_s")
    decode_sp = paired_spread(records, "decode_tok_s", dense_over_method=False)
    for g, (x, sp) in rounds_ratio(records).items():  # --decode-rounds: the paired, interleaved ratio wins
        decode_x[g] = x
        decode_sp[g] = None if g[2] == "dense" else sp
    shares = attention_share(records)
    sel = select_share(records)
    head = ["task", "length", "method", "acc", "n", "95% CI", "kv MiB", "kv/dense", "kv/plain", "peak MiB", "prefill s",
            "prefill x", "bound", "decode tok/s", "decode x", "bound", "sel/step", "method s", "recall", "ans kept", "needle kept", "KL",
            "top1"]
    rows = []
    for (t, n, m), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] != "dense",
                                                               kv[0][2])):
        kvb = _mean([r["kv_cache_bytes"] for r in rs])
        db = dense_bytes.get((t, n))
        peak = _mean([r.get("peak_bytes") for r in rs])
        scores = [r["score"] for r in rs if r.get("score") is not None]
        ci = wilson(sum(scores), len(scores)) if scores else None
        sp, sd = shares.get((t, n), (None, None))
        dp, dd = kept_work(rs)
        if any(r.get("dist") for r in rs):  # sequence parallel keeps all the work, on more processes: no bound
            sp = sd = None
        rows.append([
            t, str(n), m, _fmt(_mean(scores), ".2f"), str(len(rs)),
            "-" if ci is None else f"{ci[0]:.2f}-{ci[1]:.2f}",
            _fmt(kvb / 2**20 if kvb is not None else None, ".1f"),
            _fmt(kvb / db if (db and kvb is not None) else None, ".2f"),
            _fmt(_ratio_mean(rs, "kv_cache_bytes", "plain_bytes"), ".2f"),
            _fmt(peak / 2**20 if peak is not None else None, ".0f"),
            _fmt(_mean([r["prefill_s"] for r in rs]), ".2f"),
            _with_spread(prefill_x.get((t, n, m)), prefill_sp.get((t, n, m))),
            _fmt(amdahl(sp, dp), ".2f"),
            _fmt(_mean([r["decode_tok_s"] for r in rs]), ".1f"),
            _with_spread(decode_x.get((t, n, m)), decode_sp.get((t, n, m))),
            _fmt(amdahl(sd, dd), ".2f"),
            _fmt(sel.get((t, n, m)), ".2f"),
            _fmt(_mean([r.get("method_s") for r in rs]), ".3f"),
            _fmt(_mean([r.get("recall") for r in rs]), ".3f"),
            _fmt(_mean([r.get("answer_kept") for r in rs]), ".2f"),
            _fmt(_mean([r.get("needle_kept") for r in rs]), ".2f"),
            _fmt(_mean([r["kl"] for r in rs]), ".3f"),
            _fmt(_mean([r["top1_agree"] for r in rs]), ".2f"),
        ])
    table = _render(head, rows)
    turns = turn_table(records)
    ppl = ppl_table(records)
    return (table + ("\n\naccuracy per turn (shared context)\n" + turns if turns else "")
            + ("\n\nperplexity (teacher-forced, last eval_tokens)\n" + ppl if ppl else ""))


def ppl_table(records: list[dict]) -> str:
    """Perplexity records: mean NLL, perplexity and its ratio to dense's, per (task, length, method)."""
    groups = defaultdict(list)
    for r in records:
        if r.get("nll") is not None:
            groups[(r["task"], r["length"], r["method"])].append(r)
    if not groups:
        return ""
    dense = {(t, n): _mean([r["ppl"] for r in rs]) for (t, n, m), rs in groups.items() if m == "dense"}
    head = ["task", "length", "method", "n", "nll", "ppl", "ppl/dense", "KL", "top1"]
    rows = []
    for (t, n, m), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] != "dense", kv[0][2])):
        ppl, d = _mean([r["ppl"] for r in rs]), dense.get((t, n))
        rows.append([t, str(n), m, str(len(rs)), _fmt(_mean([r["nll"] for r in rs]), ".3f"), _fmt(ppl, ".2f"),
                     _fmt(ppl / d if (ppl and d) else None, ".3f"), _fmt(_mean([r["kl"] for r in rs]), ".3f"),
                     _fmt(_mean([r["top1_agree"] for r in rs]), ".2f")])
    return _render(head, rows)


def turn_table(records: list[dict]) -> str:
    """Shared-context records: accuracy of each turn (mean over samples), per (task, length, method)."""
    groups = defaultdict(list)
    for r in records:
        if r.get("turn_scores"):
            groups[(r["task"], r["length"], r["method"])].append(r["turn_scores"])
    if not groups:
        return ""
    turns = max(len(t) for ts in groups.values() for t in ts)
    head = ["task", "length", "method", "n"] + [f"turn {i + 1}" for i in range(turns)]
    rows = []
    for (t, n, m), ts in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] != "dense", kv[0][2])):
        accs = [_mean([x[i] for x in ts if i < len(x)]) for i in range(turns)]
        rows.append([t, str(n), m, str(len(ts))] + [_fmt(a, ".2f") for a in accs])
    return _render(head, rows)


def ops_table(records: list[dict]) -> str:
    head = ["pattern", "N", "dtype", "backend", "density", "blocks", "recall", "est ms", "kernel ms", "dense ms",
            "speedup"]

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    rows = [[r["pattern"], str(r["N"]), r["dtype"], r["backend"], f(r["density"], ".3f"),
             f(r.get("block_density"), ".3f"), f(r.get("recall"), ".3f"), f"{r['est_ms']:.1f}",
             f"{r['kernel_ms']:.1f}", f"{r['dense_ms']:.1f}", f"{r['speedup']:.2f}x"]
            for r in records]
    return _render(head, rows)


def decode_table(records: list[dict]) -> str:
    """ops-bench --decode records: selection and attention time of one decode step vs dense decode attention
    (SDPA, and eager matmul-softmax-matmul), same run."""
    head = ["selector", "N", "dtype", "heads", "density", "recall", "setup ms", "select ms", "attend ms",
            "sdpa ms", "eager ms", "vs sdpa", "vs eager"]
    rows = [[r["pattern"], str(r["N"]), r["dtype"], f"{r['heads']}/{r['kv_heads']}x{r['dim']}",
             f"{r['density']:.3f}", f"{r['recall']:.3f}", f"{r['setup_ms']:.0f}", f"{r['est_ms']:.2f}",
             f"{r['kernel_ms']:.2f}", f"{r['dense_ms']:.2f}", f"{r['eager_ms']:.2f}", f"{r['speedup']:.2f}x",
             f"{r['speedup_eager']:.2f}x"] for r in records]
    return _render(head, rows)


def _render(head: list[str], rows: list[list[str]]) -> str:
    w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w[i]) if i < 3 else c.rjust(w[i]) for i, c in enumerate(cells))  # noqa: E731
    return "\n".join([line(head), line(["-" * x for x in w])] + [line(r) for r in rows])


def render_dir(records: list[dict], out_dir) -> str:
    """Write ``table.txt``, the PNG plots and ``report.html`` into ``out_dir``; return the table."""
    from pathlib import Path

    table = bench_table(records)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.txt").write_text(table + "\n")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        (out / "report.html").write_text("<pre>" + table + "</pre><p>(install matplotlib for plots)</p>")
        return table
    from .plots import write_html, write_plots

    plots = write_plots(records, out)
    write_html(records, table, out, plots)
    return table
