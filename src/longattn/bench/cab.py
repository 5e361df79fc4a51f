"""``longattn ops-bench --cab``: the CAB efficiency grid — every prefill pattern under the four attention kinds.

After "Benchmarking Efficient Attention for Long Sequences" / CAB (Zhang et al., ICML 2023,
https://arxiv.org/abs/2210.07661): causal self, non-causal self, causal cross and non-causal cross attention
(cross: ``N / cross_ratio`` queries over ``N`` keys, the queries aligned to the end of the keys for the causal
form). Each pattern runs where its definition applies; where it does not the grid says why (``n/a: ...``) and
nothing is timed. Every timing has the dense SDPA time of the same kind, inputs and run beside it; the
*efficiency length* of a (pattern, kind) is the shortest measured N from which the pattern is faster than
dense (``None`` when it never is in the sweep).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields, replace
from functools import partial

import torch
import torch.nn.functional as F

from .ops import time_ms

__all__ = ["CabConfig", "run_cab", "KINDS", "efficiency_lengths", "cab_table"]

KINDS = ("causal_self", "noncausal_self", "causal_cross", "noncausal_cross")


@dataclass
class CabConfig:
    patterns: tuple[str, ...] = ()
    lengths: tuple[int, ...] = (1024, 4096, 16384)
    heads: int = 8
    kv_heads: int = 2
    dim: int = 64
    cross_ratio: int = 4
    repeats: int = 2
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        from .ops import DEFAULT_PATTERNS, pattern_of

        self.patterns = tuple(p for p in (self.patterns or DEFAULT_PATTERNS) if p != "random")
        for p in self.patterns:
            pattern_of(p, None)
        if not self.lengths or any(n < 128 for n in self.lengths):
            raise ValueError(f"--lengths must be integers >= 128, got {list(self.lengths)}")
        if self.heads % self.kv_heads or self.repeats < 1:
            raise ValueError(f"--kv-heads must divide --heads and --repeats be >= 1, got {self.kv_heads}, {self.repeats}")




def _dense(q, k, v, causal: bool):
    nq, nk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if not causal:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if nq == nk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    mask = torch.arange(nk)[None, :] <= torch.arange(nk - nq, nk)[:, None]  # queries aligned to the end
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def _variant(pat, kind: str):
    """The pattern as it runs for ``kind``, or ``(None, reason)`` where its definition does not apply."""
    causal = kind.startswith("causal")
    if causal:
        if not pat.is_causal():
            return None, "n/a: a non-causal (2-D) definition"
        return pat, ""
    if "causal" in {f.name for f in fields(pat)}:
        return replace(pat, causal=False), ""
    if not pat.is_causal():
        return pat, ""
    return None, "n/a: causal-only (its layout never selects future keys)"


def run_cab(cfg: CabConfig, log=None) -> list[dict]:
    from tqdm.auto import tqdm

    from .ops import pattern_of

    log = log or (lambda s: print(s, file=sys.stderr))
    cfg.validate()
    recs = []
    g = torch.Generator().manual_seed(cfg.seed)
    combos = [(n, kind, p) for n in cfg.lengths for kind in KINDS for p in cfg.patterns]
    bar = tqdm(combos, desc="ops-bench --cab", disable=not cfg.progress, file=sys.stderr)
    dense_ms: dict = {}
    inputs: dict = {}
    with torch.no_grad():
        for n, kind, spec in bar:
            bar.set_postfix_str(f"N={n} {kind} {spec}")
            if n not in inputs:
                inputs.clear()
                inputs[n] = tuple(torch.randn(1, h, n, cfg.dim, generator=g)
                                  for h in (cfg.heads, cfg.kv_heads, cfg.kv_heads))
            q, k, v = inputs[n]
            if kind.endswith("cross"):
                q = q[:, :, n - n // cfg.cross_ratio :].contiguous()
            causal = kind.startswith("causal")
            if (n, kind) not in dense_ms:
                dense_ms[(n, kind)] = time_ms(partial(_dense, q, k, v, causal), cfg.repeats)
            base = {"op": "cab", "pattern": spec, "kind": kind, "N": n, "nq": q.shape[2], "dtype": "float32",
                    "heads": cfg.heads, "kv_heads": cfg.kv_heads, "dim": cfg.dim, "density": None, "recall": None,
                    "backend": None, "est_ms": None, "kernel_ms": None, "dense_ms": dense_ms[(n, kind)]}
            pat, why = _variant(pattern_of(spec, None), kind)
            if pat is None:
                recs.append({**base, "ms": None, "speedup": None, "applies": False, "note": why})
                continue
            try:
                ms = time_ms(partial(pat.attend, q, k, v, causal=causal), cfg.repeats)
            except (ValueError, NotImplementedError) as e:
                recs.append({**base, "ms": None, "speedup": None, "applies": False,
                             "note": f"n/a: {str(e).splitlines()[0][:120]}"})
                continue
            recs.append({**base, "backend": pat.backend, "ms": ms, "speedup": dense_ms[(n, kind)] / ms, "applies": True,
                         "note": ""})
    return recs


def efficiency_lengths(recs: list[dict]) -> dict[tuple[str, str], int | None]:
    """``(pattern, kind) -> `` the shortest N from which every longer measured N is faster than dense."""
    out = {}
    keys = {(r["pattern"], r["kind"]) for r in recs if r["applies"]}
    for key in sorted(keys):
        rows = sorted((r for r in recs if (r["pattern"], r["kind"]) == key and r["applies"]), key=lambda r: r["N"])
        eff = None
        for i, r in enumerate(rows):
            if all(x["speedup"] >= 1.0 for x in rows[i:]):
                eff = r["N"]
                break
        out[key] = eff
    return out


def cab_table(recs: list[dict]) -> str:
    """Pattern x kind: speed-up vs dense per N, and the efficiency length."""
    from .report import _render

    lengths = sorted({r["N"] for r in recs})
    eff = efficiency_lengths(recs)
    head = ["pattern", "kind"] + [f"N={n}" for n in lengths] + ["efficient from"]
    rows = []
    for spec in dict.fromkeys(r["pattern"] for r in recs):
        for kind in KINDS:
            cell = {r["N"]: r for r in recs if r["pattern"] == spec and r["kind"] == kind}
            if not cell:
                continue
            first = next(iter(cell.values()))
            if not first["applies"]:
                rows.append([spec, kind] + [first["note"]] + [""] * (len(lengths) - 1) + ["-"])
                continue
            e = eff.get((spec, kind))
            rows.append([spec, kind] + [f"{cell[n]['speedup']:.2f}x" if n in cell and cell[n]["speedup"] else "-"
                                        for n in lengths] + [str(e) if e else "never"])
    return _render(head, rows)
