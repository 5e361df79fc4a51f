"""Needle in a haystack: a "special magic number" for a city, hidden at a chosen depth of a long text.

Paper: "Needle in a Haystack" (Kamradt, 2023) as formalised by RULER (Hsieh et al., 2024,
https://arxiv.org/abs/2404.06654). Haystacks: ``filler`` (repeated sentences) or ``stdlib`` (CPython standard
library source files read at run time from this interpreter's own stdlib: real code text on every machine, no
download). ``keys > 1`` hides several needles (different cities) and asks for one (multi-key). The depth sweeps
0-100% over the samples: sample ``i`` puts the asked needle at ``(i % 11) * 10%``.
"""

from __future__ import annotations

import random
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

from ...checks import check_choice, check_int
from ...registry import register
from .base import Sample, Task
from .passkey import FILLER

__all__ = ["Niah", "stdlib_text"]

CITIES = ("Lisbon", "Nairobi", "Osaka", "Lima", "Oslo", "Quito", "Hanoi", "Tunis", "Perth", "Zagreb", "Dakar",
          "Bogota", "Riga", "Muscat", "Porto", "Accra")


@lru_cache(maxsize=1)
def stdlib_text() -> str:
    """Concatenated source of this interpreter's standard library (sorted, deterministic)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for p in sorted(root.glob("*.py")):
        try:
            parts.append(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
        if sum(map(len, parts)) > 4_000_000:
            break
    if not parts:
        raise ValueError(f"niah: no standard-library source found under {root}")
    return "\n".join(parts)


@register("niah", "task", paper="RULER NIAH (Hsieh et al., 2024) https://arxiv.org/abs/2404.06654",
          summary="magic number for a city at a swept depth, filler or stdlib-source haystack, multi-key")
@dataclass(frozen=True)
class Niah(Task):
    """Needle in a haystack."""

    answer_in_context: ClassVar[bool] = True  # the asked value is written in the context

    haystack: str = "stdlib"
    keys: int = 1
    max_new_tokens: int = 12
    reserve: int = 60

    def __post_init__(self) -> None:
        check_choice(self.haystack, "haystack", ("stdlib", "filler"))
        check_int(self.keys, "keys", 1, len(CITIES))

    def _hay(self, tokenizer, n_tokens: int, rng: random.Random) -> list[str]:
        """Haystack as a list of chunks (sentences or source lines) of about ``n_tokens`` tokens."""
        if self.haystack == "filler":
            per = max(len(tokenizer(FILLER, add_special_tokens=False)["input_ids"]), 1)
            return [FILLER] * max(n_tokens // per, 1)
        text = stdlib_text()
        start = rng.randrange(0, max(len(text) - n_tokens * 8, 1))
        lines = text[start : start + n_tokens * 8].splitlines(keepends=True)[1:]  # from a line start
        counts = tokenizer(lines, add_special_tokens=False)["input_ids"]
        out, total = [], 0
        for line, ids in zip(lines, counts):  # whole lines until the token budget is reached
            if total + len(ids) > n_tokens:
                break
            out.append(line)
            total += len(ids)
        return out or lines[:1]

    def make(self, tokenizer, length: int, index: int, seed: int) -> Sample:
        rng = random.Random(f"niah:{self.haystack}:{self.keys}:{seed}:{length}:{index}")
        cities = rng.sample(CITIES, self.keys)
        numbers = [str(rng.randint(1_000_000, 9_999_999)) for _ in cities]
        ask = rng.randrange(self.keys)
        needles = [f"\nThe special magic number for {c} is: {n}.\n" for c, n in zip(cities, numbers)]
        budget = length - self.reserve - sum(len(tokenizer(x, add_special_tokens=False)["input_ids"])
                                             for x in needles)
        hay = self._hay(tokenizer, max(budget, 16), rng)
        depth = (index % 11) / 10
        spots = [rng.random() for _ in cities]
        spots[ask] = depth
        for s, needle in sorted(zip(spots, needles), key=lambda x: -x[0]):  # insert from the end backwards
            hay.insert(int(round(s * len(hay))), needle)
        return Sample(
            id=f"niah-{self.haystack}-{length}-{index}",
            context="".join(hay),
            question=f"What is the special magic number for {cities[ask]}? Answer with the number only.",
            answer_prefix=f"The special magic number for {cities[ask]} is:",
            answers=[numbers[ask]],
            meta={"depth": depth, "keys": self.keys, "needles": [needles[ask].strip()]},
        )
