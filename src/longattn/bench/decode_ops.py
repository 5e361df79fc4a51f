"""``longattn ops-bench --decode``: one decode step of each selector vs dense decode SDPA, in one process.

For each length N a cache of N keys/values is built (random, or the q/k/v that one layer of the embedded model
sees on a long library-made prompt, for N <= ``capture_max``: the decode query is then the last prompt
token's query). Each selector first sees the prompt (``on_prefill``: representatives, k-means; reported as
``setup_ms``, a once-per-context cost) and builds its page metadata; then one decode step is timed, split into
the selection (``est_ms``: scoring, top-k, index building) and the attention over the selected tokens
(``kernel_ms``), against ``F.scaled_dot_product_attention`` over the whole cache (``dense_ms``) on the same
inputs in the same run, timed in turn with the selector's whole step (interleaved rounds: medians, and the
per-round extremes ``speedup_min`` / ``speedup_max``). ``speedup = dense_ms / (est_ms + kernel_ms)``; ``est_ms``
is the selection timed alone, ``kernel_ms`` the rest of the step. On CPU, SDPA's decode path with GQA is
slower than a plain float32 matmul-softmax-matmul over the cache, so that eager dense attention is timed too
(``eager_ms``, ``speedup_eager = eager_ms / ms``): the honest baseline is the faster of the two.

Selection caches that reuse a selection across steps (TokenSelect's Selection Cache, LServe's reuse) are
cleared before every timed step, so the rows show the cost of a fresh selection; TidalDecode gets two rows, a
selection layer (dense attention + top-k) and a reuse layer (its recall is measured on the selection layer's own
q/k — an upper bound: a real reuse layer has other queries). ``recall`` is the dense softmax mass (mean over
query heads) that the selected tokens carry; ``density`` the fraction of cached tokens attended. ``split_k``
rows time the split-K op over the whole cache (density 1).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from .ops import ratio_stats, time_interleaved, time_ms

__all__ = ["DecodeBenchConfig", "run_decode_ops", "DEFAULT_SELECTORS"]

DEFAULT_SELECTORS = ("quest", "token_select", "tidal_decode", "infllm", "squeezed:cluster_tokens=128:iters=4",
                     "lserve_pages", "landmark", "longheads", "twilight:inner=quest/budget=4096:top_p=0.95",
                     "magicpig", "shadowkv", "split_k:splits=8")
REUSE_KEYS = ("token_select", "lserve")  # decode_state entries holding a selection reused across steps
LAYER = 2  # the layer index the selectors see (not in any default dense_layers)


@dataclass
class DecodeBenchConfig:
    selectors: tuple[str, ...] = DEFAULT_SELECTORS
    lengths: tuple[int, ...] = (32768, 131072)
    dtypes: tuple[str, ...] = ("float32",)
    heads: int = 32
    kv_heads: int = 8
    dim: int = 128
    budget: int = 2048
    repeats: int = 5
    seed: int = 0
    qk: str = "random"
    model: str = "smollm2-135m"
    layer: int = 14
    capture_max: int = 32768
    progress: bool = True
    device: str = "cpu"
    _sel: dict = field(default_factory=dict, repr=False)

    def validate(self) -> None:
        from ..api import parse_method
        from .ops import DTYPES, QK_SOURCES

        for spec in self.selectors:
            if spec.split(":")[0] == "split_k":
                self._sel[spec] = _split_k_of(spec)
                continue
            try:
                sel = parse_method(_with_budget(spec, self.budget), "decode")
            except ValueError as e:
                raise ValueError(f"--selectors: {e} (or split_k:splits=S)") from None
            self._sel[spec] = sel
        for d in self.dtypes:
            if d not in DTYPES:
                raise ValueError(f"--dtypes: unknown dtype {d!r}; allowed: {', '.join(DTYPES)}")
        if not self.lengths or any(n < 256 for n in self.lengths):
            raise ValueError(f"--lengths must be integers >= 256, got {list(self.lengths)}")
        if self.heads < 1 or self.dim < 16 or self.kv_heads < 1 or self.heads % self.kv_heads:
            raise ValueError(f"--heads must be a multiple of --kv-heads and --dim >= 16, got {self.heads}, "
                             f"{self.kv_heads}, {self.dim}")
        if self.qk not in QK_SOURCES:
            raise ValueError(f"--qk must be one of {', '.join(QK_SOURCES)}, got {self.qk!r}")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")


def _with_budget(spec: str, budget: int) -> str:
    return spec if "budget=" in spec else f"{spec}:budget={budget}"


def _split_k_of(spec: str) -> int:
    name, *kvs = spec.split(":")
    splits = 8
    for kv in kvs:
        k, _, v = kv.partition("=")
        if k != "splits" or not v.isdigit() or int(v) < 1:
            raise ValueError(f"--selectors: split_k takes only splits=S (S >= 1), got {kv!r}")
        splits = int(v)
    return splits




def _inputs(cfg: DecodeBenchConfig, n: int, cache: dict, log):
    """``(q_prefill [1, hq, n, d], k, v [1, hk, n, d])`` float32 and the source name."""
    from .ops import OpsBenchConfig
    from .ops import _inputs as prefill_inputs

    if cfg.qk == "captured" and n <= cfg.capture_max:
        ocfg = OpsBenchConfig(qk="captured", model=cfg.model, layer=cfg.layer, seed=cfg.seed)
        return prefill_inputs(ocfg, n, cache, log)
    g = torch.Generator().manual_seed(cfg.seed)
    q = torch.randn(1, cfg.heads, n, cfg.dim, generator=g)
    k = torch.randn(1, cfg.kv_heads, n, cfg.dim, generator=g)
    v = torch.randn(1, cfg.kv_heads, n, cfg.dim, generator=g)
    return (q, k, v), "random"


def _recall(q, k, idx, valid, scale) -> float:
    """Dense softmax mass of the decode query on the selected tokens, mean over query heads."""
    b, hq, _, d = q.shape
    hk = k.shape[1]
    p = torch.softmax(torch.matmul(q.float().reshape(b, hk, hq // hk, d), k.float().transpose(-1, -2)) * scale, -1)
    if idx.shape[1] == hk:
        sel = torch.gather(p, -1, idx.long().unsqueeze(2).expand(-1, -1, hq // hk, -1))
        if valid is not None:
            sel = sel * valid.unsqueeze(2)
    else:
        pq = p.reshape(b, hq, -1)
        sel = torch.gather(pq, -1, idx.long())
        if valid is not None:
            sel = sel * valid
    return float(sel.sum(-1).mean())


def run_decode_ops(cfg: DecodeBenchConfig, log=None) -> list[dict]:
    from tqdm.auto import tqdm

    from ..cache import LongattnLayer
    from ..decode.base import DecodeSelector, Step
    from ..ops.decode import split_k_attention
    from .ops import DTYPES

    log = log or (lambda s: print(s, file=sys.stderr))
    cfg.validate()
    recs: list[dict] = []
    model_cache: dict = {}
    with torch.no_grad():
        for n in cfg.lengths:
            (qp32, k32, v32), source = _inputs(cfg, n, model_cache, log)
            qp32, k32, v32 = (t.to(cfg.device) for t in (qp32, k32, v32))
            combos = [(dt, s) for dt in cfg.dtypes for s in cfg.selectors]
            bar = tqdm(combos, desc=f"decode ops-bench N={n}", disable=not cfg.progress, file=sys.stderr)
            dense_ms: dict[str, float] = {}
            eager_ms: dict[str, float] = {}
            for dtn, spec in bar:
                bar.set_postfix_str(f"{dtn} {spec}")
                dt = DTYPES[dtn]
                qp, k, v = (t.to(dt) for t in (qp32, k32, v32))
                q = qp[:, :, -1:].contiguous()
                hq, hk, d = q.shape[1], k.shape[1], q.shape[-1]
                scale = 1.0 / math.sqrt(d)
                gqa = hq != hk
                dense_step = partial(F.scaled_dot_product_attention, q, k, v, enable_gqa=gqa)
                if dtn not in dense_ms:
                    dense_ms[dtn] = time_ms(dense_step, cfg.repeats)
                    eager_ms[dtn] = time_ms(partial(split_k_attention, q, k, v, splits=1, scale=scale), cfg.repeats)
                base = {"op": "decode", "N": n, "dtype": dtn, "heads": hq, "kv_heads": hk, "dim": d,
                        "backend": "gather", "qk": source, "budget": cfg.budget, "dense_ms": dense_ms[dtn],
                        "eager_ms": eager_ms[dtn]}
                sel = cfg._sel[spec]
                if isinstance(sel, int):  # split-K over the whole cache
                    ts = time_interleaved({"dense": dense_step, "method": partial(
                        split_k_attention, q, k, v, splits=sel, scale=scale)}, cfg.repeats)
                    st = ratio_stats(ts["dense"], ts["method"])
                    recs.append({**base, "op": "split_k", "pattern": spec, "backend": "torch", "density": 1.0,
                                 "recall": 1.0, "setup_ms": 0.0, "est_ms": 0.0, "kernel_ms": st["ms"], **st,
                                 "speedup_eager": eager_ms[dtn] / st["ms"]})
                    continue
                layer = LongattnLayer()
                layer.update(k, v)
                t0 = time.perf_counter()
                sel.on_prefill(layer, LAYER, qp, k, None)
                num_layers = max(LAYER + 2, 4)
                rows = [(spec, LAYER)]
                if sel.name == "tidal_decode":  # a selection layer and a layer reusing its positions
                    sel_layers = sel.selection_layers(num_layers)
                    rows = [(f"{spec} (select layer)", sel_layers[0]), (f"{spec} (reuse layer)", num_layers - 1)]
                shared: dict = {}
                step = Step(q, k, v, None, layer, rows[0][1], num_layers, scale, shared)
                if sel.name != "tidal_decode":
                    sel.select(step)  # builds the page metadata once (as the prompt's first decode step)
                setup_ms = (time.perf_counter() - t0) * 1e3
                def clear(layer=layer):
                    for key in REUSE_KEYS:
                        layer.decode_state.pop(key, None)

                for label, li in rows:
                    step = Step(q, k, v, None, layer, li, num_layers, scale, shared)
                    if label.endswith("(select layer)"):
                        ts = time_interleaved({"dense": dense_step, "method": partial(sel.attend, step)},
                                              cfg.repeats)
                        st = ratio_stats(ts["dense"], ts["method"])
                        idx = shared["tidal"][0].expand(1, hk, -1)
                        recs.append({**base, "pattern": label, "density": 1.0, "recall": 1.0, "setup_ms": setup_ms,
                                     "est_ms": 0.0, "kernel_ms": st["ms"], **st,
                                     "speedup_eager": eager_ms[dtn] / st["ms"]})
                        continue
                    if sel.name == "tidal_decode":
                        sel.attend(Step(q, k, v, None, layer, rows[0][1], num_layers, scale, shared))
                    fused = type(sel).attend is not DecodeSelector.attend  # its own step (MagicPIG, ShadowKV)
                    clear()
                    idx, valid = sel.select(step)
                    if fused:  # timed whole (selection inside), after a first step that builds its state
                        sel.attend(step)
                        est, whole = 0.0, partial(sel.attend, step)
                    else:
                        est = time_ms(partial(sel.select, step), cfg.repeats, before=clear)
                        clear()

                        def whole(step=step, sel=sel, clear=clear):
                            clear()  # a fresh selection, then its attention (page selectors: page by page)
                            sel.attend(step)
                    # dense's step timed in turn with the selector's (interleaved rounds; medians and spread)
                    ts = time_interleaved({"dense": dense_step, "method": whole}, cfg.repeats)
                    st = ratio_stats(ts["dense"], ts["method"])
                    used = idx.numel() if valid is None else int(valid.sum())
                    recs.append({**base, "pattern": label, "density": used / (idx.shape[0] * idx.shape[1] * n),
                                 "recall": _recall(q, k, idx, valid, scale), "setup_ms": setup_ms,
                                 "est_ms": min(est, st["ms"]), "kernel_ms": st["ms"] - min(est, st["ms"]), **st,
                                 "fused": fused, "speedup_eager": eager_ms[dtn] / st["ms"]})
                del layer
    return recs
