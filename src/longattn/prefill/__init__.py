"""Sparse prefill patterns; each returns a BlockLayout (one file per pattern, discovered: a new file registers
itself)."""

from ..registry import discover

__all__ = discover(__name__, globals())
