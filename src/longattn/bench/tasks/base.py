"""Task base: a task makes samples of a target length and scores answers."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Sample", "Task"]


@dataclass
class Sample:
    """One sample: ``context`` is compressed question-agnostically; ``question`` and ``answer_prefix`` follow."""

    id: str
    context: str
    question: str
    answer_prefix: str
    answers: list[str]
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    max_new_tokens: int = 12

    def make(self, tokenizer, length: int, index: int, seed: int) -> Sample:  # pragma: no cover - abstract
        raise NotImplementedError

    def score(self, prediction: str, sample: Sample) -> float:
        """1.0 when any gold answer occurs in the prediction (substring match)."""
        return float(any(a in prediction for a in sample.answers))
