"""Start ``nproc`` local processes in a gloo process group on 127.0.0.1 and collect what each returns.

Used by ``longattn dist-bench`` and the tests. Every process gets ``torch.set_num_threads(threads)`` and a
process group with ``timeout_s`` on its collectives; the whole launch is bounded too (``timeout_s`` plus the
start-up), so a hung rank cannot hang the caller: its process is killed and reported; on Linux a rank also dies
with the process that launched it (a killed caller leaves no ranks computing).
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile
import time
import traceback
from pathlib import Path

from ..checks import check_int

__all__ = ["spawn", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent(parent: int) -> None:
    """Linux: this rank is killed when the launching process dies (a killed bench or test must not leave its ranks
    computing); elsewhere a no-op."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _entry(fn, rank: int, world: int, port: int, timeout_s: float, threads: int, out_dir: str, args,
           parent: int | None = None) -> None:
    if parent is not None:
        _die_with_parent(parent)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    res: dict = {"rank": rank}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        res["result"] = fn(rank, world, *args)
        res["ok"] = True
    except BaseException as e:  # reported to the parent, which decides
        res["ok"] = False
        res["error"] = f"{type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc()
    finally:
        Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(res))
        if dist.is_initialized() and res.get("ok"):
            dist.destroy_process_group()
    os._exit(0 if res.get("ok") else 1)


def spawn(fn, nproc: int, args: tuple = (), *, timeout_s: float = 60.0, threads: int = 1,
          startup_s: float = 60.0) -> list[dict]:
    """Run ``fn(rank, world, *args)`` in ``nproc`` processes (``fn`` importable by name). Returns per rank
    ``{"rank", "ok", "result" | "error", "traceback"}``; a process that died without reporting, or was still
    running ``timeout_s + startup_s`` after the start, is reported as not ok."""
    import multiprocessing as mp

    check_int(nproc, "nproc")
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="longattn-dist-") as tmp:
        procs = [ctx.Process(target=_entry, args=(fn, r, nproc, port, timeout_s, threads, tmp, args, os.getpid()),
                             daemon=True) for r in range(nproc)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s + startup_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        out = []
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                p.join()
                out.append({"rank": r, "ok": False, "error": f"rank {r} still running after {timeout_s + startup_s:.0f} s: killed"})
                continue
            f = Path(tmp, f"rank{r}.pkl")
            if f.exists():
                out.append(pickle.loads(f.read_bytes()))
            else:
                out.append({"rank": r, "ok": False, "error": f"rank {r} exited with code {p.exitcode} without a result"})
        return out
