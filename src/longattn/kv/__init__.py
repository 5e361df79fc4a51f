"""KV-cache policies applied at the end of prefill (one file per policy, discovered: a new file registers
itself)."""

from ..registry import discover

__all__ = discover(__name__, globals())
