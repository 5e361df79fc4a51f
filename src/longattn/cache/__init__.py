"""The KV cache: packed per-head ragged storage (``ragged``), the transformers cache layer (``layer``), decode
page metadata (``pages``), the offload store (``offload``), the selectors' typed state (``state``) and the bytes
really held (``nbytes``)."""

from __future__ import annotations

from .layer import LongattnLayer
from .nbytes import storage_nbytes
from .offload import BlockStore
from .pages import PageMeta
from .ragged import RaggedKV
from .state import DecodeState

__all__ = ["BlockStore", "DecodeState", "LongattnLayer", "PageMeta", "RaggedKV", "cache_nbytes", "storage_nbytes"]


def cache_nbytes(cache) -> int:
    """Bytes held by a transformers cache (any layer type): the distinct storages behind its keys and values,
    with a decode selector's state (page metadata, representatives, centroids, offload store) where there is
    one. A storage shared by two layers is counted once."""
    seen: set = set()
    total = 0
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, LongattnLayer):
            total += layer.nbytes(seen) + layer.decode_nbytes(seen)
        else:
            total += storage_nbytes(getattr(layer, "keys", None), getattr(layer, "values", None), seen=seen)
    return total
