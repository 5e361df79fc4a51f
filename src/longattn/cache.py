"""The KV cache: a transformers cache layer that can hold a compressed, per-head ragged prefix.

``LongattnLayer`` behaves like transformers' ``DynamicLayer`` until a KV policy compresses it at the end of
prefill. Then it holds:

- ``prefix``: a ``RaggedKV`` with each (batch row, kv head)'s kept tokens *packed* one after another
  (``[total_kept, dim]``), no padding back to the longest head, plus their original positions (int32);
- ``keys`` / ``values``: the uniform *tail* ``[b, kv_heads, t, dim]`` of tokens appended after compression
  (question, generated tokens), exactly as ``DynamicLayer`` stores them.

``get_seq_length()`` reports the *logical* length (tokens seen, compressed or not), so that transformers'
positions, masks and ``generate`` bookkeeping stay those of the uncompressed sequence. ``nbytes()`` is what
the layer really holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

__all__ = ["LongattnLayer", "RaggedKV", "cache_nbytes"]


@dataclass
class RaggedKV:
    """Per (batch, kv head) kept tokens, packed: row ``r = b * heads + h`` owns ``[offsets[r], offsets[r+1])``."""

    keys: torch.Tensor  # [total, d]
    values: torch.Tensor  # [total, d]
    positions: torch.Tensor  # [total] int32, position in the uncompressed sequence
    lengths: torch.Tensor  # [b, h] int64 (on CPU)
    logical_len: int  # tokens of the uncompressed prefix

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def heads(self) -> int:
        return self.lengths.shape[1]

    @property
    def uniform(self) -> bool:
        return bool((self.lengths == self.lengths.view(-1)[0]).all())

    @property
    def offsets(self) -> torch.Tensor:
        return torch.nn.functional.pad(self.lengths.view(-1).cumsum(0), (1, 0))

    def row(self, b: int, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views (no copy) of one (batch, head)'s kept keys, values, positions."""
        off = self.offsets
        r = b * self.heads + h
        s, e = int(off[r]), int(off[r + 1])
        return self.keys[s:e], self.values[s:e], self.positions[s:e]

    def as_uniform(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[b, h, kept, d]`` views, valid only when every row keeps the same number of tokens."""
        if not self.uniform:
            raise ValueError("as_uniform: rows keep different numbers of tokens (per-head budgets)")
        b, h = self.lengths.shape
        n = int(self.lengths.view(-1)[0])
        d = self.keys.shape[-1]
        return self.keys.view(b, h, n, d), self.values.view(b, h, n, d), self.positions.view(b, h, n)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.positions))

    @classmethod
    def gather(cls, keys: torch.Tensor, values: torch.Tensor, idx: torch.Tensor, lengths: torch.Tensor) -> RaggedKV:
        """Pack ``keys/values [b, h, n, d]`` at ``idx [b, h, m]`` (first ``lengths[b, h]`` entries valid)."""
        b, h, n, d = keys.shape
        lengths = lengths.to(torch.long)
        slot = torch.arange(idx.shape[-1], device=idx.device)
        take = (slot < lengths.to(idx.device).unsqueeze(-1)).view(-1)
        flat = (torch.arange(b * h, device=idx.device).view(b, h, 1) * n + idx).view(-1)[take]
        k = keys.reshape(b * h * n, d).index_select(0, flat)
        v = values.reshape(b * h * n, d).index_select(0, flat)
        pos = idx.reshape(-1)[take].to(torch.int32)
        return cls(k, v, pos, lengths.cpu(), n)


class LongattnLayer(DynamicLayer):
    """A ``DynamicLayer`` that a KV policy can compress into a ragged per-head prefix (real memory freed)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.prefix: RaggedKV | None = None

    @classmethod
    def adopt(cls, layer: DynamicLayer) -> LongattnLayer:
        """Take over an uncompressed DynamicLayer's tensors (no copy)."""
        new = cls()
        if layer.is_initialized:
            new.lazy_initialization(layer.keys, layer.values)
            new.keys, new.values = layer.keys, layer.values
        return new

    # --- sizes ---------------------------------------------------------------------------------------
    @property
    def tail_len(self) -> int:
        if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
            return 0
        return self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return (self.prefix.logical_len if self.prefix is not None else 0) + self.tail_len

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def nbytes(self) -> int:
        n = self.prefix.nbytes() if self.prefix is not None else 0
        for t in (self.keys, self.values):
            if t is not None:
                n += t.numel() * t.element_size()
        return n

    # --- compression ---------------------------------------------------------------------------------
    def compress(self, idx: torch.Tensor, lengths: torch.Tensor) -> None:
        """Keep, per (batch, kv head), the tokens at ``idx`` (first ``lengths`` entries); free the rest."""
        if self.prefix is not None:
            raise ValueError("this cache layer is already compressed (a KV policy runs once, at the end of prefill)")
        if self.tail_len == 0:
            raise ValueError("nothing to compress: the cache layer is empty")
        self.prefix = RaggedKV.gather(self.keys, self.values, idx, lengths)
        # drop the full prefill tensors: from here on keys/values are the uniform tail
        self.keys = self.keys[..., :0, :].clone()
        self.values = self.values[..., :0, :].clone()

    # --- transformers hooks that cannot work on a ragged prefix ---------------------------------------
    def _refuse(self, what: str) -> None:
        if self.prefix is not None:
            raise ValueError(f"{what} is not supported on a compressed longattn cache (per-head ragged prefix)")

    def crop(self, tokens_to_remove: int) -> None:
        if self.prefix is not None and tokens_to_remove < 0 and -tokens_to_remove > self.tail_len:
            raise ValueError(
                f"crop: can remove at most the {self.tail_len} tokens appended after compression, "
                f"got {-tokens_to_remove}"
            )
        super().crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._refuse("batch_repeat_interleave (num_return_sequences / beam search)")
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._refuse("batch_select_indices")
        super().batch_select_indices(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._refuse("reorder_cache (beam search)")
        super().reorder_cache(beam_idx)

    def reset(self) -> None:
        self.prefix = None
        super().reset()


def cache_nbytes(cache) -> int:
    """Bytes held by the key/value tensors of a transformers cache (any layer type)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, LongattnLayer):
            total += layer.nbytes()
        else:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total
