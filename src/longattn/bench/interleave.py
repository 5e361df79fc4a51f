"""Decode speed against dense, interleaved step by step in one process: the paired measurement behind
``bench --decode-rounds R`` and ``benchmarks/decode_interleaved.py``.

Why: on a 2-core machine the same decode ratio moved from 1.34x to 0.84x between two runs and from 1.20x to 0.95x
between two samples of one run; a method timed after dense meets other machine weather. Here every method has
its own cache (prefilled under its recipe), and for ``rounds`` rounds each method decodes one greedy token from
it, the order rotating every round, each step timed alone (the ``apply()`` context around it is entered
untimed). Drift hits every method within the same round, so the per-round ratios to dense are paired.
"""

from __future__ import annotations

import statistics
import time

import torch

__all__ = ["percentile", "step_rounds", "summarize"]


def percentile(xs: list[float], p: float) -> float:
    """The ``p``-quantile of ``xs`` by nearest rank (``p`` in [0, 1])."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p * (len(xs) - 1))))]


def step_rounds(model, states: dict, rounds: int, tokenizer=None, bar=None, compress: bool = True) -> dict:
    """``rounds`` rounds of one decode step per method. ``states``: ``{name: {"recipe": recipe or spec, "cache":
    cache, "tok": the next token to feed}}`` (the first name is the baseline); each step feeds ``tok`` into its
    cache under ``longattn.apply(model, recipe)`` and keeps the greedy next token. Returns per name: ``ms`` (each
    step's milliseconds), ``attn_ms`` (of it, inside the full-attention layers' attention), ``sel_ms`` (inside a
    decode selector's selection), ``selected`` / ``possible`` (tokens the selectors attended over the tokens
    cached, summed), ``tokens`` (the tokens fed). ``bar``: a tqdm bar advanced once per round. ``compress``:
    whether a KV policy may compress during these steps (as in ``generate``; the bench's decode never does)."""
    from .. import api
    from .decoding import forward

    names = list(states)
    out = {n: {"ms": [], "attn_ms": [], "sel_ms": [], "selected": 0, "possible": 0, "tokens": []} for n in names}
    with torch.no_grad():
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                st, o = states[name], out[name]
                with api.apply(model, st["recipe"], tokenizer=tokenizer) as s:
                    s.set_compression(compress)
                    t0 = time.perf_counter()
                    logits = forward(model, [st["tok"]], st["cache"], s.cache_kwarg, last=True)[0, -1]
                    dt = time.perf_counter() - t0
                    o["tokens"].append(st["tok"])
                    st["tok"] = int(logits.argmax())
                    o["ms"].append(dt * 1e3)
                    o["attn_ms"].append(s.attention_seconds["decode"] * 1e3)
                    d = s.decode_stats
                    o["sel_ms"].append(d.get("select_s", 0.0) * 1e3)
                    o["selected"] += d.get("selected", 0)
                    o["possible"] += d.get("possible", 0)
            if bar is not None:
                bar.update(1)
    return out


def summarize(raw: dict, base: str) -> tuple[float, dict]:
    """``(dense attention share, {name: fields})`` from ``step_rounds``'s output against the baseline ``base``:
    ``ms_per_step`` (median), ``decode_x`` (the baseline's median step over the method's), ``x_p10`` / ``x_p90`` /
    ``x_paired_median`` (of the per-round ratios), ``kept`` (selectors: tokens attended over tokens cached; the
    baseline 1.0; None otherwise), ``select_ms`` / ``attention_ms`` (medians) and ``tokens_equal_to_dense`` (how
    many of the first tokens fed equal the baseline's). The share is the baseline's attention time over its step
    time (median of the per-step ratios)."""
    dense = raw[base]
    share = statistics.median(a / t for a, t in zip(dense["attn_ms"], dense["ms"]))
    out = {}
    for name, st in raw.items():
        med = statistics.median(st["ms"])
        per_round = [dm / m for dm, m in zip(dense["ms"], st["ms"])]
        kept = (st["selected"] / st["possible"]) if st["possible"] else (1.0 if name == base else None)
        same = next((i for i, (a, b) in enumerate(zip(st["tokens"], dense["tokens"])) if a != b), len(st["tokens"]))
        out[name] = {"ms_per_step": med, "decode_x": statistics.median(dense["ms"]) / med,
                     "x_p10": percentile(per_round, 0.1), "x_p90": percentile(per_round, 0.9),
                     "x_paired_median": statistics.median(per_round), "kept": kept,
                     "select_ms": statistics.median(st["sel_ms"]), "attention_ms": statistics.median(st["attn_ms"]),
                     "tokens_equal_to_dense": same}
    return share, out
