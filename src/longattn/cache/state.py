"""Typed state of a decode-time selector, kept in the cache layer (``LongattnLayer.decode_state``).

A selector's state describes the layer's physical tokens (page metadata, representatives, centroids, selection
caches); it lives with the cache, so it is per generation and freed with it, and every operation that rewrites
the tokens (compress, evict, crop, reset) clears it. Each state reports the bytes it holds (deduplicated
storages, ``cache.nbytes.storage_nbytes``), so the cache's byte count includes it.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["DecodeState"]


@dataclasses.dataclass
class DecodeState:
    """Base of the selectors' states: a mutable dataclass whose tensor fields (and containers of tensors, and
    objects with ``held_tensors()``) are what it holds in memory."""

    def held_tensors(self) -> list:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    def nbytes(self) -> int:
        from .nbytes import storage_nbytes

        return storage_nbytes(self)

    def tensors(self) -> list[torch.Tensor]:
        from .nbytes import tensors_in

        return list(tensors_in(self))
