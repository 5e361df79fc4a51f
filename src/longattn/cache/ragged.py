"""Packed per-head ragged storage of a compressed cache prefix.

Each (batch row, kv head) keeps a different number of tokens after a per-head KV policy; they are packed one
row after another (``[total_kept, dim]``), never padded back to the longest row, with their original positions
(int32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RaggedKV"]


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

    def rows(self):
        """``(b, h, keys, values, positions)`` views of every row, offsets computed once (the decode hot path)."""
        off = self.offsets.tolist()
        for r in range(len(off) - 1):
            s, e = off[r], off[r + 1]
            yield r // self.heads, r % self.heads, self.keys[s:e], self.values[s:e], self.positions[s:e]

    def as_uniform(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[b, h, kept, d]`` views, valid only when every row keeps the same number of tokens."""
        if not self.uniform:
            raise ValueError("as_uniform: rows keep different numbers of tokens (per-head budgets)")
        b, h = self.lengths.shape
        n = int(self.lengths.view(-1)[0])
        d = self.keys.shape[-1]
        return self.keys.view(b, h, n, d), self.values.view(b, h, n, d), self.positions.view(b, h, n)

    def held_tensors(self) -> list:
        return [self.keys, self.values, self.positions, self.lengths]

    def nbytes(self) -> int:
        """Bytes of the storages behind the packed keys, values and positions (and the row lengths)."""
        from .nbytes import storage_nbytes

        return storage_nbytes(self)

    @classmethod
    def gather(cls, keys: torch.Tensor, values: torch.Tensor, idx: torch.Tensor, lengths: torch.Tensor,
               offset: int = 0) -> RaggedKV:
        """Pack ``keys/values [b, h, n, d]`` at ``idx [b, h, m]`` (first ``lengths[b, h]`` entries valid);
        positions are ``idx + offset``."""
        b, h, n, d = keys.shape
        lengths = lengths.to(torch.long)
        slot = torch.arange(idx.shape[-1], device=idx.device)
        take = (slot < lengths.to(idx.device).unsqueeze(-1)).view(-1)
        flat = (torch.arange(b * h, device=idx.device).view(b, h, 1) * n + idx).view(-1)[take]
        k = keys.reshape(b * h * n, d).index_select(0, flat)
        v = values.reshape(b * h * n, d).index_select(0, flat)
        pos = (idx.reshape(-1)[take] + offset).to(torch.int32)
        return cls(k, v, pos, lengths.cpu(), n + offset)

    @classmethod
    def from_uniform(cls, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> RaggedKV:
        b, h, n, d = keys.shape
        lengths = torch.full((b, h), n, dtype=torch.long)
        logical = int(positions.max()) + 1 if positions.numel() else 0
        return cls(keys.reshape(-1, d), values.reshape(-1, d), positions.reshape(-1), lengths, logical)

    def select_rows(self, idx: torch.Tensor) -> RaggedKV:
        """The cache of batch rows ``idx`` (new row ``i`` = old row ``idx[i]``; repeats allowed), packed anew."""
        off = self.offsets.tolist()
        h = self.heads
        ks, vs, ps, lens = [], [], [], []
        for b in idx.tolist():
            for hh in range(h):
                s, e = off[b * h + hh], off[b * h + hh + 1]
                ks.append(self.keys[s:e])
                vs.append(self.values[s:e])
                ps.append(self.positions[s:e])
            lens.append(self.lengths[b])
        return RaggedKV(torch.cat(ks), torch.cat(vs), torch.cat(ps), torch.stack(lens), self.logical_len)

    @classmethod
    def concat(cls, a: RaggedKV, b: RaggedKV) -> RaggedKV:
        """Row-wise concatenation (``a``'s tokens first) of two packed caches of the same (batch, heads)."""
        if a.lengths.shape != b.lengths.shape:
            raise ValueError(f"concat: row shapes differ {tuple(a.lengths.shape)} vs {tuple(b.lengths.shape)}")
        oa, ob = a.offsets.tolist(), b.offsets.tolist()
        ks, vs, ps = [], [], []
        for r in range(len(oa) - 1):
            for src, off in ((a, oa), (b, ob)):
                ks.append(src.keys[off[r] : off[r + 1]])
                vs.append(src.values[off[r] : off[r + 1]])
                ps.append(src.positions[off[r] : off[r + 1]])
        return cls(torch.cat(ks), torch.cat(vs), torch.cat(ps), a.lengths + b.lengths, max(a.logical_len, b.logical_len))
