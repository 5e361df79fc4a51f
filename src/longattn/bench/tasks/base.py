"""Task base: a task makes samples of a target length and scores answers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

__all__ = ["MODES", "Sample", "Task"]


@dataclass
class Sample:
    """One sample: ``context`` is compressed question-agnostically; ``question`` and ``answer_prefix`` follow.

    ``turns``: follow-up queries over the same context (``{"question", "answer_prefix", "answers"}`` each), run
    as a multi-turn conversation (``mode="multi_turn"``: each follow-up sees the previous questions and answers)
    or as independent requests (``mode="multi_request"``: each on a fresh copy of the compressed context)."""

    id: str
    context: str
    question: str
    answer_prefix: str
    answers: list[str]
    meta: dict = field(default_factory=dict)
    turns: list[dict] = field(default_factory=list)
    mode: str = "multi_turn"

    def queries(self) -> list[tuple[str, str, list[str]]]:
        """``(question, answer_prefix, answers)`` of the first query and every follow-up."""
        return [(self.question, self.answer_prefix, self.answers)] + [
            (t["question"], t.get("answer_prefix", ""), list(t["answers"])) for t in self.turns]


MODES = ("multi_turn", "multi_request")


@dataclass(frozen=True)
class Task:
    max_new_tokens: int = 12
    #: generated to a target length (``--lengths``); False for tasks that bring their own samples
    uses_length = True
    #: how its samples run (``bench/protocols.py``): ``qa``, ``shared_context`` or ``perplexity``
    runs_as: ClassVar[str] = "qa"
    #: the gold answer is written in the context (a needle): records say how much of it a KV policy kept
    answer_in_context: ClassVar[bool] = False

    def protocol(self, sample: Sample) -> str:
        """The protocol ``sample`` runs under (``runs_as`` unless a task mixes kinds of samples)."""
        return self.runs_as

    def count(self) -> int | None:
        """How many distinct samples the task has (None: unbounded, generated)."""
        return None

    def make(self, tokenizer, length: int, index: int, seed: int) -> Sample:  # pragma: no cover - abstract
        raise NotImplementedError

    def correct(self, score: float) -> bool:
        return score >= 1.0

    def score(self, prediction: str, sample: Sample) -> float:
        """1.0 when any gold answer occurs in the prediction (substring match)."""
        return float(any(a in prediction for a in sample.answers))
