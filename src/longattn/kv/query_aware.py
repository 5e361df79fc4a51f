"""Query-aware compression: compress after the question is seen (SnapKV's paper setting).

Paper: SnapKV (Li et al., NeurIPS 2024, https://arxiv.org/abs/2404.14469) scores the cache with the question
inside its observation window. kvpress's pipeline, and our bench by default, compress the context before the
question (question-agnostic, the realistic case for a shared context). This wrapper switches the bench to the
paper's protocol for its inner policy: context + question + answer prefix are prefilled together and
compressed, and records say ``protocol: query_aware``. With ``model.generate`` the prompt already holds the
question, so there it equals the inner policy.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import register
from .base import Wrapper

__all__ = ["QueryAware"]


@register("query_aware", "kv", paper="SnapKV's setting (Li et al., 2024) https://arxiv.org/abs/2404.14469",
          summary="compress after the question is seen (bench protocol), with the inner policy")
@dataclass(frozen=True)
class QueryAware(Wrapper):
    """Compress after the question (the inner policy's observation window then holds the question).

    With ``model.generate`` the prompt already contains the question, so this equals the inner policy; in
    ``longattn bench`` it changes the protocol: context + question + answer prefix are prefilled together and
    compressed, and records say ``protocol: query_aware``.
    """

    query_aware = True
    examples = ({}, {"inner": "tova"})
