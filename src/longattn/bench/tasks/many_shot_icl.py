"""``many_shot_icl``: many-label classification with the demonstrations in the context (LIConBench-like).

Paper: "Long-context LLMs Struggle with Long In-context Learning" (LIConBench; Li et al., 2024,
https://arxiv.org/abs/2404.02060). ``labels`` made-up category names; each has a few made-up marker words. The
context is a long list of demonstrations ``Text: <sentence with one marker> -> Category: <label>``, shuffled,
filling ``length`` tokens (every label appears, each several times); the question is a new sentence with a
marker seen in the demonstrations, asking for its category. Scoring: the right label as a whole word and no other
label in the answer. Departure: LIConBench's real datasets (e.g. BANKING77) are replaced by generated data, so
nothing is downloaded; the task measures whether a method keeps the demonstrations that matter.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ...checks import check_int
from ...registry import register
from .base import Sample, Task
from .passkey import _ntok

__all__ = ["ManyShotICL"]

_TEMPLATES = ("The {w} arrived late again this morning.", "Everyone talked about the {w} at lunch.",
              "A new {w} was installed near the station.", "My neighbour bought a {w} yesterday.",
              "The report mentioned the {w} twice.", "We waited an hour for the {w}.",
              "Nobody expected the {w} to be so loud.", "She described the {w} in detail.")


def _word(rng: random.Random, n: int) -> str:
    cons, vow = "bdfgklmnprstvz", "aeiou"
    return "".join(rng.choice(cons) + rng.choice(vow) for _ in range(n))


@register("many_shot_icl", "task", paper="LIConBench (Li et al., 2024) https://arxiv.org/abs/2404.02060",
          summary="many-label classification from hundreds of in-context demonstrations")
@dataclass(frozen=True)
class ManyShotICL(Task):
    """Many-label in-context classification."""

    labels: int = 20
    markers: int = 3
    max_new_tokens: int = 8
    reserve: int = 80

    def __post_init__(self) -> None:
        for name, lo, hi in (("labels", 2, 100), ("markers", 1, 10)):
            check_int(getattr(self, name), name, lo, hi)

    def make(self, tokenizer, length: int, index: int, seed: int) -> Sample:
        rng = random.Random(f"icl:{self.labels}:{self.markers}:{seed}:{length}:{index}")
        names: list[str] = []
        while len(names) < self.labels:
            w = _word(rng, 3).capitalize()
            if w not in names:
                names.append(w)
        words: set[str] = set()
        marks = {}
        for lab in names:
            ms = []
            while len(ms) < self.markers:
                w = _word(rng, 2)
                if w not in words:
                    words.add(w)
                    ms.append(w)
            marks[lab] = ms
        demos, total = [], 0
        budget = length - self.reserve
        i = 0
        while True:  # rounds over every (label, marker) so each label appears, until the budget is used
            pairs = [(lab, m) for lab in names for m in marks[lab]]
            rng.shuffle(pairs)
            for lab, m in pairs:
                line = f"Text: {rng.choice(_TEMPLATES).format(w=m)} -> Category: {lab}\n"
                cost = _ntok(tokenizer, line)
                if total + cost > budget and i >= len(names):
                    break
                demos.append(line)
                total += cost
                i += 1
            else:
                continue
            break
        seen = {(lab, m) for lab in names for m in marks[lab] if any(f" {m} " in d and d.endswith(f" {lab}\n")
                                                                      for d in demos)}
        lab, m = rng.choice(sorted(seen))
        query = f"The {m} was mentioned in the news today."
        return Sample(
            id=f"icl-{length}-{index}", context="".join(demos),
            question=f"Text: {query} -> Category: ? Answer with the category name only.",
            answer_prefix="Category:", answers=[lab], meta={"labels": names, "demos": len(demos)},
        )

    def score(self, prediction: str, sample: Sample) -> float:
        found = {lab for lab in sample.meta["labels"] if re.search(rf"\b{lab}\b", prediction)}
        return float(found == set(sample.answers))
