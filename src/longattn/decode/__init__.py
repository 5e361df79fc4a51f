"""Decode-time selectors: at each generated token, pick the cached tokens (pages, blocks, clusters) to attend
(one file per selector, discovered: a new file registers itself)."""

from ..registry import discover

__all__ = discover(__name__, globals())
