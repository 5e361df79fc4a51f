"""The KV cache: packed per-head ragged storage (``ragged``), the transformers cache layer (``layer``), decode
page metadata (``pages``), the offload store (``offload``), the selectors' typed state (``state``) and the bytes
really held (``nbytes``)."""

from __future__ import annotations

import torch

from .layer import LongattnLayer
from .nbytes import storage_nbytes
from .offload import BlockStore
from .pages import PageMeta
from .ragged import RaggedKV
from .state import DecodeState

__all__ = ["BlockStore", "DecodeState", "LongattnLayer", "PageMeta", "RaggedKV", "cache_nbytes", "kept_fraction",
           "storage_nbytes"]


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


def kept_fraction(cache, positions) -> tuple[float, float] | None:
    """How much of the tokens at ``positions`` (logical positions, e.g. where the answer is written) a
    compressed cache still holds: ``(mean over compressed (layer, batch row, kv head) rows of the fraction of
    those tokens held (kept, or appended since the compression), fraction of the rows that keep all of them)``. Layers a KV policy did not compress
    (dense layers, sliding windows) are not counted; None when no layer is compressed or ``positions`` is
    empty."""
    want = torch.as_tensor(list(positions), dtype=torch.long)
    if want.numel() == 0:
        return None
    fracs = []
    for layer in getattr(cache, "layers", []):
        if not isinstance(layer, LongattnLayer) or not layer.compressed:
            continue
        b, h = layer.kept_lengths().shape
        tail = torch.arange(layer.prefix_logical_len, layer.get_seq_length())  # appended since: all held
        for i in range(b):
            for j in range(h):
                held = torch.cat([layer.kept(i, j).to(torch.long).cpu(), tail])
                fracs.append(float(torch.isin(want, held).double().mean()))
    if not fracs:
        return None
    return sum(fracs) / len(fracs), sum(f == 1.0 for f in fracs) / len(fracs)
