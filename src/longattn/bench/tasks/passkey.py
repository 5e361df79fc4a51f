"""Passkey retrieval: a random number hidden in repetitive filler at a random depth.

Paper: "Landmark Attention: Random-Access Infinite Context Length for Transformers" (Mohtashami & Jaggi, 2023,
https://arxiv.org/abs/2305.16300), the passkey setting also used by kvpress's needle benchmarks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from ...registry import register
from .base import Sample, Task

__all__ = ["Passkey", "build_filler_context"]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "


def _ntok(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_filler_context(tokenizer, length: int, needle: str, depth: float, filler: str = FILLER,
                         intro: str = INTRO, reserve: int = 0) -> str:
    """Context of about ``length - reserve`` tokens: intro + filler with ``needle`` at relative ``depth``."""
    per = max(_ntok(tokenizer, filler), 1)
    budget = max(length - reserve - _ntok(tokenizer, intro) - _ntok(tokenizer, needle), per)
    n = max(budget // per, 1)
    at = int(round(depth * n))
    return intro + filler * at + needle + filler * (n - at)


@register("passkey", "task", paper="Landmark Attention passkey (Mohtashami & Jaggi 2023) "
          "https://arxiv.org/abs/2305.16300", summary="find a 5-digit pass key hidden in repeated filler")
@dataclass(frozen=True)
class Passkey(Task):
    """5-digit pass key in filler at a random depth."""

    answer_in_context: ClassVar[bool] = True  # the asked value is written in the context

    max_new_tokens: int = 10
    reserve: int = 40  # tokens left for the chat template, question and answer prefix

    def make(self, tokenizer, length: int, index: int, seed: int) -> Sample:
        rng = random.Random(f"passkey:{seed}:{length}:{index}")
        key = str(rng.randint(10000, 99999))
        depth = rng.random()
        needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
        ctx = build_filler_context(tokenizer, length, needle, depth, reserve=self.reserve)
        return Sample(
            id=f"passkey-{length}-{index}",
            context=ctx,
            question="What is the pass key? Answer with the number only.",
            answer_prefix="The pass key is",
            answers=[key],
            meta={"depth": round(depth, 3), "needles": [needle.strip()]},
        )
