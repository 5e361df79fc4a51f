"""``shared_context``: one long context encoded (and compressed) once, then several queries (SCBench).

Paper: "SCBench: A KV Cache-Centric Analysis of Long-Context Methods" (Li et al., ICLR 2025,
https://arxiv.org/abs/2412.10319). The context is a haystack (stdlib source or filler) holding ``queries``
needles (a magic number per city); each query asks one city's number. ``mode=multi_turn``: the queries are the
turns of one conversation (each follow-up sees the earlier questions and answers, as SCBench's multi-turn
mode); ``mode=multi_request``: each query runs on a fresh copy of the compressed context (nothing leaks between
queries). The prefill and the compression run once per sample; records carry the score of every turn
(``turn_scores``). Departure: SCBench's real-document tasks are replaced by the generated needles.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ...checks import check_choice, check_int
from ...registry import register
from .base import MODES, Sample, Task
from .niah import CITIES, Niah
from .ruler import _hay_with

__all__ = ["SharedContext"]


@register("shared_context", "task", paper="SCBench (Li et al., ICLR 2025) https://arxiv.org/abs/2412.10319",
          summary="one context compressed once, several queries: multi_turn (history) or multi_request (fresh copy)")
@dataclass(frozen=True)
class SharedContext(Task):
    """Several needles queried one after the other over one shared, compressed context."""

    queries: int = 4
    mode: str = "multi_turn"
    haystack: str = "stdlib"
    max_new_tokens: int = 12
    reserve: int = 120
    runs_as = "shared_context"

    def __post_init__(self) -> None:
        check_int(self.queries, "queries", 2, len(CITIES))
        check_choice(self.mode, "mode", MODES)
        Niah(haystack=self.haystack)  # validates the haystack name

    def make(self, tokenizer, length: int, index: int, seed: int) -> Sample:
        rng = random.Random(f"shared_context:{self.haystack}:{self.queries}:{seed}:{length}:{index}")
        cities = rng.sample(CITIES, self.queries)
        numbers = [str(rng.randint(1_000_000, 9_999_999)) for _ in cities]
        needles = [f"\nThe special magic number for {c} is: {n}.\n" for c, n in zip(cities, numbers)]
        context = _hay_with(tokenizer, length, self.reserve, needles, self.haystack, rng)
        order = list(range(self.queries))
        rng.shuffle(order)
        qs = [(f"What is the special magic number for {cities[i]}? Answer with the number only.",
               f"The special magic number for {cities[i]} is:", [numbers[i]]) for i in order]
        return Sample(id=f"shared-{self.mode}-{length}-{index}", context=context, question=qs[0][0],
                      answer_prefix=qs[0][1], answers=qs[0][2],
                      turns=[{"question": q, "answer_prefix": p, "answers": a} for q, p, a in qs[1:]],
                      mode=self.mode, meta={"queries": self.queries})
