"""DuoAttention: retrieval heads keep the whole cache, streaming heads keep sinks + recent tokens.

Paper: "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads" (Xiao et al.,
ICLR 2025, https://arxiv.org/abs/2410.10819). Which kv heads are retrieval heads comes from a profile
(``longattn profile heads``: trained gates as in the paper, or a training-free retrieval score); the
``ratio`` sets how many heads stream: the lowest-scored heads of the whole model become streaming heads until
the cache is compressed by ``ratio`` (the paper thresholds the gates instead). Heads keep different numbers of
tokens; the cache stores them ragged, so the memory is really freed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int
from ..hf import kv_heads
from ..profiles import load_profile
from ..registry import register
from .base import KVPolicy, mask_padding, valid_lengths

__all__ = ["DuoAttention"]


@register("duo_attention", "kv", paper="DuoAttention (Xiao et al., ICLR 2025) https://arxiv.org/abs/2410.10819",
          summary="retrieval heads keep all, streaming heads keep sinks + recent (profile of heads)")
@dataclass(frozen=True)
class DuoAttention(KVPolicy):
    """Retrieval vs streaming heads from a profile."""

    examples = ({"profile": "<profile>", "sink": 4, "recent": 8},)

    profile: str = "smollm2-135m"
    sink: int = 16
    recent: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("sink", "recent"):
            check_int(getattr(self, name), name, 0)
        object.__setattr__(self, "_profile", load_profile(self.profile))

    def prepare(self, model) -> None:
        cfg = model.config
        self._profile.check(cfg.num_hidden_layers, kv_heads(cfg), "duo_attention")

    def reference_keep(self, q, k, v, key_valid=None, module=None, layer_idx: int = 0, num_layers: int = 1):
        """Loop by loop (DuoAttention): streaming heads keep the first ``sink`` and the last ``recent`` real
        tokens, retrieval heads everything; the heads with the lowest profile scores stream, as many as remove
        ``ratio`` of the cache (departure: the paper thresholds trained gates)."""
        b, hk, n = k.shape[:3]
        p = self._profile
        out = []
        for bi in range(b):
            real = [j for j in range(n) if key_valid is None or bool(key_valid[bi, j])]
            nv = len(real)
            stream_keep = min(self.sink + self.recent, nv)
            saved = (nv - stream_keep) / nv if nv else 0.0
            total = p.num_layers * p.num_kv_heads
            count = 0 if saved <= 0 or self.ratio == 0 else min(total, round(self.ratio / saved * total))
            heads = sorted((p.scores[li][h], li, h) for li in range(p.num_layers) for h in range(p.num_kv_heads))
            streaming = {(li, h) for _, li, h in heads[:count]}
            row = []
            for h in range(hk):
                if (layer_idx, h) in streaming:
                    row.append(set(real[: self.sink]) | set(real[max(0, nv - (stream_keep - min(self.sink, nv))):]))
                else:
                    row.append(set(real))
            out.append(row)
        return out

    def streaming_heads(self, n: int) -> set[tuple[int, int]]:
        """(layer, kv head) pairs that stream for a sequence of ``n`` tokens."""
        p = self._profile
        keep_stream = min(self.sink + self.recent, n)
        saved_per_head = (n - keep_stream) / n if n else 0.0
        if saved_per_head <= 0 or self.ratio == 0:
            return set()
        total = p.num_layers * p.num_kv_heads
        count = min(total, round(self.ratio / saved_per_head * total))
        order = sorted((p.scores[li][h], li, h) for li in range(p.num_layers) for h in range(p.num_kv_heads))
        return {(li, h) for _, li, h in order[:count]}

    def score(self, q, k, v, key_valid, module=None) -> torch.Tensor:
        from .streaming_llm import StreamingLLM

        return StreamingLLM(ratio=0.0, sink=self.sink).score(q, k, v, key_valid)

    def keep(self, q, k, v, key_valid=None, module=None, layer_idx: int = 0, num_layers: int = 1):
        b, hk, n, _ = k.shape
        valid = valid_lengths(k, key_valid)
        scores = mask_padding(self.score(q, k, v, key_valid), key_valid)
        lengths = torch.empty(b, hk, dtype=torch.long, device=k.device)
        for bi, nv in enumerate(valid.tolist()):
            stream = self.streaming_heads(int(nv))
            for h in range(hk):
                lengths[bi, h] = min(self.sink + self.recent, nv) if (layer_idx, h) in stream else nv
        return self.top(scores, lengths)
