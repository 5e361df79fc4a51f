"""BlockLayout: which key blocks each query block attends to, per batch row and query head.

Queries are split into blocks of ``block_size`` from query index 0, keys likewise from key index 0; queries
are aligned to the end of the keys (see ``reference.py``). A layout says *which blocks* are computed; the
kernel still applies the token-level causal rule inside the chosen blocks (``causal=True``), and, when the
layout carries a ``TokenRule``, that rule too (e.g. the exact columns and diagonals of vertical-slash, the
groups of shifted-group attention), so a pattern computes exactly the token pairs it chose.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .checks import check_block_size

__all__ = ["BlockLayout", "TokenRule"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, eq=False)
class TokenRule:
    """Token-level rule inside the selected blocks. A pair (query position ``qp``, key position ``kp``; ``qp``
    is absolute, i.e. query index + ``kv_len - q_len``) of a selected block is computed iff the causal/window
    rule allows it and at least one of the given terms holds (absent terms are False):

    - ``columns[b, h, kp]`` — vertical lines (bool ``[B, H, kv_len]``);
    - ``diagonals[b, h, qp - kp]`` — slash lines at distance ``qp - kp >= 0`` (bool ``[B, H, kv_len]``);
    - ``q_group[b, h, qp] == k_group[b, h, kp]`` — group-local attention (int ``[B, H, kv_len]`` each);
    - ``fn(b, h, qp, kp)`` — any element-wise predicate written with tensor ops (it runs both inside
      FlexAttention's ``mask_mod`` and on broadcast index tensors);
    - ``free[h]`` — heads for which the rule is off (every pair of the selected blocks is computed).

    ``B``/``H`` may be 1 (broadcast over batch/heads).
    """

    columns: torch.Tensor | None = None
    diagonals: torch.Tensor | None = None
    q_group: torch.Tensor | None = None
    k_group: torch.Tensor | None = None
    fn: Callable | None = None
    free: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.q_group is None) != (self.k_group is None):
            raise ValueError("q_group and k_group must be given together")
        for name in ("columns", "diagonals", "q_group", "k_group"):
            t = getattr(self, name)
            if t is not None and t.dim() != 3:
                raise ValueError(f"TokenRule.{name} must be [batch, heads, kv_len], got {tuple(t.shape)}")
        if all(getattr(self, n) is None for n in ("columns", "diagonals", "q_group", "fn")):
            raise ValueError("TokenRule needs at least one of columns, diagonals, q_group/k_group, fn")

    def __call__(self, b, h, qp, kp):
        """bool: may query position ``qp`` attend key position ``kp`` (broadcasting index tensors)."""
        ok = None
        if self.size is not None:  # positions beyond the keys (block padding) read the last entry
            qp = torch.clamp(qp, max=self.size - 1)
            kp = torch.clamp(kp, max=self.size - 1)

        def _or(a, x):
            return x if a is None else a | x

        if self.columns is not None:
            ok = _or(ok, self.columns[_bi(self.columns, b), _hi(self.columns, h), kp])
        if self.diagonals is not None:
            d = torch.clamp(qp - kp, min=0)
            ok = _or(ok, self.diagonals[_bi(self.diagonals, b), _hi(self.diagonals, h), d] & (qp >= kp))
        if self.q_group is not None:
            gq = self.q_group[_bi(self.q_group, b), _hi(self.q_group, h), qp]
            gk = self.k_group[_bi(self.k_group, b), _hi(self.k_group, h), kp]
            ok = _or(ok, gq == gk)
        if self.fn is not None:
            ok = _or(ok, self.fn(b, h, qp, kp))
        if self.free is not None:
            ok = ok | self.free[_hi1(self.free, h)]
        return ok

    @property
    def size(self) -> int | None:
        """Length of the position axis of the tensors (kv_len), when there are tensors."""
        for n in ("columns", "diagonals", "q_group"):
            t = getattr(self, n)
            if t is not None:
                return t.shape[-1]
        return None

    @property
    def heads(self) -> int:
        hs = [getattr(self, n).shape[1] for n in ("columns", "diagonals", "q_group", "k_group")
              if getattr(self, n) is not None]
        if self.free is not None:
            hs.append(self.free.shape[0])
        return max(hs, default=1)

    def select_heads(self, idx: torch.Tensor) -> TokenRule:
        """The rule for query heads ``idx`` only (new head ``i`` = old head ``idx[i]``)."""
        mv = {}
        for n in ("columns", "diagonals", "q_group", "k_group"):
            t = getattr(self, n)
            if t is not None and t.shape[1] > 1:
                mv[n] = t[:, idx.to(t.device)]
        if self.free is not None and self.free.shape[0] > 1:
            mv["free"] = self.free[idx.to(self.free.device)]
        if self.fn is not None:
            fn, table = self.fn, idx

            def sub(b, h, qp, kp):
                return fn(b, table[h], qp, kp)
            mv["fn"] = sub
        return replace(self, **mv)


def _bi(t, b):
    return b if t.shape[0] > 1 else b * 0


def _hi(t, h):
    return h if t.shape[1] > 1 else h * 0


def _hi1(t, h):
    return h if t.shape[0] > 1 else h * 0


@dataclass(frozen=True)
class BlockLayout:
    """Per (batch, query head, query block) the kv blocks to attend.

    kv_indices: int32 ``[batch, heads, n_q_blocks, max_k]``, the first ``kv_counts`` entries of each row are
        valid kv block ids, ascending, distinct; the rest is padding (ignored).
    kv_counts: int32 ``[batch, heads, n_q_blocks]``.
    rule: optional ``TokenRule`` applied to the token pairs of the selected blocks.
    full: optional bool ``[B, H, n_q_blocks, n_kv_blocks]`` (B/H may be 1): blocks where the pattern guarantees
        its token rule allows every pair; kernels may skip the rule there (FlexAttention "full" blocks). It is
        a promise about the rule only; the causal/window/padding rules are still applied where they cut a block.
    """

    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    block_size: int
    q_len: int
    kv_len: int
    rule: TokenRule | None = None
    full: torch.Tensor | None = None

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
        rule: TokenRule | None = None,
        full: torch.Tensor | None = None,
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
        return cls(order.to(torch.int32).contiguous(), counts.contiguous(), block_size, q_len, kv_len, rule, full)

    @classmethod
    def from_indices(
        cls, idx: torch.Tensor, valid: torch.Tensor, *, block_size: int, q_len: int, kv_len: int,
        rule: TokenRule | None = None,
    ) -> BlockLayout:
        """From candidate block ids ``idx [b, h, nqb, c]`` (any order, duplicates allowed, out-of-range ignored
        where ``valid`` is False). Goes through a block mask, so the result is sorted and distinct."""
        nkb = _cdiv(kv_len, block_size)
        b, h, nqb, _ = idx.shape
        m = torch.zeros(b, h, nqb, nkb + 1, dtype=torch.bool, device=idx.device)
        safe = torch.where(valid & (idx >= 0) & (idx < nkb), idx.long(), torch.full_like(idx.long(), nkb))
        m.scatter_(-1, safe, True)
        return cls.from_block_mask(m[..., :nkb], block_size=block_size, q_len=q_len, kv_len=kv_len, rule=rule)

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

    def to_dense_mask(self, causal: bool = True, window: int | None = None, heads: int | None = None) -> torch.Tensor:
        """bool ``[b, h, q_len, kv_len]``: the token pairs the kernel computes (blocks x causal x token rule)."""
        return self.mask_rows(None, causal=causal, window=window, heads=heads)

    def mask_rows(
        self, rows: torch.Tensor | None, causal: bool = True, window: int | None = None, heads: int | None = None
    ) -> torch.Tensor:
        """bool ``[b, h, len(rows), kv_len]``: ``to_dense_mask`` restricted to query indices ``rows``; ``heads``
        broadcasts a one-head layout (default: the layout's or the rule's head count)."""
        bm = self.to_block_mask()
        h = heads or max(bm.shape[1], self.rule.heads if self.rule is not None else 1)
        bm = bm.expand(bm.shape[0], h, *bm.shape[2:])
        bs = self.block_size
        dev = bm.device
        rows = torch.arange(self.q_len, device=dev) if rows is None else rows.to(dev).long()
        m = bm[:, :, rows // bs].repeat_interleave(bs, dim=3)[..., : self.kv_len]
        qp = (rows + self.kv_len - self.q_len)[:, None]
        kp = torch.arange(self.kv_len, device=dev)[None, :]
        tok = torch.ones(rows.numel(), self.kv_len, dtype=torch.bool, device=dev)
        if causal:
            tok = kp <= qp
        if window is not None:
            tok = tok & ((qp - kp) < window)
        m = m & tok
        if self.rule is not None:
            b, h = m.shape[:2]
            qp = (rows + self.kv_len - self.q_len).view(1, 1, -1, 1)
            kp = torch.arange(self.kv_len, device=dev).view(1, 1, 1, -1)
            bi = torch.arange(b, device=dev).view(-1, 1, 1, 1)
            hi = torch.arange(h, device=dev).view(1, -1, 1, 1)
            m = m & self.rule(bi, hi, qp, kp)
        return m

    def select_heads(self, idx: torch.Tensor) -> BlockLayout:
        """The layout for query heads ``idx`` only (a one-head layout broadcasts and stays as it is)."""
        if self.heads == 1 and (self.rule is None or self.rule.heads == 1):
            return self
        lay = self
        if self.heads > 1:
            i = idx.to(self.kv_indices.device)
            lay = replace(lay, kv_indices=self.kv_indices[:, i], kv_counts=self.kv_counts[:, i],
                          full=None if self.full is None or self.full.shape[1] == 1 else self.full[:, i])
        if self.rule is not None:
            lay = replace(lay, rule=self.rule.select_heads(idx))
        return lay

    def density(
        self, causal: bool = True, per_head: bool = False, exact: bool = False, rows: torch.Tensor | None = None
    ) -> torch.Tensor | float:
        """Fraction of the (causal) token pairs that the layout computes; mean over batch and heads
        unless ``per_head`` (then ``[b, h]``). By default counts whole selected blocks (the kernel's work);
        ``exact=True`` counts the pairs the token rule keeps (on query indices ``rows`` only, if given)."""
        if exact and self.rule is not None:
            rows_ = torch.arange(self.q_len) if rows is None else rows.long()
            chosen = torch.zeros((), dtype=torch.float64)
            total = torch.zeros((), dtype=torch.float64)
            for c in rows_.split(max(1, (1 << 24) // max(self.kv_len, 1))):
                m = self.mask_rows(c, causal=causal)
                chosen = chosen + m.sum((-1, -2)).double()
                qp = c.to(m.device) + self.kv_len - self.q_len
                total = total + ((qp + 1).clamp(max=self.kv_len).sum() if causal else c.numel() * self.kv_len)
            d = chosen / total.clamp_min(1)
            return d if per_head else float(d.mean())
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
