"""Base class of sparse prefill patterns: a frozen dataclass whose ``layout()`` returns a BlockLayout."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import BlockLayout, check_block_size

__all__ = ["PrefillPattern"]


@dataclass(frozen=True)
class PrefillPattern:
    """A sparse prefill pattern. Subclasses implement ``layout(q, k)``."""

    block_size: int = 64
    backend: str = "auto"

    def __post_init__(self) -> None:
        check_block_size(self.block_size)
        from ..ops.block_sparse import BACKENDS

        if self.backend not in ("auto",) + BACKENDS:
            raise ValueError(f"backend must be one of auto, {', '.join(BACKENDS)}; got {self.backend!r}")

    def layout(self, q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None = None) -> BlockLayout:
        """Blocks to compute for ``q [b, h, nq, d]`` over ``k [b, hkv, nk, d]``; ``key_valid [b, nk]`` marks
        left padding, so that position-based patterns start at each row's first real token."""
        raise NotImplementedError  # pragma: no cover - abstract
