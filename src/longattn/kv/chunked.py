"""Chunked prefill compression: prefill ``chunk`` tokens at a time and compress each chunk as it arrives.

From kvpress's ``ChunkPress`` and chunked prefill in serving engines: the cache never holds more than the kept
tokens plus one chunk, which bounds prefill memory for long prompts. ``apply()`` sets
``generation_config.prefill_chunk_size`` so ``model.generate`` prefills in chunks (restored on exit); the bench
feeds the context chunk by chunk. Departure from a one-shot policy: each chunk is scored by its own queries
(its observation window is the chunk's end), so early chunks are compressed without seeing later text.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..checks import check_int
from ..registry import register
from .base import Wrapper

__all__ = ["Chunked"]


@register("chunked", "kv", paper="kvpress ChunkPress / chunked prefill",
          summary="prefill in chunks, compressing each chunk as it arrives (bounded peak memory)")
@dataclass(frozen=True)
class Chunked(Wrapper):
    """Prefill ``chunk`` tokens at a time and compress each chunk's tokens with the inner policy right after
    it, so the cache never holds more than the kept tokens plus one chunk. ``apply()`` sets
    ``generation_config.prefill_chunk_size`` so that ``model.generate`` prefills in chunks (restored on exit);
    the bench feeds the context chunk by chunk. Departure from a one-shot policy: each chunk is scored by its
    own queries (its observation window is the chunk's end)."""

    chunk: int = 1024
    repeat = True
    examples = ({"chunk": 32},)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.chunk, "chunk", 16, hint="tokens")
