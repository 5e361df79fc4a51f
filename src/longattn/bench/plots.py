"""PNG plots and a self-contained HTML report of bench records (matplotlib, Agg backend)."""

from __future__ import annotations

import base64
import html
import io
import re
from collections import defaultdict
from pathlib import Path

from ..outputs import safe_name

__all__ = ["decode_plot", "family_and_ratio", "write_plots", "write_html"]


def family_and_ratio(method: str) -> tuple[str, float]:
    """``"snapkv:ratio=0.5:obs_window=32"`` -> ``("snapkv:obs_window=32", 0.5)``; no ratio -> 0.0 (dense)."""
    parts = method.split("+")
    fam, ratio = [], 0.0
    for p in parts:
        name, *kvs = p.split(":")
        rest = []
        for kv in kvs:
            if kv.startswith("ratio="):
                ratio = float(kv.split("=", 1)[1])
            else:
                rest.append(kv)
        fam.append(":".join([name] + rest))
    return "+".join(fam), ratio


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _style(i: int) -> dict:
    """Distinct colour, marker and dash for the i-th line (more lines than a colour cycle has)."""
    import matplotlib

    colors = matplotlib.colormaps["tab20"].colors
    return {"color": colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20], "marker": "os^Dvx*P"[i % 8],
            "linestyle": ("-", "--", ":")[i // 8 % 3]}


def _figs(records: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}
    by_task = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    for task, recs in by_task.items():
        lengths = sorted({r["length"] for r in recs})
        key, key_label = ("ppl", "perplexity") if any("ppl" in r for r in recs) else ("score", "accuracy")
        tname = safe_name(task)
        for n in lengths:  # the main question of a run: what each method keeps for the memory it holds
            fig = _accuracy_vs_bytes(plt, [r for r in recs if r["length"] == n], key, key_label, f"{task}, {n} tokens")
            if fig is not None:
                figs[f"{tname}_{n}_{key}_vs_cache_bytes.png"] = fig
        # accuracy vs compression ratio (dense at ratio 0 is drawn in every family as the reference point)
        dense = [r for r in recs if r["method"] == "dense"]
        for n in lengths:
            acc = defaultdict(lambda: defaultdict(list))
            for r in recs:
                if r["length"] != n:
                    continue
                fam, ratio = family_and_ratio(r["method"])
                acc[fam][ratio].append(r.get(key))
            fams = [f for f in acc if f != "dense" and len(acc[f]) > 1]
            if not fams:
                continue
            fig, ax = plt.subplots(figsize=(9, 5))
            d0 = _mean([r.get(key) for r in dense if r["length"] == n])
            for i, fam in enumerate(sorted(fams)):
                pts = sorted(acc[fam].items())
                if d0 is not None:
                    pts = [(0.0, [d0])] + pts
                ax.plot([p[0] for p in pts], [_mean(p[1]) for p in pts], label=fam, **_style(i))
            ax.set_xlabel("compression ratio (fraction of the cache removed)")
            ax.set_ylabel(key_label)
            if key == "score":
                ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{task}, {n} tokens: {key_label} vs compression (question-agnostic unless named)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
            figs[f"{tname}_{n}_accuracy_vs_ratio.png"] = fig
        if len(lengths) > 1:
            for metric, label in ((key, key_label), ("prefill_s", "prefill seconds"),
                                  ("decode_tok_s", "decode tokens/s"), ("kv_cache_bytes", "KV cache bytes")):
                fig, ax = plt.subplots(figsize=(8, 5))
                by_m = defaultdict(lambda: defaultdict(list))
                for r in recs:
                    by_m[r["method"]][r["length"]].append(r.get(metric))
                for i, (m, d) in enumerate(sorted(by_m.items())):
                    xs = sorted(d)
                    ax.plot(xs, [_mean(d[x]) for x in xs], label=m, **_style(i))
                ax.set_xscale("log", base=2)
                ax.set_xlabel("context length (tokens)")
                ax.set_ylabel(label)
                ax.set_title(f"{task}: {label} vs length")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
                figs[f"{tname}_{safe_name(metric)}_vs_length.png"] = fig
    return figs


def _accuracy_vs_bytes(plt, recs: list[dict], key: str, key_label: str, title: str):
    """One point per method: mean ``key`` (with its 95% interval for accuracy) against the cache MiB it held."""
    from .report import wilson

    by_m = defaultdict(list)
    for r in recs:
        if r.get(key) is not None and r.get("kv_cache_bytes") is not None:
            by_m[r["method"]].append(r)
    if not by_m:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    xmax = max(_mean([r["kv_cache_bytes"] for r in rs]) for rs in by_m.values()) / 2**20
    seen: dict = defaultdict(int)  # methods holding the same bytes are drawn side by side, not on top
    for i, (m, rs) in enumerate(sorted(by_m.items(), key=lambda kv: (kv[0] != "dense", kv[0]))):
        x = _mean([r["kv_cache_bytes"] for r in rs]) / 2**20
        slot = round(x / max(xmax, 1e-9), 2)
        x += seen[slot] * 0.012 * xmax
        seen[slot] += 1
        vals = [r[key] for r in rs]
        y = _mean(vals)
        st = _style(i)
        if key == "score":
            lo, hi = wilson(sum(vals), len(vals))
            ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt=st["marker"], color=st["color"], capsize=3,
                        label=f"{m} (n={len(rs)})")
        else:
            ax.plot([x], [y], st["marker"], color=st["color"], label=f"{m} (n={len(rs)})")
    ax.set_xlabel("KV cache held after prefill (MiB)")
    ax.set_ylabel(key_label + (" (95% interval)" if key == "score" else ""))
    if key == "score":
        ax.set_ylim(-0.05, 1.05)
    ax.set_xlim(left=0)
    ax.set_title(f"{title}: {key_label} vs cache memory")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def write_plots(records: list[dict], out_dir: str | Path) -> list[Path]:
    import matplotlib.pyplot as plt

    out = []
    for name, fig in _figs(records).items():
        p = Path(out_dir) / name
        fig.savefig(p, dpi=110, bbox_inches="tight")
        plt.close(fig)
        out.append(p)
    return out


def write_html(records: list[dict], table: str, out_dir: str | Path, plots: list[Path]) -> Path:
    """One self-contained page: the table, the plots inlined, every record."""
    imgs = "".join(
        f'<h3>{html.escape(p.stem)}</h3><img src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}" style="max-width:100%">'
        for p in plots
    )
    keys = ["task", "method", "length", "sample", "correct", "kv_cache_bytes", "prefill_s", "decode_tok_s",
            "method_s", "recall", "kl", "top1_agree", "protocol", "prediction", "answer"]
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(r.get(k, '')))}</td>" for k in keys) + "</tr>" for r in records
    )
    buf = io.StringIO()
    buf.write("<!doctype html><meta charset='utf-8'><title>longattn bench report</title>")
    buf.write("<style>body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;padding:2px 6px;"
              "font-size:12px}table{border-collapse:collapse}pre{background:#f6f6f6;padding:1em}</style>")
    buf.write("<h1>longattn bench report</h1><h2>Summary</h2><pre>" + html.escape(table) + "</pre>")
    buf.write("<h2>Plots</h2>" + (imgs or "<p>(no plot: give several ratios or lengths)</p>"))
    buf.write("<h2>Records</h2><table><tr>" + "".join(f"<th>{k}</th>" for k in keys) + "</tr>" + rows + "</table>")
    p = Path(out_dir) / "report.html"
    p.write_text(buf.getvalue())
    return p


def decode_plot(records: list[dict], path) -> None:
    """``ops-bench --decode`` records -> one PNG: per input shape, the speed-up of one decode step over dense
    decode attention (the faster of SDPA and eager, same run) against the cache length, one line per selector."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["heads"], r["kv_heads"], r["dim"], r.get("qk", "")) for r in records})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rs = [r for r in records if (r["heads"], r["kv_heads"], r["dim"], r.get("qk", "")) == shape]
        for i, name in enumerate(dict.fromkeys(r["pattern"] for r in rs)):
            pts = sorted((r["N"], min(r["dense_ms"], r.get("eager_ms") or r["dense_ms"]) / r["ms"])
                         for r in rs if r["pattern"] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=re.sub(r":\S*", "", name), **_style(i))
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("cache length (tokens)")
        ax.set_ylabel("speed-up vs dense decode (best of SDPA, eager)")
        ax.set_title(f"{shape[0]} q heads / {shape[1]} kv heads x {shape[2]} ({shape[3]})", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
