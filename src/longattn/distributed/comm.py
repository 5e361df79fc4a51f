"""Collectives used by the sequence-parallel methods, counted and timed, with clear errors when a peer is lost.

Everything goes through torch.distributed (NCCL on GPUs, gloo on CPU); no transport of our own. Each helper
records, in the process-wide ``STATS``, how many collectives of each kind ran, the bytes this rank sent, and
the seconds spent waiting for communication, so tests can assert the number of collectives an algorithm makes
and ``dist-bench`` can report compute vs wait per rank. A failed or timed-out collective (a rank died, or hung
past the process group's timeout) is re-raised as ``PeerLostError`` naming the method and the rank.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["STATS", "CommStats", "PeerLostError", "world", "all_gather_equal", "all_gather_var", "exchange_lengths",
           "all_to_all", "reduce_scatter_var", "all_reduce", "ring_exchange", "wait_all", "guard", "compute_timer",
           "shutdown"]


class PeerLostError(RuntimeError):
    """A collective failed or timed out: a peer rank died, or did not answer within the group's timeout."""


@dataclass
class CommStats:
    calls: Counter = field(default_factory=Counter)  # collective kind -> count
    bytes_sent: int = 0
    wait_s: float = 0.0
    compute_s: float = 0.0

    def reset(self) -> None:
        self.calls.clear()
        self.bytes_sent = 0
        self.wait_s = 0.0
        self.compute_s = 0.0

    def snapshot(self) -> dict:
        return {"calls": dict(self.calls), "bytes_sent": self.bytes_sent, "wait_s": self.wait_s,
                "compute_s": self.compute_s}


STATS = CommStats()


def world(group=None) -> tuple[int, int]:
    """``(rank, world size)`` in ``group``; a clear error when no process group is initialised."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: torch.distributed is not initialised (call torch.distributed.init_process_group, "
                         "or use longattn.distributed.launch.spawn)")
    return dist.get_rank(group), dist.get_world_size(group)


@contextlib.contextmanager
def guard(method: str, group=None):
    """Re-raise communication failures as ``PeerLostError`` naming ``method`` and this rank; time the wait."""
    t0 = time.perf_counter()
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, PeerLostError):
            raise
        rank = dist.get_rank(group) if dist.is_initialized() else -1
        raise PeerLostError(f"{method}: rank {rank} lost contact with its peers (a rank died, or did not answer "
                            f"within the process group's timeout): {str(e).strip().splitlines()[0][:200]}") from e
    finally:
        STATS.wait_s += time.perf_counter() - t0


@contextlib.contextmanager
def compute_timer():
    t0 = time.perf_counter()
    try:
        yield
    finally:
        STATS.compute_s += time.perf_counter() - t0


def shutdown(ok: bool = True, timeout_s: float = 600.0) -> None:
    """Destroy the default process group; with ``ok`` (this rank finished without error) only once every rank
    has reached this point.

    Gloo aborts the process (``terminate`` on an ``IoException`` raised in its event-loop thread) when a peer
    closes its sockets while this rank's last collective still has traffic in flight; the first rank to finish
    must not tear down early. The rendezvous goes through the process group's key-value store, not gloo, so it
    adds no gloo traffic of its own. After an error (``ok=False``) the group is destroyed at once: the other
    ranks may be blocked in a collective this rank will never join, and waiting for them would hang.
    """
    if not dist.is_available() or not dist.is_initialized():
        return
    try:
        if ok:
            _rendezvous(timeout_s)
    finally:
        dist.destroy_process_group()


def _rendezvous(timeout_s: float) -> None:
    """Every rank waits until all have arrived. Two phases on the store: all ranks count in and wait for the
    full count; then the others acknowledge and rank 0 waits for that, because rank 0 may host the store
    (``init_method="env://"``) and must not take it away while another rank is still polling it."""
    from torch.distributed import distributed_c10d as c10d

    get_store = getattr(c10d, "_get_default_store", None)  # private in torch; dist.barrier() if it goes
    if get_store is None:
        dist.barrier()
        return
    store, world_size, rank = get_store(), dist.get_world_size(), dist.get_rank()
    deadline = time.monotonic() + timeout_s

    def wait(key: str, count: int) -> None:
        while store.add(key, 0) < count:
            if time.monotonic() > deadline:
                raise PeerLostError(f"shutdown: rank {rank} waited {timeout_s:.0f} s for the other ranks to finish")
            time.sleep(0.005)

    store.add("longattn/shutdown", 1)
    wait("longattn/shutdown", world_size)
    if rank == 0:
        wait("longattn/shutdown_seen", world_size - 1)
    else:
        store.add("longattn/shutdown_seen", 1)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_gather_equal(x: torch.Tensor, method: str, group=None) -> torch.Tensor:
    """``[world, *x.shape]``: every rank's ``x`` (same shape everywhere). One all-gather."""
    _, p = world(group)
    out = torch.empty((p, *x.shape), dtype=x.dtype, device=x.device)
    with guard(method, group):
        dist.all_gather_single(out.view(-1), x.contiguous().view(-1), group=group)
    STATS.calls["all_gather"] += 1
    STATS.bytes_sent += _nbytes(x)
    return out


def exchange_lengths(n: int, method: str, group=None, device=None) -> list[int]:
    """Every rank's local sequence length (one small all-gather, counted as ``lengths``)."""
    t = torch.tensor([n], dtype=torch.int64, device=device)
    _, p = world(group)
    out = torch.empty(p, dtype=torch.int64, device=device)
    with guard(method, group):
        dist.all_gather_single(out, t, group=group)
    STATS.calls["lengths"] += 1
    return [int(x) for x in out.tolist()]


def all_gather_var(x: torch.Tensor, lengths: list[int], dim: int, method: str, group=None) -> list[torch.Tensor]:
    """Every rank's ``x``, whose size along ``dim`` is ``lengths[rank]`` (padded to the longest for the one
    all-gather, trimmed after)."""
    r, _ = world(group)
    m = max(lengths)
    pad = m - x.shape[dim]
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_zeros(shape)], dim)
    got = all_gather_equal(x, method, group)
    return [got[i].narrow(dim, 0, n) for i, n in enumerate(lengths)]


def reduce_scatter_var(x: torch.Tensor, lengths: list[int], dim: int, method: str, group=None) -> torch.Tensor:
    """``x`` is the concatenation along ``dim`` of one part per rank (sizes ``lengths``); every rank gets the sum
    over ranks of its own part. One reduce-scatter (parts padded to the longest)."""
    r, p = world(group)
    m = max(lengths)
    parts = list(torch.split(x, lengths, dim))
    padded = []
    for part, n in zip(parts, lengths):
        if n < m:
            shape = list(part.shape)
            shape[dim] = m - n
            part = torch.cat([part, part.new_zeros(shape)], dim)
        padded.append(part.movedim(dim, 0).contiguous())
    inp = torch.stack(padded)  # [p, m, ...]
    out = torch.empty_like(inp[0])
    with guard(method, group):
        dist.reduce_scatter_single(out.view(-1), inp.view(-1), group=group)
    STATS.calls["reduce_scatter"] += 1
    STATS.bytes_sent += _nbytes(inp) * (p - 1) // p
    return out[: lengths[r]].movedim(0, dim)


def all_reduce(x: torch.Tensor, method: str, group=None) -> torch.Tensor:
    with guard(method, group):
        dist.all_reduce(x, group=group)
    STATS.calls["all_reduce"] += 1
    STATS.bytes_sent += _nbytes(x)
    return x


def all_to_all(x: torch.Tensor, in_splits: list[int], out_splits: list[int], out_shape_rest: tuple, method: str,
               group=None) -> torch.Tensor:
    """``all_to_all_single`` along dim 0: ``x [sum(in_splits), ...]`` -> ``[sum(out_splits), *out_shape_rest]``."""
    out = torch.empty((sum(out_splits), *out_shape_rest), dtype=x.dtype, device=x.device)
    with guard(method, group):
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=out_splits, input_split_sizes=in_splits,
                               group=group)
    STATS.calls["all_to_all"] += 1
    r, _ = world(group)
    row = x[0].numel() * x.element_size() if x.shape[0] else 0
    STATS.bytes_sent += (sum(in_splits) - in_splits[r]) * row
    return out


def ring_exchange(send: torch.Tensor, recv_shape: tuple, method: str, group=None):
    """Post one send of ``send`` to the next rank and one receive (``recv_shape``) from the previous rank, both
    non-blocking in one ``batch_isend_irecv`` (never a blocking send before a receive: that deadlocks on gloo).
    Returns ``(requests, recv buffer)``; wait with ``wait_all``."""
    r, p = world(group)
    buf = torch.empty(recv_shape, dtype=send.dtype, device=send.device)
    nxt, prv = (r + 1) % p, (r - 1) % p
    if group is not None:
        nxt, prv = dist.get_global_rank(group, nxt), dist.get_global_rank(group, prv)
    ops = [dist.P2POp(dist.isend, send.contiguous(), nxt, group), dist.P2POp(dist.irecv, buf, prv, group)]
    with guard(method, group):
        reqs = dist.batch_isend_irecv(ops)
    STATS.calls["send"] += 1
    STATS.bytes_sent += _nbytes(send)
    return reqs, buf


def wait_all(reqs, method: str, group=None) -> None:
    with guard(method, group):
        for q in reqs:
            q.wait()
