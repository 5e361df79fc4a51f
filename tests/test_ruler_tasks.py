"""RULER-like tasks: deterministic by seed, close to the target length, scorers accept the gold answer and reject
near misses, bad arguments named."""

import pytest

from longattn.bench.runner import BenchConfig, encode, make_task
from longattn.bench.tasks import CommonWords, KVRetrieval, MultiQuery, MultiValue, VariableTracking

TASKS = {
    "multivalue": MultiValue(haystack="filler"),
    "multivalue-stdlib": MultiValue(),
    "multiquery": MultiQuery(queries=3),
    "variable_tracking": VariableTracking(hops=3),
    "common_words": CommonWords(common=4, repeats=10),
    "kv_retrieval": KVRetrieval(),
}


@pytest.mark.parametrize("name", list(TASKS), ids=list(TASKS))
def test_deterministic_length_and_scorer(name, smollm2):
    _, tok = smollm2
    t = TASKS[name]
    a, b, c = t.make(tok, 1024, 2, 0), t.make(tok, 1024, 2, 0), t.make(tok, 1024, 3, 0)
    assert a == b and (a.answers != c.answers or a.context != c.context)
    ctx, rest = encode(tok, a)
    assert 800 <= len(ctx) + len(rest) <= 1024, len(ctx) + len(rest)
    assert all(x in a.context for x in a.answers) or name == "common_words"
    gold = " " + ", ".join(a.answers) + "."
    assert t.correct(t.score(gold, a))
    if len(a.answers) > 1:  # one answer missing: partial score, not correct
        partial = " " + ", ".join(a.answers[1:])
        assert not t.correct(t.score(partial, a)) and 0 < t.score(partial, a) < 1
    near = gold.replace(a.answers[0], a.answers[0][:-1] + ("0" if a.answers[0][-1] != "0" else "1"))
    assert not t.correct(t.score(near, a))


def test_common_words_are_the_most_frequent(smollm2):
    _, tok = smollm2
    s = CommonWords(common=3, repeats=12).make(tok, 1024, 0, 0)
    words = [line.split(". ", 1)[1] for line in s.context.splitlines()[1:]]
    counts = {w: words.count(w) for w in set(words)}
    top = sorted(counts, key=lambda w: -counts[w])[:3]
    assert set(top) == set(s.answers) and min(counts[w] for w in s.answers) == 12


def test_variable_chain_is_in_order(smollm2):
    _, tok = smollm2
    s = VariableTracking(hops=4).make(tok, 1024, 1, 0)
    pos = [s.context.index(f"VAR {n} =") for n in s.answers]
    assert pos == sorted(pos)


@pytest.mark.parametrize("spec,arg", [("multivalue:values=1", "values"), ("multiquery:queries=99", "queries"),
                                      ("variable_tracking:hops=0", "hops"), ("common_words:common=0", "common"),
                                      ("multivalue:haystack=web", "haystack")])
def test_bad_task_arguments(spec, arg):
    with pytest.raises(ValueError, match=arg):
        make_task(spec, BenchConfig(tasks=(spec,)))
