"""repo_qa and many_shot_icl: deterministic generators, the answer is in the context, scorers accept the gold
answer and reject near misses."""

import pytest

from longattn.api import parse_method
from longattn.bench.tasks.repo_qa import find_functions


def test_find_functions_reads_descriptions():
    text = ('def alpha(x):\n    """Add one to the given number."""\n    return x + 1\n\n'
            'def beta(y,\n         z):\n    """Multiply two numbers and\n    return the product."""\n    return y * z\n'
            'def gamma():\n    """Short."""\n')
    got = {name: doc for name, doc, _, _ in find_functions(text)}
    assert got == {"alpha": "Add one to the given number", "beta": "Multiply two numbers and"}
    name, _, s, e = [f for f in find_functions(text) if f[0] == "beta"][0]
    assert "product" in text[s:e] and "Multiply" not in text[:s] + text[e:]


@pytest.mark.parametrize("spec", ["repo_qa", "many_shot_icl", "many_shot_icl:labels=40:markers=2"])
def test_generators_deterministic_and_scorers(smollm2, spec):
    _, tok = smollm2
    t = parse_method(spec, "task")
    a, b, c = t.make(tok, 1024, 3, 0), t.make(tok, 1024, 3, 0), t.make(tok, 1024, 4, 0)
    assert a == b and (a.context != c.context)
    ans = a.answers[0]
    n = len(tok(a.context, add_special_tokens=False)["input_ids"])
    assert 700 < n <= 1024
    assert t.score(f" {ans}.", a) == 1.0
    assert t.score(f" {ans[:-1]}", a) == 0.0 and t.score(f" {ans}x", a) == 0.0
    if spec == "repo_qa":
        assert f"def {ans}(" in a.context and a.meta["description"] not in a.context
    else:
        assert a.context.count(f"Category: {ans}\n") >= 1
        other = next(lab for lab in a.meta["labels"] if lab != ans)
        assert t.score(f" {ans} or {other}", a) == 0.0  # naming two labels is not an answer


def test_many_shot_icl_validates():
    with pytest.raises(ValueError, match="labels must be an int in"):
        parse_method("many_shot_icl:labels=1", "task")
