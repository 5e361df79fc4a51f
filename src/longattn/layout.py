"""BlockLayout: which key blocks each query block attends to, per batch row and query head.

Queries are split into blocks of ``block_size`` from query index 0, keys likewise from key index 0; queries
are aligned to the end of the keys (see ``reference.py``). A layout says *which blocks* are computed; the
kernel still applies the token-level causal rule inside the chosen blocks (``causal=True``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import dense_mask

__all__ = ["BlockLayout", "check_block_size"]


def check_block_size(block_size: int, name: str = "block_size") -> int:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 16:
        raise ValueError(f"{name} must be a power of two >= 16, got {block_size!r}")
    if block_size & (block_size - 1):
        raise ValueError(f"{name} must be a power of two >= 16 (16, 32, 64, 128, ...), got {block_size}")
    return block_size


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class BlockLayout:
    """Per (batch, query head, query block) the kv blocks to attend.

    kv_indices: int32 ``[batch, heads, n_q_blocks, max_k]``, the first ``kv_counts`` entries of each row are
        valid kv block ids, ascending, distinct; the rest is padding (ignored).
    kv_counts: int32 ``[batch, heads, n_q_blocks]``.
    """

    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    block_size: int
    q_len: int
    kv_len: int

    def __post_init__(self) -> None:
        check_block_size(self.block_size)
        if self.q_len <= 0 or self.kv_len <= 0:
            raise ValueError(f"q_len and kv_len must be positive, got {self.q_len}, {self.kv_len}")
        if self.kv_indices.dim() != 4 or self.kv_counts.dim() != 3:
            raise ValueError("kv_indices must be [b, h, n_q_blocks, max_k] and kv_counts [b, h, n_q_blocks]")
        if self.kv_indices.shape[:3] != self.kv_counts.shape:
            raise ValueError(
                f"kv_indices {tuple(self.kv_indices.shape)} and kv_counts {tuple(self.kv_counts.shape)} disagree"
            )
        if self.kv_indices.shape[2] != self.num_q_blocks:
            raise ValueError(
                f"layout has {self.kv_indices.shape[2]} query blocks but q_len={self.q_len} with "
                f"block_size={self.block_size} needs {self.num_q_blocks} (block size mismatch?)"
            )

    # ---- shape helpers -------------------------------------------------------------------------------
    @property
    def num_q_blocks(self) -> int:
        return _cdiv(self.q_len, self.block_size)

    @property
    def num_kv_blocks(self) -> int:
        return _cdiv(self.kv_len, self.block_size)

    @property
    def batch(self) -> int:
        return self.kv_indices.shape[0]

    @property
    def heads(self) -> int:
        return self.kv_indices.shape[1]

    # ---- construction --------------------------------------------------------------------------------
    @classmethod
    def from_block_mask(
        cls,
        mask: torch.Tensor,
        *,
        block_size: int,
        seq_len: int | None = None,
        q_len: int | None = None,
        kv_len: int | None = None,
    ) -> BlockLayout:
        """From a bool ``[b, h, n_q_blocks, n_kv_blocks]`` block mask (True = compute that block)."""
        check_block_size(block_size)
        if mask.dim() != 4 or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool [b, h, n_q_blocks, n_kv_blocks] tensor, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        if seq_len is not None:
            q_len = q_len if q_len is not None else seq_len
            kv_len = kv_len if kv_len is not None else seq_len
        if q_len is None or kv_len is None:
            raise ValueError("give seq_len=, or q_len= and kv_len=")
        if mask.shape[2] != _cdiv(q_len, block_size) or mask.shape[3] != _cdiv(kv_len, block_size):
            raise ValueError(
                f"mask has {mask.shape[2]}x{mask.shape[3]} blocks; q_len={q_len}, kv_len={kv_len} with "
                f"block_size={block_size} need {_cdiv(q_len, block_size)}x{_cdiv(kv_len, block_size)}"
            )
        counts = mask.sum(-1).to(torch.int32)
        max_k = max(int(counts.max().item()) if counts.numel() else 0, 1)
        # stable sort puts selected blocks first, in ascending block order
        order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[..., :max_k]
        return cls(order.to(torch.int32).contiguous(), counts.contiguous(), block_size, q_len, kv_len)

    @classmethod
    def from_indices(
        cls, idx: torch.Tensor, valid: torch.Tensor, *, block_size: int, q_len: int, kv_len: int
    ) -> BlockLayout:
        """From candidate block ids ``idx [b, h, nqb, c]`` (any order, duplicates allowed, out-of-range ignored
        where ``valid`` is False). Goes through a block mask, so the result is sorted and distinct."""
        nkb = _cdiv(kv_len, block_size)
        b, h, nqb, _ = idx.shape
        m = torch.zeros(b, h, nqb, nkb + 1, dtype=torch.bool, device=idx.device)
        safe = torch.where(valid & (idx >= 0) & (idx < nkb), idx.long(), torch.full_like(idx.long(), nkb))
        m.scatter_(-1, safe, True)
        return cls.from_block_mask(m[..., :nkb], block_size=block_size, q_len=q_len, kv_len=kv_len)

    # ---- views ---------------------------------------------------------------------------------------
    def to_block_mask(self) -> torch.Tensor:
        """bool ``[b, h, n_q_blocks, n_kv_blocks]``."""
        nkb = self.num_kv_blocks
        slot = torch.arange(self.kv_indices.shape[-1], device=self.kv_indices.device)
        valid = slot < self.kv_counts.unsqueeze(-1)
        m = torch.zeros(*self.kv_counts.shape, nkb + 1, dtype=torch.bool, device=self.kv_indices.device)
        idx = torch.where(valid, self.kv_indices.long(), torch.full_like(self.kv_indices.long(), nkb))
        m.scatter_(-1, idx, True)
        return m[..., :nkb]

    def to_dense_mask(self, causal: bool = True, window: int | None = None) -> torch.Tensor:
        """bool ``[b, h, q_len, kv_len]``: the token pairs the kernel computes (blocks x causal rule)."""
        bm = self.to_block_mask()
        bs = self.block_size
        m = bm.repeat_interleave(bs, dim=2).repeat_interleave(bs, dim=3)[..., : self.q_len, : self.kv_len]
        tok = dense_mask(self.q_len, self.kv_len, causal=causal, window=window, device=bm.device)
        return m & tok

    def density(self, causal: bool = True, per_head: bool = False) -> torch.Tensor | float:
        """Fraction of the (causal) token pairs that the layout computes; mean over batch and heads
        unless ``per_head`` (then ``[b, h]``)."""
        # computed block-wise to avoid the N x N mask: token pairs per (q block, kv block) under the rule
        tok_pairs = self._pairs_per_block(causal)  # [nqb, nkb]
        bm = self.to_block_mask().to(tok_pairs.dtype)
        chosen = (bm * tok_pairs).sum((-1, -2))
        total = tok_pairs.sum()
        d = chosen / total.clamp_min(1)
        return d if per_head else float(d.mean())

    def _pairs_per_block(self, causal: bool) -> torch.Tensor:
        bs, nq, nk = self.block_size, self.q_len, self.kv_len
        off = nk - nq
        dev = self.kv_indices.device
        qpos = torch.arange(nq, device=dev) + off
        qb = torch.arange(nq, device=dev) // bs
        nqb, nkb = self.num_q_blocks, self.num_kv_blocks
        kb_start = torch.arange(nkb, device=dev) * bs
        kb_end = torch.clamp(kb_start + bs, max=nk)  # exclusive
        if causal:
            # keys visible to query at qpos: [0, qpos]; count inside each kv block
            vis = (torch.minimum(qpos[:, None] + 1, kb_end[None, :]) - kb_start[None, :]).clamp_min(0)
        else:
            vis = (kb_end - kb_start)[None, :].expand(nq, nkb)
        out = torch.zeros(nqb, nkb, dtype=torch.float64, device=dev)
        out.index_add_(0, qb, vis.to(torch.float64))
        return out
