"""``longattn dist-bench``: one sequence-parallel method on ``nproc`` local gloo processes vs one process.

Each rank builds the same seeded full q/k/v, keeps its shard (zigzag layout for ``zigzag``, contiguous
otherwise), runs the method (block kernel ``kernel``: PyTorch's CPU flash attention by default) once to warm up and then ``repeats`` times; per call it reports the seconds spent
computing, waiting on communication, and the bytes it sent (``comm.STATS``). The parent process runs the
single-process equivalent on the whole sequence in the same run, with the same number of threads per process
(SDPA causal for the softmax methods and the decode, chunked Lightning attention for ``lasp2``), and checks the
gathered distributed output against it (``max_err``).

Methods: ``ring``, ``zigzag`` (ring, zigzag layout), ``allgather``, ``ulysses``, ``dist_decode`` (one decode
query over a cache of ``seq`` tokens split across ranks), ``lasp2`` (linear attention), ``ulysses_deepspeed``
(Ulysses through DeepSpeed's ``DistributedAttention``, when deepspeed is installed: its all-to-alls are its own,
so the compute / wait / bytes columns, which count ours, are not measured for it).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..checks import check_int

__all__ = ["DistBenchConfig", "run_dist_bench", "METHODS"]

METHODS = ("ring", "zigzag", "allgather", "ulysses", "dist_decode", "lasp2", "ulysses_deepspeed")


@dataclass
class DistBenchConfig:
    method: str = "ring"
    nproc: int = 2
    seq: int = 8192
    heads: int = 8
    kv_heads: int = 2
    dim: int = 64
    repeats: int = 3
    threads: int = 1
    kernel: str = "flash"
    seed: int = 0
    timeout_s: float = 300.0

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("nproc", "seq", "heads", "kv_heads", "dim", "repeats", "threads"):
            check_int(getattr(self, name), f"--{name.replace('_', '-')}")
        from .blocks import KERNELS

        if self.kernel not in KERNELS:
            raise ValueError(f"--kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"--kv-heads ({self.kv_heads}) must divide --heads ({self.heads})")
        if self.seq < 2 * self.nproc:
            raise ValueError(f"--seq must be >= 2 * --nproc ({2 * self.nproc}), got {self.seq}")
        if self.method.startswith("ulysses") and self.heads % self.nproc:
            raise ValueError(f"--method {self.method}: --heads ({self.heads}) must be divisible by --nproc "
                             f"({self.nproc})")
        if self.method == "ulysses_deepspeed":
            import importlib.util

            if importlib.util.find_spec("deepspeed") is None:
                raise ValueError("--method ulysses_deepspeed needs the deepspeed package (pip install "
                                 "--no-build-isolation deepspeed); allowed without it: "
                                 f"{', '.join(m for m in METHODS if m != 'ulysses_deepspeed')}")
            if self.seq % self.nproc:
                raise ValueError(f"--method ulysses_deepspeed: --seq ({self.seq}) must be divisible by --nproc "
                                 f"({self.nproc}) (DeepSpeed's all-to-all needs equal shards)")


def _inputs(cfg: DistBenchConfig):
    g = torch.Generator().manual_seed(cfg.seed)
    hk = cfg.heads if cfg.method == "lasp2" else cfg.kv_heads
    nq = 1 if cfg.method == "dist_decode" else cfg.seq
    q = torch.randn(1, cfg.heads, nq, cfg.dim, generator=g)
    k = torch.randn(1, hk, cfg.seq, cfg.dim, generator=g)
    v = torch.randn(1, hk, cfg.seq, cfg.dim, generator=g)
    if cfg.method == "lasp2":  # a bounded feature map (as TransNormerLLM's), so outputs stay O(1)
        q, k = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    return q, k, v


def _single(cfg: DistBenchConfig, q, k, v):
    import torch.nn.functional as F

    from ..ops.linear import lightning_attention

    if cfg.method == "lasp2":
        return lightning_attention(q, k, v, decay=0.99)
    if cfg.method == "dist_decode":
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def worker(rank: int, world: int, cfg_dict: dict) -> dict:
    import torch.distributed as dist

    from . import allgather_kv, dist_decode, lasp2, ring_attention, shard, ulysses
    from .blocks import split_lengths
    from .comm import STATS

    cfg = DistBenchConfig(**cfg_dict)
    q, k, v = _inputs(cfg)
    layout = "zigzag" if cfg.method == "zigzag" else "contiguous"
    if cfg.method == "dist_decode":
        lens = split_lengths(cfg.seq, world)
        s = sum(lens[:rank])
        qd, kl, vl = q, k[:, :, s : s + lens[rank]].clone(), v[:, :, s : s + lens[rank]].clone()
        call = lambda: dist_decode(qd, kl, vl)  # noqa: E731
    else:
        ql, kl, vl = (shard(t, layout, world, rank) for t in (q, k, v))
        lens = [shard(q, layout, world, r).shape[2] for r in range(world)]
        fns = {"ring": ring_attention, "zigzag": ring_attention, "allgather": allgather_kv, "ulysses": ulysses}
        if cfg.method == "ulysses_deepspeed":
            call = lambda: ulysses(ql, kl, vl, lengths=lens, kernel=cfg.kernel, backend="deepspeed")  # noqa: E731
        elif cfg.method == "lasp2":
            call = lambda: lasp2(ql, kl, vl, decay=0.99)  # noqa: E731
        else:
            call = lambda: fns[cfg.method](ql, kl, vl, layout=layout, lengths=lens, kernel=cfg.kernel)  # noqa: E731
    del q, k, v
    with torch.no_grad():
        out = call()  # warm-up
        rows = []
        for _ in range(cfg.repeats):
            dist.barrier()
            STATS.reset()
            t0 = time.perf_counter()
            out = call()
            rows.append((time.perf_counter() - t0, STATS.compute_s, STATS.wait_s, STATS.bytes_sent, dict(STATS.calls)))
    med = sorted(rows, key=lambda r: r[0])[len(rows) // 2]
    if cfg.method == "ulysses_deepspeed":  # DeepSpeed's collectives are not counted by ours
        return {"ms": med[0] * 1e3, "compute_ms": None, "wait_ms": None, "bytes_sent": None, "calls": {}, "out": out}
    return {"ms": med[0] * 1e3, "compute_ms": med[1] * 1e3, "wait_ms": med[2] * 1e3, "bytes_sent": med[3],
            "calls": med[4], "out": out}


def run_dist_bench(cfg: DistBenchConfig, log=None) -> list[dict]:
    """Launch the ranks, run the single-process baseline, return one record per rank."""
    import sys

    from .blocks import unshard
    from .launch import spawn

    log = log or (lambda s: print(s, file=sys.stderr))
    cfg.validate()
    log(f"dist-bench: {cfg.method} on {cfg.nproc} processes x {cfg.threads} thread(s), N={cfg.seq}")
    results = spawn(worker, cfg.nproc, (asdict(cfg),), timeout_s=cfg.timeout_s, threads=cfg.threads)
    bad = [r for r in results if not r["ok"]]
    if bad:
        raise RuntimeError(f"dist-bench: rank {bad[0]['rank']} failed: {bad[0]['error']}")
    q, k, v = _inputs(cfg)
    prev = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with torch.no_grad():
            ref = _single(cfg, q, k, v)
            ts = []
            for _ in range(cfg.repeats):
                t0 = time.perf_counter()
                _single(cfg, q, k, v)
                ts.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(prev)
    single_ms = statistics.median(ts) * 1e3
    outs = [r["result"]["out"] for r in results]
    if cfg.method == "dist_decode":
        got = outs[0]
    else:
        got = unshard(outs, "zigzag" if cfg.method == "zigzag" else "contiguous")
    err = float((got.float() - ref.float()).abs().max())
    recs = []
    for r in results:
        res = r["result"]
        recs.append({"op": "dist", "method": cfg.method, "nproc": cfg.nproc, "N": cfg.seq, "rank": r["rank"],
                     "heads": cfg.heads, "kv_heads": cfg.kv_heads, "dim": cfg.dim, "threads": cfg.threads,
                     "ms": res["ms"], "compute_ms": res["compute_ms"], "wait_ms": res["wait_ms"],
                     "bytes_sent": res["bytes_sent"], "calls": res["calls"], "single_ms": single_ms,
                     "speedup": single_ms / max(x["result"]["ms"] for x in results), "max_err": err})
    return recs


def dist_table(recs: list[dict]) -> str:
    from ..bench.report import _render

    head = ["method", "P", "N", "rank", "compute ms", "wait ms", "sent MiB", "total ms", "single ms", "speedup",
            "max err"]
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    rows = [[r["method"], str(r["nproc"]), str(r["N"]), str(r["rank"]), f(r["compute_ms"], ".1f"),
             f(r["wait_ms"], ".1f"), f(None if r["bytes_sent"] is None else r["bytes_sent"] / 2**20, ".2f"),
             f"{r['ms']:.1f}", f"{r['single_ms']:.1f}", f"{r['speedup']:.2f}x", f"{r['max_err']:.1e}"] for r in recs]
    return _render(head, rows)
