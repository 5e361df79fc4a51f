"""RULER-like synthetic tasks: multi-value / multi-query needles, variable tracking, common-word aggregation,
and UUID key-value retrieval (SCBench Retr.KV style).

Paper: RULER (Hsieh et al., 2024, https://arxiv.org/abs/2404.06654); SCBench (Li et al., ICLR 2025,
https://arxiv.org/abs/2412.10319) for ``kv_retrieval``. Every sample is generated from the seed, the length and
the sample index (no download). Tasks with several gold answers score the fraction found; a sample is correct
only when all are found. Departures: RULER's word lists and essays are replaced by generated pseudo-words and
the stdlib/filler haystacks of ``niah``; the multi-key NIAH of RULER is ``niah:keys=k``.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import ClassVar

from ...checks import check_int
from ...registry import register
from .base import Sample, Task
from .niah import CITIES, Niah
from .passkey import _ntok

__all__ = ["CommonWords", "KVRetrieval", "MultiQuery", "MultiValue", "VariableTracking"]


def _hay_with(tokenizer, length: int, reserve: int, items: list[str], haystack: str, rng: random.Random,
              ordered: bool = False) -> str:
    """A ``haystack`` text of about ``length - reserve`` tokens in all, ``items`` inserted at random places (in
    their order when ``ordered``)."""
    budget = length - reserve - sum(_ntok(tokenizer, x) for x in items)
    out = Niah(haystack=haystack)._hay(tokenizer, max(budget, 16), rng)
    spots = sorted(rng.random() for _ in items) if ordered else [rng.random() for _ in items]
    for s, item in sorted(zip(spots, items), key=lambda x: -x[0]):
        out.insert(int(round(s * len(out))), item)
    return "".join(out)


class _AllOf(Task):
    """Several gold answers: score = fraction found in the prediction; correct when all are."""

    def score(self, prediction: str, sample: Sample) -> float:
        return sum(a in prediction for a in sample.answers) / len(sample.answers)


@register("multivalue", "task", paper="RULER MV-NIAH https://arxiv.org/abs/2404.06654",
          summary="one key with several magic numbers in the haystack; answer all of them")
@dataclass(frozen=True)
class MultiValue(_AllOf):
    answer_in_context: ClassVar[bool] = True  # the asked values are written in the context
    values: int = 4
    haystack: str = "stdlib"
    max_new_tokens: int = 48
    reserve: int = 80

    def __post_init__(self) -> None:
        check_int(self.values, "values", 2, 16)
        Niah(haystack=self.haystack)  # validates the haystack name

    def make(self, tokenizer, length: int, index: int, seed: int) -> Sample:
        rng = random.Random(f"multivalue:{self.haystack}:{self.values}:{seed}:{length}:{index}")
        city = rng.choice(CITIES)
        nums = [str(rng.randint(1_000_000, 9_999_999)) for _ in range(self.values)]
        needles = [f"\nOne of the special magic numbers for {city} is: {n}.\n" for n in nums]
        return Sample(
            id=f"multivalue-{length}-{index}",
            context=_hay_with(tokenizer, length, self.reserve, needles, self.haystack, rng),
            question=f"What are all the special magic numbers for {city}? List every one of them.",
            answer_prefix=f"The special magic numbers for {city} are:", answers=nums,
            meta={"values": self.values, "needles": [x.strip() for x in needles]},
        )


@register("multiquery", "task", paper="RULER MQ-NIAH https://arxiv.org/abs/2404.06654",
          summary="several keys hidden, all asked at once; answer every number")
@dataclass(frozen=True)
class MultiQuery(_AllOf):
    answer_in_context: ClassVar[bool] = True  # the asked values are written in the context
    queries: int = 3
    haystack: str = "stdlib"
    max_new_tokens: int = 48
    reserve: int = 90

    def __post_init__(self) -> None:
        check_int(self.queries, "queries", 2, len(CITIES))
        Niah(haystack=self.haystack)

    def make(self, tokenizer, length: int, index: int, seed: int) -> Sample:
        rng = random.Random(f"multiquery:{self.haystack}:{self.queries}:{seed}:{length}:{index}")
        cities = rng.sample(CITIES, self.queries)
        nums = [str(rng.randint(1_000_000, 9_999_999)) for _ in cities]
        needles = [f"\nThe special magic number for {c} is: {n}.\n" for c, n in zip(cities, nums)]
        return Sample(
            id=f"multiquery-{length}-{index}",
            context=_hay_with(tokenizer, length, self.reserve, needles, self.haystack, rng),
            question=f"What are the special magic numbers for {', '.join(cities)}? Give each city's number.",
            answer_prefix="The special magic numbers are:", answers=nums,
            meta={"queries": self.queries, "needles": [x.strip() for x in needles]},
        )


def _name(rng: random.Random) -> str:
    return "".join(rng.choice("BCDFGHJKLMNPQRSTVWXZ") for _ in range(5))


@register("variable_tracking", "task", paper="RULER VT https://arxiv.org/abs/2404.06654",
          summary="a value passed along a chain of variable assignments in filler; name every variable")
@dataclass(frozen=True)
class VariableTracking(_AllOf):
    hops: int = 4
    max_new_tokens: int = 40
    reserve: int = 80

    def __post_init__(self) -> None:
        check_int(self.hops, "hops", 1, 12)

    def make(self, tokenizer, length: int, index: int, seed: int) -> Sample:
        rng = random.Random(f"vt:{self.hops}:{seed}:{length}:{index}")
        value = str(rng.randint(10000, 99999))
        names: list[str] = []
        while len(names) < self.hops + 1:
            n = _name(rng)
            if n not in names:
                names.append(n)
        chain = [f" VAR {names[0]} = {value}. "] + [f" VAR {b} = {a}. " for a, b in zip(names, names[1:])]
        return Sample(
            id=f"vt-{length}-{index}",
            context=_hay_with(tokenizer, length, self.reserve, chain, "filler", rng, ordered=True),
            question=f"Find all variables that are assigned the value {value} in the text above, directly or "
                     f"through other variables.",
            answer_prefix=f"The variables assigned the value {value} are:", answers=names,
            meta={"hops": self.hops},
        )


@register("common_words", "task", paper="RULER CWE https://arxiv.org/abs/2404.06654",
          summary="a long numbered word list; name the most frequent words (aggregation)")
@dataclass(frozen=True)
class CommonWords(_AllOf):
    common: int = 5
    repeats: int = 20
    max_new_tokens: int = 40
    reserve: int = 80

    def __post_init__(self) -> None:
        check_int(self.common, "common", 1, 20)
        check_int(self.repeats, "repeats", 2, 1000)

    def make(self, tokenizer, length: int, index: int, seed: int) -> Sample:
        rng = random.Random(f"cwe:{self.common}:{self.repeats}:{seed}:{length}:{index}")
        syll = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "vo", "pe", "du", "ga", "zi", "mo", "fa", "bu", "le"]
        vocab: list[str] = []
        seen = set()
        while len(vocab) < 4000:
            w = "".join(rng.choice(syll) for _ in range(3))
            if w not in seen:
                seen.add(w)
                vocab.append(w)
        common, rare = vocab[: self.common], vocab[self.common :]
        probe = "".join(f"{100 + i}. {vocab[i]}\n" for i in range(50))  # tokens per numbered line, averaged
        per = max(_ntok(tokenizer, probe) / 50, 1.0)
        n_total = max(int((length - self.reserve) / per), self.common * self.repeats + 1)
        n_rare = max(n_total - self.common * self.repeats, 1)
        words = common * self.repeats + [rare[i % len(rare)] for i in range(n_rare)]
        rng.shuffle(words)
        ctx = "Below is a numbered list of words.\n" + "".join(f"{i + 1}. {w}\n" for i, w in enumerate(words))
        return Sample(
            id=f"cwe-{length}-{index}", context=ctx,
            question=f"What are the {self.common} most common words in the list above?",
            answer_prefix=f"The {self.common} most common words are:", answers=common,
            meta={"common": self.common, "repeats": self.repeats},
        )


@register("kv_retrieval", "task", paper="SCBench Retr.KV https://arxiv.org/abs/2412.10319",
          summary="JSON of random UUID key-value pairs; give the value of one key")
@dataclass(frozen=True)
class KVRetrieval(Task):
    answer_in_context: ClassVar[bool] = True  # the asked values are written in the context
    max_new_tokens: int = 40
    reserve: int = 90

    def make(self, tokenizer, length: int, index: int, seed: int) -> Sample:
        rng = random.Random(f"kv:{seed}:{length}:{index}")

        def uid() -> str:
            return str(uuid.UUID(int=rng.getrandbits(128)))

        per = max(_ntok(tokenizer, f'"{uid()}": "{uid()}", '), 1)
        n = max((length - self.reserve) // per, 2)
        pairs = [(uid(), uid()) for _ in range(n)]
        key, value = pairs[rng.randrange(n)]
        ctx = "JSON data:\n{" + ", ".join(f'"{a}": "{b}"' for a, b in pairs) + "}\n"
        return Sample(
            id=f"kv-{length}-{index}", context=ctx,
            question=f'In the JSON data above, what is the value associated with the key "{key}"?',
            answer_prefix=f'The value associated with the key "{key}" is: "', answers=[value],
            meta={"needles": [f'"{key}": "{value}"']},
        )
