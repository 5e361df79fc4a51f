"""``longattn ops-bench``: op-level speed of sparse prefill patterns vs dense causal SDPA, in one process.

Every record carries the dense SDPA time measured in the same run on the same inputs, timed in turn with the
pattern (``repeats`` interleaved rounds, medians); ``speedup`` is ``dense_ms / ms`` where ``ms`` is the whole
pattern call: the estimation (``est_ms``: building the layout) plus the kernel (``kernel_ms``);
``speedup_min`` / ``speedup_max`` are the extremes of the per-round ratios (the spread on a noisy machine).

Inputs (``qk``): by default the real q, k, v that one layer of the embedded model (smollm2-135m: 9 query heads,
3 kv heads, dim 64) sees on a long library-made prompt (stdlib source + a needle), for N <= ``capture_max``;
random tensors (``--heads``/``--kv-heads``/``--dim``) beyond, or everywhere with ``qk="random"``. Density is
the fraction of the causal token pairs the pattern chooses (its token rule included), ``block_density`` the
fraction of causal pairs inside the blocks it computes, ``recall`` the dense softmax mass it keeps
(``attention_recall`` on ``recall_rows`` evenly spaced query rows, exact on each row).
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.nn.functional as F

from ..layout import BlockLayout
from ..ops.dispatch import can_run
from ..prefill.base import PrefillPattern
from ..recall import attention_recall, sample_rows

__all__ = ["OpsBenchConfig", "run_ops", "DEFAULT_PATTERNS", "random_layout", "pattern_of"]

# one default setting per pattern (their defaults, except where a default needs a shape)
DEFAULT_PATTERNS = (
    "sink_window", "tri_shape", "vertical_slash", "block_topk", "block_topk:mode=threshold:tau=0.95",
    "lowbit_topk", "linear_estimate", "hierarchical", "bilevel_routing", "neighborhood", "strided_window",
    "shifted_groups:sink=64", "long_range_grouping:sink=64", "core_context", "random",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QK_SOURCES = ("captured", "random")


@dataclass
class OpsBenchConfig:
    patterns: tuple[str, ...] = DEFAULT_PATTERNS
    lengths: tuple[int, ...] = (8192, 32768)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    heads: int = 8
    kv_heads: int = 0  # 0: = heads (no GQA)
    dim: int = 64
    backends: tuple[str, ...] = ("flex",)
    block_size: int | None = None  # None: each pattern's own default (64)
    repeats: int = 3
    seed: int = 0
    qk: str = "captured"
    model: str = "smollm2-135m"
    layer: int = 14
    capture_max: int = 32768
    recall_rows: int = 512
    progress: bool = True
    device: str = "cpu"
    _patterns: dict = field(default_factory=dict, repr=False)

    def validate(self) -> None:
        for p in self.patterns:
            self._patterns[p] = pattern_of(p, self.block_size)
        for d in self.dtypes:
            if d not in DTYPES:
                raise ValueError(f"--dtypes: unknown dtype {d!r}; allowed: {', '.join(DTYPES)}")
        if not self.lengths or any(n < 128 for n in self.lengths):
            raise ValueError(f"--lengths must be integers >= 128, got {list(self.lengths)}")
        if self.heads < 1 or self.dim < 16:
            raise ValueError(f"--heads must be >= 1 and --dim >= 16, got {self.heads}, {self.dim}")
        kvh = self.kv_heads or self.heads
        if kvh < 1 or self.heads % kvh:
            raise ValueError(f"--kv-heads must divide --heads ({self.heads}), got {self.kv_heads}")
        if self.qk not in QK_SOURCES:
            raise ValueError(f"--qk must be one of {', '.join(QK_SOURCES)}, got {self.qk!r}")
        if self.repeats < 1 or self.recall_rows < 1:
            raise ValueError(f"--repeats and recall rows must be >= 1, got {self.repeats}, {self.recall_rows}")


def pattern_of(spec: str, block_size: int | None):
    """A pattern spec (``name[:k=v...]``, or ``random``) -> the pattern object (``block_size`` applied unless the
    spec sets one)."""
    from ..api import parse_method
    from ..prefill.mixed import Mixed

    if spec == "random":
        return "random"
    try:
        p = parse_method(spec, "prefill")
    except ValueError as e:
        raise ValueError(f"--patterns: {e} (or random, the baseline)") from None
    if isinstance(p, Mixed):
        return p  # its block size is the profile's
    if block_size is not None and "block_size=" not in spec:
        p = replace(p, block_size=block_size)
    return p


def time_ms(fn, repeats: int, before=None) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls after one warm-up call (and compilation);
    ``before()`` runs untimed before each call."""
    return statistics.median(time_interleaved({"fn": fn}, repeats, before)["fn"]) * 1e3


def time_interleaved(fns: dict, repeats: int, before=None) -> dict[str, list[float]]:
    """Seconds of each of ``fns`` (name -> callable) over ``repeats`` rounds, the callables run in turn within
    each round (after one warm-up call each), so the drift of a noisy machine falls on all of them alike and their
    pairwise ratios per round give a spread. ``before()`` runs untimed before each call."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    for fn in fns.values():
        if before:
            before()
        fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if before:
                before()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            out[name].append(time.perf_counter() - t0)
    return out


def ratio_stats(base: list[float], method: list[float]) -> dict:
    """``dense_ms`` / ``ms`` (medians), ``speedup`` (their ratio) and ``speedup_min`` / ``speedup_max`` (the
    extremes of the per-round ratios) from interleaved timings in seconds."""
    dms, ms = statistics.median(base) * 1e3, statistics.median(method) * 1e3
    ratios = [a / b for a, b in zip(base, method) if b > 0]
    return {"dense_ms": dms, "ms": ms, "speedup": dms / ms if ms > 0 else float("inf"),
            "speedup_min": min(ratios) if ratios else None, "speedup_max": max(ratios) if ratios else None}


def random_layout(n: int, heads: int, block_size: int, density: float, seed: int) -> BlockLayout:
    """Random causal block layout: each (q block, earlier kv block) kept with probability ``density``; the
    diagonal block is always kept so no query row is empty."""
    g = torch.Generator().manual_seed(seed)
    nb = -(-n // block_size)
    m = torch.rand(1, heads, nb, nb, generator=g) < density
    tri = torch.ones(nb, nb, dtype=torch.bool).tril()
    m = (m & tri) | torch.eye(nb, dtype=torch.bool)
    return BlockLayout.from_block_mask(m, block_size=block_size, seq_len=n)


class _Random(PrefillPattern):
    """The ``random`` baseline: 10% of the causal blocks at random (no estimation)."""

    def layout(self, q, k, key_valid=None):
        return random_layout(q.shape[2], q.shape[1], self.block_size, 0.1, 0)


def _inputs(cfg: OpsBenchConfig, n: int, model_cache: dict, log) -> tuple[tuple[torch.Tensor, ...], str]:
    if cfg.qk == "captured" and n <= cfg.capture_max:
        if "model" not in model_cache:
            from .. import models

            model_cache["model"] = models.load(cfg.model)
        model, tok = model_cache["model"]
        from ..profile.capture import calibration_ids, capture_qkv

        n_layers = model.config.num_hidden_layers
        if not 0 <= cfg.layer < n_layers:
            raise ValueError(f"--layer must be in [0, {n_layers}) for {cfg.model}, got {cfg.layer}")

        log(f"ops-bench: capturing q/k/v of {cfg.model} layer {cfg.layer} at N={n}"
            + (f" (beyond its {model.config.max_position_embeddings}-token training length)"
               if n > model.config.max_position_embeddings else ""))
        got = capture_qkv(model, calibration_ids(tok, n, seed=cfg.seed), [cfg.layer])
        return got[cfg.layer], f"{cfg.model}:layer={cfg.layer}"
    g = torch.Generator().manual_seed(cfg.seed)
    kvh = cfg.kv_heads or cfg.heads
    q = torch.randn(1, cfg.heads, n, cfg.dim, generator=g)
    k = torch.randn(1, kvh, n, cfg.dim, generator=g)
    v = torch.randn(1, kvh, n, cfg.dim, generator=g)
    return (q, k, v), "random"


def run_ops(cfg: OpsBenchConfig, log=None) -> list[dict]:
    from tqdm.auto import tqdm

    log = log or (lambda s: print(s, file=sys.stderr))
    cfg.validate()
    recs: list[dict] = []
    model_cache: dict = {}
    with torch.no_grad():
        for n in cfg.lengths:
            (q32, k32, v32), source = _inputs(cfg, n, model_cache, log)
            q32, k32, v32 = (t.to(cfg.device) for t in (q32, k32, v32))
            rows = sample_rows(n, cfg.recall_rows)
            combos = [(dt, p) for dt in cfg.dtypes for p in cfg.patterns]
            bar = tqdm(combos, desc=f"ops-bench N={n}", disable=not cfg.progress, file=sys.stderr)
            measured: dict[str, tuple] = {}  # per pattern: density, block density, recall (dtype-independent)
            for dtn, spec in bar:
                bar.set_postfix_str(f"{dtn} {spec}")
                dt = DTYPES[dtn]
                q, k, v = (t.to(dt) for t in (q32, k32, v32))
                # the dense reference, same inputs, timed in turn with each method (interleaved rounds)
                dense = partial(F.scaled_dot_product_attention, q, k, v, is_causal=True,
                                enable_gqa=q.shape[1] != k.shape[1])
                pat = cfg._patterns[spec]
                if pat == "random":
                    pat = _Random(block_size=cfg.block_size or 64)
                if spec not in measured:
                    lay = pat.for_layer(cfg.layer).layout(q32, k32) if hasattr(pat, "num_layers") else \
                        pat.layout(q32, k32)
                    measured[spec] = (
                        lay.density(exact=True, rows=rows), lay.density(),
                        float(attention_recall(lay, q32, k32, rows=rows).mean()),
                    )
                density, block_density, recall = measured[spec]
                run_pat = pat.for_layer(cfg.layer) if hasattr(pat, "num_layers") else pat
                for be in cfg.backends:
                    bpat = replace(run_pat, backend=be)
                    probe = BlockLayout.from_block_mask(torch.ones(1, 1, 1, 1, dtype=torch.bool), block_size=16,
                                                        seq_len=16)
                    ok, why = can_run(be, q, k, v, probe)
                    if not ok:
                        log(f"ops-bench: skipping backend {be}: {why}")
                        continue
                    stats: dict = {}

                    def call(bpat=bpat, stats=stats, q=q, k=k, v=v):
                        stats.clear()
                        bpat.attend(q, k, v, stats=stats)

                    ts = time_interleaved({"dense": dense, "method": call}, cfg.repeats)
                    st = ratio_stats(ts["dense"], ts["method"])
                    est_ms = stats.get("est_s", 0.0) * 1e3
                    recs.append({
                        "op": "block_sparse", "pattern": spec, "N": n, "dtype": dtn, "heads": q.shape[1],
                        "kv_heads": k.shape[1], "dim": q.shape[-1], "density": density,
                        "block_density": block_density, "recall": recall, "backend": be, "qk": source,
                        "est_ms": est_ms, "kernel_ms": st["ms"] - est_ms, **st, "repeats": cfg.repeats,
                    })
    return recs
