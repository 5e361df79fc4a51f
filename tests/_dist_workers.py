"""Worker functions run in spawned gloo processes by tests/test_distributed.py (importable by name)."""

import os
import time

import torch

from longattn import reference
from longattn.distributed import (
    STATS,
    allgather_kv,
    dist_decode,
    hybrid_attention,
    lasp2,
    ring_attention,
    shard,
    ulysses,
)
from longattn.distributed.blocks import split_lengths
from longattn.ops.linear import linear_attention_naive


def _full(seed, b=2, hq=4, hk=2, n=37, d=8):
    g = torch.Generator().manual_seed(seed)
    q, k, v, w = (torch.randn(b, h, n, d, generator=g) for h in (hq, hk, hk, hq))
    return q, k, v, w


def _ref_grads(q, k, v, w, causal=True):
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out, lse = reference.attention(q, k, v, causal=causal)
    (out * w).sum().backward()
    return out.detach(), lse.float(), q.grad, k.grad, v.grad


def _err(a, b):
    return float((a.detach().float() - b.detach().float()).abs().max()) if a.numel() else 0.0


def check_methods(rank, world, n, lengths):
    """Every method vs the single-process reference: outputs, lse, gradients, collective counts."""
    res = {}
    q, k, v, w = _full(0, n=n)
    ref = {c: _ref_grads(q, k, v, w, causal=c) for c in (True, False)}
    cases = [("ring", "contiguous", True, "eager"), ("ring", "zigzag", True, "eager"),
             ("ring", "zigzag", True, "flash"), ("ring", "contiguous", False, "eager"),
             ("allgather", "contiguous", True, "eager"), ("allgather", "zigzag", True, "eager"),
             ("ulysses", "contiguous", True, "eager"), ("ulysses", "zigzag", True, "eager")]
    fns = {"ring": ring_attention, "allgather": allgather_kv, "ulysses": ulysses}
    for method, layout, causal, kernel in cases:
        lens = lengths if layout == "contiguous" else None
        if layout == "zigzag":
            sizes = split_lengths(n, 2 * world)
            all_lens = [sizes[r] + sizes[2 * world - 1 - r] for r in range(world)]
        else:
            all_lens = lengths
        ql, kl, vl = (shard(t, layout, world, rank, lengths=lens).clone().requires_grad_(True) for t in (q, k, v))
        wl = shard(w, layout, world, rank, lengths=lens)
        r_out, r_lse, r_dq, r_dk, r_dv = (shard(t, layout, world, rank, lengths=lens) for t in ref[causal])
        STATS.reset()
        kw = dict(causal=causal, layout=layout, kernel=kernel, lengths=all_lens)
        if method == "ulysses":
            out, lse = fns[method](ql, kl, vl, **kw), None
        else:
            out, lse = fns[method](ql, kl, vl, return_lse=True, **kw)
        fwd = dict(STATS.calls)
        STATS.reset()
        (out * wl).sum().backward()
        bwd = dict(STATS.calls)
        res[f"{method}/{layout}/{'causal' if causal else 'full'}/{kernel}"] = {
            "out": _err(out, r_out), "lse": None if lse is None else _err(lse, r_lse),
            "dq": _err(ql.grad, r_dq), "dk": _err(kl.grad, r_dk), "dv": _err(vl.grad, r_dv),
            "fwd": fwd, "bwd": bwd,
        }
    # lengths exchanged when not given: one extra small all-gather
    STATS.reset()
    ring_attention(*(shard(t, "contiguous", world, rank, lengths=lengths) for t in (q, k, v)))
    res["ring/exchange"] = dict(STATS.calls)
    return res


def check_decode_and_linear(rank, world):
    res = {}
    # dist_decode: uneven cache slices (one may be empty) with padding
    g = torch.Generator().manual_seed(1)
    b, hq, hk, d, n = 2, 4, 2, 8, 29
    q = torch.randn(b, hq, 1, d, generator=g)
    k, v = torch.randn(b, hk, n, d, generator=g), torch.randn(b, hk, n, d, generator=g)
    kv = torch.ones(b, n, dtype=torch.bool)
    kv[1, :6] = False
    lens = [0] + split_lengths(n, world - 1) if world > 2 else split_lengths(n, world)
    s = sum(lens[:rank])
    STATS.reset()
    out, lse = dist_decode(q, k[:, :, s : s + lens[rank]], v[:, :, s : s + lens[rank]],
                           key_valid=kv[:, s : s + lens[rank]], return_lse=True)
    ref, ref_lse = reference.attention(q, k, v, causal=False, mask=kv[:, None, None, :])
    res["dist_decode"] = {"out": _err(out, ref), "lse": _err(lse, ref_lse), "calls": dict(STATS.calls)}
    # lasp2: uneven contiguous chunks, per-head decay, gradients
    n = 45
    lens = split_lengths(n, world)
    lens = [lens[0] + 3] + lens[1:-1] + [lens[-1] - 3] if world > 1 else lens
    s = sum(lens[:rank])
    lam = torch.tensor([0.9, 0.97, 1.0, 0.8])
    q, k, v, w = (torch.randn(1, 4, n, 8, generator=g) for _ in range(4))
    qf, kf, vf = (t.clone().requires_grad_(True) for t in (q, k, v))
    ref = linear_attention_naive(qf, kf, vf, decay=lam)
    (ref * w).sum().backward()
    ql, kl, vl = (t[:, :, s : s + lens[rank]].clone().requires_grad_(True) for t in (q, k, v))
    STATS.reset()
    out = lasp2(ql, kl, vl, decay=lam, block_size=8)
    fwd = dict(STATS.calls)
    STATS.reset()
    (out * w[:, :, s : s + lens[rank]]).sum().backward()
    sl = slice(s, s + lens[rank])
    res["lasp2"] = {"out": _err(out, ref[:, :, sl]), "dq": _err(ql.grad, qf.grad[:, :, sl]),
                    "dk": _err(kl.grad, kf.grad[:, :, sl]), "dv": _err(vl.grad, vf.grad[:, :, sl]),
                    "fwd": fwd, "bwd": dict(STATS.calls)}
    # LASP-2H: a linear layer then a softmax layer, distributed vs single process
    x = torch.randn(1, 4, n, 8, generator=g)
    lin = linear_attention_naive(x, x, x, decay=lam)
    full = reference.attention(lin, x[:, :2], x[:, :2], causal=True)[0]
    xl = x[:, :, sl]
    h1 = hybrid_attention("linear", xl, xl, xl, decay=lam, block_size=8)
    h2 = hybrid_attention("softmax", h1, xl[:, :2].contiguous(), xl[:, :2].contiguous())
    res["lasp2h"] = {"out": _err(h2, full[:, :, sl])}
    return res


def die_or_hang(rank, world, mode):
    """Rank 1 dies (or hangs); the others run ring attention and must fail with a clear error, in time."""
    q, k, v, _ = _full(0, n=16)
    if rank == 1:
        if mode == "die":
            os._exit(3)
        time.sleep(30)
        return None
    t0 = time.monotonic()
    try:
        ring_attention(*(shard(t, "contiguous", world, rank) for t in (q, k, v)), lengths=[8, 8])
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}", "elapsed": time.monotonic() - t0}
    return {"error": None, "elapsed": time.monotonic() - t0}


def check_sparse(rank, world):
    """Ring and all-gather-KV computing a global block layout sparsely equal the reference under its mask."""
    from longattn.bench.ops import random_layout

    n, bs = 128, 16
    q, k, v, w = _full(5, n=n)
    lay = random_layout(n, 4, bs, 0.4, 3)  # per query head
    mask = lay.to_dense_mask(causal=True)
    ref = _ref_masked(q, k, v, w, mask)
    res = {}
    lens = [32, 96] if world == 2 else [16, 48, 32, 32]
    for method, fn in (("ring", ring_attention), ("allgather", allgather_kv)):
        for layout in ("contiguous", "zigzag"):
            ll = lens if layout == "contiguous" else None
            ql, kl, vl = (shard(t, layout, world, rank, lengths=ll).clone().requires_grad_(True) for t in (q, k, v))
            all_lens = lens if layout == "contiguous" else [shard(q, layout, world, r).shape[2] for r in range(world)]
            out, lse = fn(ql, kl, vl, layout=layout, lengths=all_lens, blocks=lay, return_lse=True)
            (out * shard(w, layout, world, rank, lengths=ll)).sum().backward()
            r_out, r_lse, r_dq, r_dk, r_dv = (shard(t, layout, world, rank, lengths=ll) for t in ref)
            res[f"{method}/{layout}"] = {"out": _err(out, r_out), "lse": _err(lse, r_lse), "dq": _err(ql.grad, r_dq),
                                         "dk": _err(kl.grad, r_dk), "dv": _err(vl.grad, r_dv)}
    try:
        ring_attention(*(shard(t, "contiguous", world, rank, lengths=lens) for t in (q, k, v)),
                       lengths=[n - 3, 3] + [0] * (world - 2), blocks=lay)
    except ValueError as e:
        res["misaligned"] = str(e)
    return res


def _ref_masked(q, k, v, w, mask):
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out, lse = reference.attention(q, k, v, causal=True, mask=mask)
    (out * w).sum().backward()
    return out.detach(), lse.float(), q.grad, k.grad, v.grad


def sp_model_generate(rank, world, cases, ids, new):
    """Tiny random models' prompts prefilled sequence parallel, then greedy decoding (``sp_generate``): one
    result per ``(arch, mode)`` case."""
    from longattn.distributed.model import sp_generate
    from longattn.models import tiny_model

    out = {}
    for arch, mode in cases:
        model = tiny_model(arch, seed=0)
        out[(arch, mode)] = sp_generate(model, ids, mode, new, keep_logits=True)
    return out


def check_deepspeed(rank, world):
    """Ulysses through DeepSpeed's DistributedAttention vs ours and the single-process reference (outputs and
    gradients; contiguous equal shards, the layout DeepSpeed's all-to-all needs)."""
    n = 32
    q, k, v, w = _full(3, n=n)
    ref = _ref_grads(q, k, v, w)
    res = {}
    for backend in ("torch", "deepspeed"):
        ql, kl, vl = (shard(t, "contiguous", world, rank).clone().requires_grad_(True) for t in (q, k, v))
        wl = shard(w, "contiguous", world, rank)
        out = ulysses(ql, kl, vl, backend=backend)
        (out * wl).sum().backward()
        want = [shard(t, "contiguous", world, rank) for t in (ref[0], ref[2], ref[3], ref[4])]
        res[backend] = {name: _err(a, b) for name, a, b in
                        zip(("out", "dq", "dk", "dv"), (out, ql.grad, kl.grad, vl.grad), want)}
        res[backend]["out_tensor"] = out.detach()
    from longattn.distributed.model import sp_generate
    from longattn.models import tiny_model

    ids = torch.randint(4, 128, (36,), generator=torch.Generator().manual_seed(1)).tolist()
    res["model"] = sp_generate(tiny_model("llama", seed=0), ids, "ulysses", 4, backend="deepspeed", keep_logits=True)
    return res


def report_pid_and_sleep(rank, world, directory):
    """Writes this rank's pid to ``directory/rank{rank}`` and sleeps (a caller killed meanwhile)."""
    from pathlib import Path

    Path(directory, f"rank{rank}").write_text(str(os.getpid()))
    time.sleep(120)


def shutdown_waits_for_the_slowest(rank, world, slow=1):
    """Rank ``slow`` finishes its last collective and then dawdles; no other rank's shutdown may return before it
    has reached its own (the torchrun teardown that gloo aborts on when a peer closes early). With ``slow=0`` the
    rank that hosts the store arrives last and must still let the others read the count before it goes."""
    import time

    from longattn.distributed.comm import shutdown

    t = torch.ones(4)
    torch.distributed.all_reduce(t)
    if rank == slow:
        time.sleep(0.5)
    before = time.time()
    shutdown()
    return {"before": before, "after": time.time(), "initialised": torch.distributed.is_initialized()}
