"""``custom``: the user's own samples from a JSONL file, one per line.

``{"context": str, "question": str, "answers": [str, ...], "answer_prefix": str (optional), "id": str (optional)}``,
optionally ``"turns": [{"question", "answers", "answer_prefix"?}, ...]`` (follow-up queries over the same context,
shared-context style) and ``"mode": "multi_turn" | "multi_request"`` (default multi_turn).

The context is compressed question-agnostically, as for every task; ``--lengths`` does not apply (records carry
the sample's token count as ``length``, ``target_length`` 0, and the size with the question in ``n_tokens``). Scorers: ``contains`` (a gold answer occurs in the prediction,
case-insensitive), ``exact`` (equal after stripping whitespace and a final period, case-insensitive), ``rouge``
(ROUGE-L F1 against the best gold answer; correct when >= 0.5).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ...checks import read_text
from ...registry import register
from .base import MODES, Sample, Task

__all__ = ["Custom", "load_jsonl", "SCORERS", "rouge_l"]

SCORERS = ("contains", "exact", "rouge")


def load_jsonl(path: str) -> list[Sample]:
    """Validate and load every line; a bad line raises ValueError naming its line number and field."""
    out = []
    for i, line in enumerate(read_text(path, "--data").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError as e:
            raise ValueError(f"--data {path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(d, dict):
            raise ValueError(f"--data {path}:{i}: expected a JSON object")
        for key in ("context", "question"):
            if not isinstance(d.get(key), str) or not d[key].strip():
                raise ValueError(f"--data {path}:{i}: field {key!r} must be a non-empty string")
        ans = d.get("answers")
        if not isinstance(ans, list) or not ans or not all(isinstance(a, str) and a.strip() for a in ans):
            raise ValueError(f"--data {path}:{i}: field 'answers' must be a non-empty list of non-empty strings")
        prefix = d.get("answer_prefix", "")
        if not isinstance(prefix, str):
            raise ValueError(f"--data {path}:{i}: field 'answer_prefix' must be a string")
        turns = d.get("turns", [])
        if not isinstance(turns, list):
            raise ValueError(f"--data {path}:{i}: field 'turns' must be a list of follow-up queries")
        for j, t in enumerate(turns):
            where = f"--data {path}:{i}: turns[{j}]"
            if not isinstance(t, dict):
                raise ValueError(f"{where} must be an object with question, answers, answer_prefix (optional)")
            if not isinstance(t.get("question"), str) or not t["question"].strip():
                raise ValueError(f"{where}: field 'question' must be a non-empty string")
            ta = t.get("answers")
            if not isinstance(ta, list) or not ta or not all(isinstance(a, str) and a.strip() for a in ta):
                raise ValueError(f"{where}: field 'answers' must be a non-empty list of non-empty strings")
            if not isinstance(t.get("answer_prefix", ""), str):
                raise ValueError(f"{where}: field 'answer_prefix' must be a string")
            extra = set(t) - {"question", "answers", "answer_prefix"}
            if extra:
                raise ValueError(f"{where}: unknown field(s) {sorted(extra)}; allowed: question, answers, answer_prefix")
        mode = d.get("mode", "multi_turn")
        if mode not in MODES:
            raise ValueError(f"--data {path}:{i}: field 'mode' must be one of {', '.join(MODES)}, got {mode!r}")
        unknown = set(d) - {"context", "question", "answers", "answer_prefix", "id", "turns", "mode"}
        if unknown:
            raise ValueError(f"--data {path}:{i}: unknown field(s) {sorted(unknown)}; allowed: context, question, "
                             "answers, answer_prefix, id, turns, mode")
        out.append(Sample(id=str(d.get("id", i)), context=d["context"], question=d["question"],
                          answer_prefix=prefix, answers=list(ans), turns=turns, mode=mode))
    if not out:
        raise ValueError(f"--data {path}: no sample in the file")
    return out


def _norm(s: str) -> str:
    return s.strip().rstrip(".").strip().lower()


def rouge_l(pred: str, gold: str) -> float:
    """ROUGE-L F1 over whitespace tokens (lower-cased)."""
    a, b = pred.lower().split(), gold.lower().split()
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


@register("custom", "task", paper="-", summary="your own samples from --data FILE.jsonl, --scorer contains|exact|rouge")
@dataclass(frozen=True)
class Custom(Task):
    """User samples from a JSONL file."""

    data: str = ""
    scorer: str = "contains"
    max_new_tokens: int = 32
    uses_length = False
    _samples: list = field(default_factory=list, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.scorer not in SCORERS:
            raise ValueError(f"--scorer must be one of {', '.join(SCORERS)}, got {self.scorer!r}")
        if not self.data:
            raise ValueError("--task custom needs --data FILE.jsonl")
        self._samples.extend(load_jsonl(self.data))

    def count(self) -> int:
        return len(self._samples)

    def protocol(self, sample: Sample) -> str:
        """A line with ``turns`` runs as a shared context, the others as one question each."""
        return "shared_context" if sample.turns else "qa"

    def make(self, tokenizer, length: int, index: int, seed: int) -> Sample:
        return self._samples[index]

    def correct(self, score: float) -> bool:
        return score >= (0.5 if self.scorer == "rouge" else 1.0)

    def score(self, prediction: str, sample: Sample) -> float:
        if self.scorer == "contains":
            return float(any(a.lower() in prediction.lower() for a in sample.answers))
        if self.scorer == "exact":
            return float(any(_norm(a) == _norm(prediction) for a in sample.answers))
        return max(rouge_l(prediction, a) for a in sample.answers)
