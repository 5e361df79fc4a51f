"""``answer_kept``: how much of the answer written in the context (a needle) a compressed cache still holds.

The references are set arithmetic on the definition: the positions kept per (layer, kv head) are what the layer
was told to keep (plus what was appended after), and the answer's positions are the characters where the answer
is written (a character-level tokenizer makes token i character i)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from longattn.bench.prompts import _texts, answer_positions, encode, text_positions
from longattn.bench.protocols import run_qa
from longattn.bench.tasks import Niah, Passkey
from longattn.cache import LongattnLayer, kept_fraction
from longattn.models import tiny_model, tiny_tokenizer


def _reference(idx, lengths, n, tail, want):
    """Loop by loop: per (batch row, kv head), the kept set is idx[:length] plus the appended positions."""
    fracs = []
    for b in range(idx.shape[0]):
        for h in range(idx.shape[1]):
            held = {int(i) for i in idx[b, h, : lengths[b, h]]} | set(range(n, n + tail))
            fracs.append(sum(p in held for p in want) / len(want))
    return fracs


@pytest.mark.parametrize("ragged", [False, True], ids=["uniform", "ragged"])
def test_kept_fraction_is_the_share_of_the_positions_each_compressed_row_holds(ragged):
    b, hk, n, d, tail = 2, 3, 30, 4, 5
    idx = torch.stack([torch.stack([torch.randperm(n)[:20].sort().values for _ in range(hk)]) for _ in range(b)])
    lengths = torch.tensor([[20, 7, 12], [3, 20, 16]]) if ragged else torch.full((b, hk), 12)
    comp = LongattnLayer()
    comp.update(torch.randn(b, hk, n, d), torch.randn(b, hk, n, d))
    comp.compress(idx, lengths)
    comp.update(torch.randn(b, hk, tail, d), torch.randn(b, hk, tail, d))  # appended after: held
    plain = LongattnLayer()  # never compressed (a dense or sliding layer): not counted
    plain.update(torch.randn(b, hk, n + tail, d), torch.randn(b, hk, n + tail, d))
    want = [1, 4, 9, 17, 22, 31]
    got = kept_fraction(SimpleNamespace(layers=[plain, comp]), want)
    ref = _reference(idx, lengths, n, tail, want)
    assert got == pytest.approx((sum(ref) / len(ref), sum(f == 1.0 for f in ref) / len(ref)))
    all_kept = [int(i) for i in idx[0, 0, : lengths[0, 0]]][:2] + [n + 1]
    rows_all = _reference(idx, lengths, n, tail, all_kept)
    assert kept_fraction(SimpleNamespace(layers=[comp]), all_kept)[1] == pytest.approx(
        sum(f == 1.0 for f in rows_all) / len(rows_all)) and rows_all[0] == 1.0
    assert kept_fraction(SimpleNamespace(layers=[plain]), want) is None  # nothing compressed
    assert kept_fraction(SimpleNamespace(layers=[comp]), []) is None


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat-template"])
@pytest.mark.parametrize("task", [Passkey(), Niah(haystack="filler")], ids=["passkey", "niah"])
def test_answer_positions_are_where_the_answer_is_written(task, chat):
    tok = tiny_tokenizer(chat_template=chat)
    s = task.make(tok, 400, 3, 0)
    ctx, _ = encode(tok, s)
    text, _, bos = _texts(tok, s)
    key = s.answers[0]
    chars = [i for i in range(len(text)) if any(text[j : j + len(key)] == key for j in range(i - len(key) + 1, i + 1))]
    pos = answer_positions(tok, s)
    assert pos == [c + int(bos) for c in chars]  # character i is token i (+ the BOS)
    assert "".join(tok.decode([ctx[p]]) for p in pos) == key * text.count(key)
    assert text.count(key) == (2 if isinstance(task, Passkey) else 1)  # the pass key is written twice
    (needle,) = s.meta["needles"]  # the whole sentence, with the key a niah question asks by
    at = text.index(needle)
    assert key in needle and text_positions(tok, s, [needle]) == [c + int(bos) for c in range(at, at + len(needle))]


def test_answer_positions_none_without_the_answer_in_the_context():
    tok = tiny_tokenizer()
    s = Passkey().make(tok, 300, 0, 0)
    assert answer_positions(tok, SimpleNamespace(**{**s.__dict__, "answers": ["not there"]})) is None


def test_a_recent_window_policy_keeps_a_late_needle_and_drops_an_early_one():
    """streaming_llm keeps the sinks and the most recent tokens: a pass key near the end is held by every row,
    one near the start by none; dense compresses nothing (None)."""
    m, tok = tiny_model("llama", num_hidden_layers=2), tiny_tokenizer()
    task = Passkey()
    by_depth = sorted((task.make(tok, 600, i, 0) for i in range(12)), key=lambda s: s.meta["depth"])
    early, late = by_depth[0], by_depth[-1]
    assert early.meta["depth"] < 0.3 and late.meta["depth"] > 0.8
    kw = {"answer_in_context": True}
    for sample, want in ((early, 0.0), (late, 1.0)):
        res = run_qa(m, tok, "streaming_llm:ratio=0.5", sample, 4, None, **kw)
        assert res["answer_kept"] == want and res["answer_kept_rows"] == want
        assert res["needle_kept"] == want and res["needle_kept_rows"] == want
    dense = run_qa(m, tok, "dense", late, 4, None, **kw)
    assert dense["answer_kept"] is None and dense["answer_kept_rows"] is None and dense["needle_kept"] is None
    assert run_qa(m, tok, "streaming_llm:ratio=0.5", late, 4, None)["answer_kept"] is None  # not asked


@pytest.mark.model
def test_answer_positions_on_a_bpe_tokenizer_spell_the_answer(smollm2):
    """On SmolLM2's byte-level BPE (chat template, digits one token each) the positions spell the answer at
    every place it is written."""
    _, tok = smollm2
    for task in (Passkey(), Niah()):
        s = task.make(tok, 1024, 1, 0)
        ctx, _ = encode(tok, s)
        pos = answer_positions(tok, s)
        assert tok.decode([ctx[p] for p in pos]) == s.answers[0] * s.context.count(s.answers[0])


@pytest.mark.parametrize("name", ["passkey", "niah", "multivalue", "multiquery", "kv_retrieval"])
def test_every_needle_task_writes_its_answers_and_needles_in_the_context(name):
    from longattn import api, registry

    task = api.parse_method(name, "task")
    assert task.answer_in_context and registry.get(name, "task").cls.answer_in_context
    s = task.make(tiny_tokenizer(), 800, 2, 0)
    assert s.meta["needles"] and all(n in s.context for n in s.meta["needles"])
    assert all(a in s.context for a in s.answers)
    assert all(any(a in n for n in s.meta["needles"]) for a in s.answers)


def test_the_table_shows_the_mean_kept_shares():
    from longattn.bench.report import bench_table

    base = {"task": "niah", "length": 1024, "kv_cache_bytes": 2**20, "prefill_s": 1.0, "decode_tok_s": 5.0,
            "kl": 0.1, "top1_agree": 1.0, "score": 1.0, "sample": 0}
    recs = [{**base, "method": "dense"}] + [
        {**base, "method": "kvzip:ratio=0.75", "sample": i, "answer_kept": a, "needle_kept": nk}
        for i, (a, nk) in enumerate(((1.0, 0.5), (0.5, 0.25)))]
    lines = bench_table(recs).splitlines()
    head = lines[0].split("  ")
    head = [h.strip() for h in head if h.strip()]
    row = [c for c in lines[-1].split() if c]
    assert row[head.index("ans kept") - len(head)] == "0.75" and row[head.index("needle kept") - len(head)] == "0.38"
