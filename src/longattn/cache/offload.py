"""Offloaded blocks of a cache layer: a store on another device (CPU memory) and an LRU of loaded blocks.

InfLLM's ``offload=true`` moves complete memory blocks out of the cache layer into a ``BlockStore`` (the layer
frees them) and loads the blocks a step selects back through the LRU on the cache's device. The store reports
the bytes it holds on each device, so a user sees both what left the accelerator and what the host holds.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ..checks import check_int

__all__ = ["BlockStore"]


class BlockStore:
    """Blocks ``j -> (keys, values)`` (each ``[b, hk, block, d]``) kept on ``device``, loaded back through an LRU
    of at most ``capacity`` blocks. ``hits`` / ``misses`` count LRU lookups, ``offloaded`` the blocks put."""

    def __init__(self, device: str | torch.device = "cpu", capacity: int = 64) -> None:
        self.device = torch.device(device)
        self.capacity = check_int(capacity, "lru_blocks")
        self.blocks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.lru: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = self.misses = self.offloaded = 0

    def __contains__(self, j: int) -> bool:
        return j in self.blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def put(self, j: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Copy block ``j`` to the store (the caller frees it from the layer)."""
        self.blocks[j] = (keys.to(self.device, copy=True), values.to(self.device, copy=True))
        self.offloaded += 1

    def load(self, js: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks ``js`` on ``device`` through the LRU: ``(keys, values)`` each ``[b, hk, len(js), block, d]``."""
        for j in js:
            if j in self.lru:
                self.lru.move_to_end(j)
                self.hits += 1
            else:
                self.lru[j] = tuple(x.to(device) for x in self.blocks[j])
                self.misses += 1
                if len(self.lru) > self.capacity:
                    self.lru.popitem(last=False)
        pairs = [self.lru[j] if j in self.lru else tuple(x.to(device) for x in self.blocks[j]) for j in js]
        return torch.stack([p[0] for p in pairs], 2), torch.stack([p[1] for p in pairs], 2)

    def held_tensors(self) -> list:
        return [list(self.blocks.values()), list(self.lru.values())]

    def nbytes(self) -> int:
        from .nbytes import storage_nbytes

        return storage_nbytes(self)
