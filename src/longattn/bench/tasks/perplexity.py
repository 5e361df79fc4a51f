"""``perplexity``: teacher-forced negative log-likelihood of long text with the method active.

As StreamingLLM's language-modelling evaluation (Xiao et al., ICLR 2024, https://arxiv.org/abs/2309.17453): a
text of ``length`` tokens (CPython standard-library source, or filler) is cut into a context, prefilled (and
compressed by the KV policy) like every task, and the last ``eval_tokens`` tokens, which are scored: each is
predicted from everything before it, through the method (one token at a time when the recipe has a decode
selector, so the selector is what predicts them). Records carry ``nll`` (mean, nats per token) and ``ppl``
(its exponential) instead of an accuracy, plus KL / top-1 agreement against dense on the same tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ...checks import check_int
from ...registry import register
from .base import Sample, Task
from .niah import Niah

__all__ = ["Perplexity"]


@register("perplexity", "task", paper="StreamingLLM LM eval (Xiao et al., ICLR 2024) https://arxiv.org/abs/2309.17453",
          summary="teacher-forced NLL / perplexity of the last eval_tokens of a long text, method active")
@dataclass(frozen=True)
class Perplexity(Task):
    """Perplexity of long natural (code) text."""

    eval_tokens: int = 256
    haystack: str = "stdlib"
    max_new_tokens: int = 0
    runs_as = "perplexity"

    def __post_init__(self) -> None:
        check_int(self.eval_tokens, "eval_tokens")
        Niah(haystack=self.haystack)

    def make(self, tokenizer, length: int, index: int, seed: int) -> Sample:
        if length <= self.eval_tokens + 16:
            raise ValueError(f"perplexity: --lengths must exceed eval_tokens + 16 ({self.eval_tokens + 16}), got {length}")
        rng = random.Random(f"perplexity:{self.haystack}:{seed}:{length}:{index}")
        text = "".join(Niah(haystack=self.haystack)._hay(tokenizer, length, rng))
        return Sample(id=f"ppl-{self.haystack}-{length}-{index}", context=text, question="", answer_prefix="",
                      answers=[], meta={"kind": "perplexity", "eval_tokens": self.eval_tokens, "length": length})

    def correct(self, score) -> bool | None:
        return None

    def score(self, prediction, sample: Sample):
        return None
