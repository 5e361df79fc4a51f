"""StreamingLLM KV policy: keep the attention sinks and the most recent tokens.

Paper: "Efficient Streaming Language Models with Attention Sinks" (Xiao et al., ICLR 2024,
https://arxiv.org/abs/2309.17453). Departures: applied once at the end of prefill with a budget of
``int(n * (1 - ratio))`` tokens (as kvpress's ``StreamingLLMPress``), not as a rolling cache; with left
padding the sinks are the first ``sink`` *valid* tokens of each row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int
from ..registry import register
from .base import KVPolicy, press_changes

__all__ = ["StreamingLLM"]


@register(
    "streaming_llm",
    "kv",
    paper="StreamingLLM (Xiao et al., ICLR 2024) https://arxiv.org/abs/2309.17453",
    summary="keep sink first tokens + the most recent ones",
)
@dataclass(frozen=True)
class StreamingLLM(KVPolicy):
    """Sinks + recent tokens."""

    renamed = {"n_sink": "sink"}  # old spellings, accepted with a FutureWarning

    kvpress_press = "StreamingLLMPress"
    examples = ({}, {"sink": 0})

    sink: int = 4

    def kvpress_kwargs(self) -> dict | None:
        return press_changes({"n_sink": self.sink}, {"n_sink": 4})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.sink, "sink", 0)

    def reference_scores(self, q, k, v, key_valid=None, module=None):
        """Loop by loop: the first ``sink`` real tokens of the row first, then the most recent ones."""
        b, hk, n = k.shape[:3]
        out = torch.zeros(b, hk, n, dtype=torch.float64)
        for bi in range(b):
            real = [j for j in range(n) if key_valid is None or bool(key_valid[bi, j])]
            for rank, j in enumerate(real):
                out[bi, :, j] = 1e9 + j if rank < self.sink else j
        return out

    def score(self, q, k, v, key_valid, module=None) -> torch.Tensor:
        b, hk, n, _ = k.shape
        pos = torch.arange(n, device=k.device, dtype=torch.float32).expand(b, n)
        if key_valid is not None:
            first = (~key_valid.to(torch.bool)).sum(-1, keepdim=True).float()  # left padding
            rel = pos - first
        else:
            rel = pos
        s = rel.clone()
        s[rel < self.sink] = float(2 * n)  # sinks above every recent token
        return s.unsqueeze(1).expand(b, hk, n).contiguous()
