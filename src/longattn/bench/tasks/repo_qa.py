"""``repo_qa``: find a function in a long code context from its description (RepoQA / SCBench Code.RepoQA).

Papers: "RepoQA: Evaluating Long Context Code Understanding" (Liu et al., 2024, https://arxiv.org/abs/2406.06025);
SCBench (Li et al., ICLR 2025, https://arxiv.org/abs/2412.10319). The context is a run of CPython
standard-library source read from this interpreter (no download) of about ``length`` tokens; the target is a
function defined in it whose docstring's first line is its *description* and whose name occurs only once as a
definition in the context. The docstring is removed from the context (so the description is not a string to
match), and the model is asked for the name of the function that does it. Scoring: the function name as a whole
identifier in the answer. Departure: RepoQA asks for the whole function body and scores by BLEU; a name is what
a 135M-parameter model can be scored on.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ...registry import register
from .base import Sample, Task
from .niah import Niah

__all__ = ["RepoQA", "find_functions"]

_DEF = re.compile(r"^[ \t]*def ([A-Za-z_]\w*)\(")


def find_functions(text: str) -> list[tuple[str, str, int, int]]:
    """``(name, first docstring line, start, end of the docstring)`` of each function in ``text``
    whose docstring opens within 4 lines of the ``def`` and whose first line is a description of 4+ words."""
    lines = text.splitlines(keepends=True)
    offs = [0]
    for line in lines:
        offs.append(offs[-1] + len(line))
    out = []
    for i, line in enumerate(lines):
        m = _DEF.match(line)
        if not m:
            continue
        for j in range(i + 1, min(i + 5, len(lines))):
            body = lines[j].strip()
            if body.startswith(('"""', "'''")):
                quote = body[:3]
                doc = body[3:].split(quote)[0].strip().rstrip(".")
                end = j  # the line closing the docstring
                if quote not in body[3:]:
                    end = next((x for x in range(j + 1, min(j + 40, len(lines))) if quote in lines[x]), j)
                if len(doc.split()) >= 4:
                    out.append((m.group(1), doc, offs[j], offs[end + 1]))
                break
            if _DEF.match(lines[j]) or not body:
                break
    return out


@register("repo_qa", "task", paper="RepoQA (Liu et al., 2024) https://arxiv.org/abs/2406.06025",
          summary="name the stdlib function that matches a description, in a long code context")
@dataclass(frozen=True)
class RepoQA(Task):
    """Find a function from its description in long code."""

    max_new_tokens: int = 16
    reserve: int = 120

    def make(self, tokenizer, length: int, index: int, seed: int) -> Sample:
        rng = random.Random(f"repo_qa:{seed}:{length}:{index}")
        for _attempt in range(20):
            text = "".join(Niah(haystack="stdlib")._hay(tokenizer, max(length - self.reserve, 64), rng))
            defs = re.findall(r"^[ \t]*def ([A-Za-z_]\w*)\(", text, re.M)
            cands = [f for f in find_functions(text) if defs.count(f[0]) == 1 and len(f[0]) > 3]
            # not in the first or last tenth, so the answer needs the middle of the context
            cands = [f for f in cands if 0.1 * len(text) < f[2] < 0.9 * len(text)]
            if cands:
                name, doc, s, e = rng.choice(cands)
                context = text[:s] + text[e:]  # the description is not left in the context
                return Sample(
                    id=f"repo_qa-{length}-{index}", context=context,
                    question=f"Which function in the code above does the following: \"{doc}\"? Give its name.",
                    answer_prefix="The function is named", answers=[name], meta={"description": doc},
                )
        raise ValueError(f"repo_qa: no function with a description found in 20 stdlib windows of {length} tokens")

    def score(self, prediction: str, sample: Sample) -> float:
        return float(any(re.search(rf"(?<![\w.]){re.escape(a)}(?!\w)", prediction) for a in sample.answers))
