"""Left padding: where each row's real tokens start, and its first ``sink`` real tokens.

A padded batch is left-padded (transformers' convention for generation); ``key_valid [b, n]`` is True on real
tokens. Position-based rules (sinks, windows, groups) start at each row's first real token, so a padded row is
treated exactly as the same prompt alone. Shared by the prefill patterns and the decode selectors.
"""

from __future__ import annotations

import torch

__all__ = ["first_real", "sink_tokens"]


def first_real(key_valid: torch.Tensor | None, batch: int, device=None) -> torch.Tensor:
    """Index of each row's first real (unpadded) key, ``[b]`` long."""
    if key_valid is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    return key_valid.to(torch.int8).argmax(-1).long()


def sink_tokens(sink: int, key_valid: torch.Tensor | None, batch: int, n: int, device=None) -> torch.Tensor:
    """bool ``[b, n]``: the first ``sink`` real tokens of each row."""
    first = first_real(key_valid, batch, device)
    kp = torch.arange(n, device=device)
    return (kp[None, :] >= first[:, None]) & (kp[None, :] < first[:, None] + sink)
