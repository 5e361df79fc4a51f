"""Memory really held: the bytes of the storages behind tensors, each storage counted once.

``numel() * element_size()`` undercounts a view that keeps a larger tensor alive (a slice of the full cache
after "compression") and double-counts two views of one storage; the storage is what the allocator holds.
``storage_nbytes(*objs)`` walks tensors, containers (dict, list, tuple, set) and objects that say what they
hold (``held_tensors()``), and sums each distinct storage once.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["tensors_in", "storage_nbytes"]


def tensors_in(obj, _depth: int = 0) -> Iterator[torch.Tensor]:
    """Every tensor reachable from ``obj`` (tensors, containers, ``held_tensors()``)."""
    if _depth > 8 or obj is None:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v, _depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from tensors_in(v, _depth + 1)
    elif hasattr(obj, "held_tensors"):
        for v in obj.held_tensors():
            yield from tensors_in(v, _depth + 1)


def storage_nbytes(*objs, seen: set | None = None) -> int:
    """Bytes of the distinct storages behind every tensor reachable from ``objs``; ``seen`` (storage keys)
    carries over between calls so that a storage shared by two objects is counted once in a total."""
    seen = set() if seen is None else seen
    total = 0
    for obj in objs:
        for t in tensors_in(obj):
            st = t.untyped_storage()
            key = (st.device.type, st.device.index, st.data_ptr(), st.nbytes())
            if st.nbytes() == 0 or key in seen:
                continue
            seen.add(key)
            total += st.nbytes()
    return total
