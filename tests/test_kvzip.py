"""KVzip against a loop-by-loop reference of its definition: the plain model (eager, no longattn) reads the context
followed by the reconstruction prompt and the context chunk, teacher-forced; a pair's importance is the largest
attention a reconstruction query of its group pays it, the softmax restricted to the sinks, the chunk and the
reconstruction tokens (the eager weights renormalised over that set); then the least important pairs go."""

import math

import pytest
import torch

import longattn
from _helpers import ids_batch
from longattn.kv.kvzip import FIRST_PROMPT, NEXT_PROMPT
from longattn.models import tiny_model, tiny_tokenizer


def _rec_text_ids(tok, ids, chunk, prev, template):
    """The reconstruction inputs, built from strings (not from the policy's helpers)."""
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    if template:
        prefix, suffix = enc("<|user|>\n"), enc("\n<|assistant|>\n")
    else:
        prefix, suffix = [], enc("\n")
    p = len(prefix) if ids[: len(prefix)] == prefix else 0
    out = []
    for i, start in enumerate(range(p, len(ids), chunk)):
        end = min(start + chunk, len(ids))
        head = enc(FIRST_PROMPT) if i == 0 else enc(NEXT_PROMPT) + ids[max(p, start - prev) : start]
        out.append((start, end, head + suffix + ids[start:end]))
    return out


def _reference_scores(m, ids, chunk, prev, sink, template, tok, plus=False):
    """``{layer: [kv head][position] -> importance}`` for one row's real ``ids`` (float64, loop by loop); ``plus``
    (KVzip+): each weight times ||W_O^h v_j|| / ||x_t||, x_t the layer's input after its input norm."""
    cfg = m.config
    hq, hk = cfg.num_attention_heads, cfg.num_key_value_heads
    g = hq // hk
    n = len(ids)
    full = [i for i, t in enumerate(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)
            if t == "full_attention"]
    score = {i: [[0.0] * n for _ in range(hk)] for i in full}
    prev_impl = m.config._attn_implementation
    m.set_attn_implementation("eager")
    try:
        for start, end, rec in _rec_text_ids(tok, ids, chunk, prev, template):
            x = torch.tensor([ids + rec])
            with torch.no_grad():
                out = m(x, output_attentions=True, output_hidden_states=True, use_cache=True)
            att = out.attentions
            mlen = len(rec)
            s = min(sink, start)
            allowed = list(range(s)) + list(range(start, end))
            for li in full:
                a = att[li][0].double()  # [hq, L, L]
                if plus:
                    layer = m.model.layers[li]
                    with torch.no_grad():
                        x_in = layer.input_layernorm(out.hidden_states[li])[0].double()  # the attention's input
                    vals = out.past_key_values.layers[li].values[0].double()  # [hk, L, d]
                    wo = layer.self_attn.o_proj.weight.detach().double()  # [hidden, hq * d]
                    d = vals.shape[-1]
                for h in range(hk):
                    for qh in range(h * g, (h + 1) * g):
                        for i in range(mlen):
                            row = a[qh, n + i]
                            subset = allowed + list(range(n, n + i + 1))
                            z = float(sum(row[j] for j in subset))
                            for j in range(start, end):
                                w = float(row[j]) / z
                                if plus:
                                    w *= float((wo[:, qh * d : (qh + 1) * d] @ vals[h, j]).norm())
                                    w /= float(x_in[n + i].norm())
                                score[li][h][j] = max(score[li][h][j], w)
    finally:
        m.set_attn_implementation(prev_impl)
    return score


def _reference_keep(score, n, ratio, sink, budget):
    """Kept positions ``{layer: [kv head] -> set}`` and the score of every pair (sinks never evicted)."""
    pairs = [(math.inf if j < sink else score[li][h][j], li, h, j) for li in score for h in range(len(score[li]))
             for j in range(n)]
    if budget == "global":
        groups = [pairs]
        drops = [int(len(pairs) * ratio)]
    elif budget == "layer":
        groups = [[p for p in pairs if p[1] == li] for li in score]
        drops = [int(len(gr) * ratio) for gr in groups]
    else:
        groups = [[p for p in pairs if (p[1], p[2]) == (li, h)] for li in score for h in range(len(score[li]))]
        drops = [min(int(n * ratio), n - 1) for _ in groups]
    dropped = set()
    for gr, d in zip(groups, drops):
        dropped |= {(li, h, j) for _, li, h, j in sorted(gr)[:d]}
    return {li: [{j for j in range(n) if (li, h, j) not in dropped} for h in range(len(score[li]))] for li in score}


def _check(got, want, score, sink, n, budget, what):
    """Equal kept sets; a swap is accepted only between pairs whose reference scores tie to 1e-5 (float error
    between the cached and the uncached forward), the kept count unchanged within the budget's group."""
    for li in want:
        for h in range(len(want[li])):
            g, w = got[li][h], want[li][h]
            if g == w:
                continue
            sc = score[li][h]
            extra, missing = g - w, w - g
            assert max(extra | missing) >= sink and all(
                abs(sc[a] - sc[b]) < 1e-5 for a in extra for b in missing), (
                f"{what} layer {li} head {h}: kept {sorted(g)}, the reference keeps {sorted(w)}")
    if budget != "global":
        for li in want:
            assert [len(x) for x in got[li]] == [len(x) for x in want[li]] or budget == "layer"
    total = lambda d: sum(len(x) for li in d for x in d[li])  # noqa: E731
    assert total(got) == total(want), f"{what}: kept {total(got)} pairs, the reference {total(want)}"


def _run(m, tok, spec, ids, am):
    with torch.no_grad(), longattn.apply(m, spec, tokenizer=tok) as s:
        m.generate(ids, attention_mask=am, max_new_tokens=2, do_sample=False)
        cache = s.cache
    return cache


@pytest.mark.parametrize("arch,template,budget,chunk", [
    ("llama", False, "global", 48), ("llama", True, "layer", 64), ("qwen3", True, "head", 200),
    ("gemma3_text", False, "global", 40), ("gemma2", True, "global", 64)],
    ids=["llama-global-3chunks", "llama-template-layer", "qwen3-head-1chunk", "gemma3-hybrid-global",
         "gemma2-softcap-template"])
def test_kept_pairs_equal_the_reconstruction_reference(arch, template, budget, chunk):
    m = tiny_model(arch, num_hidden_layers=2)
    tok = tiny_tokenizer(chat_template=template)
    ids, am = ids_batch(b=2, n=96, pad=(0, 13))
    if template:  # a chat-formatted context: the template's user prefix is not reconstructed
        prefix = tok("<|user|>\n", add_special_tokens=False)["input_ids"]
        ids[0, : len(prefix)] = torch.tensor(prefix)
        ids[1, 13 : 13 + len(prefix)] = torch.tensor(prefix)
    ratio, sink, prev = 0.6, 4, 8
    cache = _run(m, tok, f"kvzip:ratio={ratio}:chunk={chunk}:sink={sink}:prev={prev}:budget={budget}", ids, am)
    for row in range(2):
        real = ids[row][am[row].bool()].tolist()
        first = int(am[row].bool().nonzero()[0])
        score = _reference_scores(m, real, chunk, prev, sink, template, tok)
        want = _reference_keep(score, len(real), ratio, sink, budget)
        got = {li: [set((cache.layers[li].kept(row, h).long() - first).tolist())
                    for h in range(m.config.num_key_value_heads)] for li in want}
        _check(got, want, score, sink, len(real), budget, f"{arch} row {row}")
    for li, layer in enumerate(cache.layers):  # sliding-window layers are left to their window
        if getattr(m.config, "layer_types", None) and m.config.layer_types[li] == "sliding_attention":
            assert not layer.compressed


@pytest.mark.parametrize("arch,template,chunk", [("llama", False, 40), ("gemma3_text", True, 64),
                                                  ("gemma2", False, 500)],
                         ids=["llama-3chunks", "gemma3-template-2chunks", "gemma2-softcap-1chunk"])
def test_importance_equals_the_reconstruction_reference(arch, template, chunk):
    m = tiny_model(arch, num_hidden_layers=2)
    tok = tiny_tokenizer(chat_template=template)
    ids, am = ids_batch(b=2, n=90, pad=(0, 11))
    pol = longattn.parse(f"kvzip:ratio=0.5:chunk={chunk}:sink=4:prev=8").kv
    with torch.no_grad(), longattn.apply(m, pol, tokenizer=tok) as s:
        s.set_compression(False)
        pos = (am.cumsum(-1) - 1).clamp(min=0)  # as generate: the real tokens from position 0
        m(ids, attention_mask=am, position_ids=pos, use_cache=True)
        rows = pol.importance(s, ids, am, pos)
    for row, (first, scores) in enumerate(rows):
        real = ids[row][am[row].bool()].tolist()
        assert first == int(am[row].bool().nonzero()[0])
        want = _reference_scores(m, real, chunk, 8, 4, template, tok)
        assert sorted(scores) == sorted(want)
        for li in want:
            err = (scores[li].double() - torch.tensor(want[li], dtype=torch.float64)).abs()
            assert float(err.max()) <= 1e-6 + 1e-4 * float(scores[li].abs().max()), (
                f"{arch} row {row} layer {li}: importance off the reference by up to {float(err.max()):.2e}")


@pytest.mark.parametrize("arch,template,chunk", [("llama", False, 40), ("gemma3_text", True, 64)],
                         ids=["llama-3chunks", "gemma3-template-2chunks"])
def test_kvzip_plus_importance_equals_the_weighted_reconstruction_reference(arch, template, chunk):
    """KVzip+: the weights times ||W_O^h v_j|| / ||x_t|| before the maximum; and the kept pairs follow it."""
    m = tiny_model(arch, num_hidden_layers=2)
    tok = tiny_tokenizer(chat_template=template)
    ids, am = ids_batch(b=1, n=90, pad=(0,))
    pol = longattn.parse(f"kvzip:ratio=0.5:chunk={chunk}:sink=4:prev=8:plus=true").kv
    with torch.no_grad(), longattn.apply(m, pol, tokenizer=tok) as s:
        s.set_compression(False)
        m(ids, attention_mask=am, use_cache=True)
        ((_, scores),) = pol.importance(s, ids, am, None)
    real = ids[0].tolist()
    want = _reference_scores(m, real, chunk, 8, 4, template, tok, plus=True)
    plain = _reference_scores(m, real, chunk, 8, 4, template, tok)
    for li in want:
        ref = torch.tensor(want[li], dtype=torch.float64)
        err = (scores[li].double() - ref).abs()
        assert float(err.max()) <= 1e-6 + 1e-4 * float(ref.abs().max()), (
            f"{arch} layer {li}: KVzip+ importance off the reference by up to {float(err.max()):.2e}")
        assert not torch.allclose(ref, torch.tensor(plain[li], dtype=torch.float64))  # the weights matter
    cache = _run(m, tok, f"kvzip:ratio=0.5:chunk={chunk}:sink=4:prev=8:plus=true", ids, am)
    keep = _reference_keep(want, len(real), 0.5, 4, "global")
    got = {li: [set(cache.layers[li].kept(0, h).long().tolist()) for h in range(m.config.num_key_value_heads)]
           for li in keep}
    _check(got, keep, want, 4, len(real), "global", f"{arch} plus")


def test_head_level_streams_the_least_important_heads():
    m = tiny_model("llama", num_hidden_layers=2)
    tok = tiny_tokenizer()
    ids, am = ids_batch(b=1, n=80, pad=(0,))
    ratio, sink, recent = 0.4, 4, 8
    cache = _run(m, tok, f"kvzip:ratio={ratio}:head_level=true:sink={sink}:recent={recent}:chunk=2048", ids, am)
    n = 80
    score = _reference_scores(m, ids[0].tolist(), 2048, 8, sink, False, tok)
    heads = sorted((max(score[li][h][sink:]), li, h) for li in score for h in range(2))
    count = math.ceil(ratio * len(heads) * n / (n - sink - recent))
    stream = {(li, h) for _, li, h in heads[:count]}
    short = set(range(sink)) | set(range(n - recent, n))
    for li in score:
        for h in range(2):
            got = set(cache.layers[li].kept(0, h).tolist())
            assert got == (short if (li, h) in stream else set(range(n))), f"layer {li} head {h}"


def test_answers_come_from_the_compressed_cache_and_memory_is_freed():
    from longattn.cache import cache_nbytes

    m = tiny_model("llama")
    tok = tiny_tokenizer()
    ids, am = ids_batch(b=2, n=128, pad=(0, 21))
    with torch.no_grad():
        full = m(ids, attention_mask=am, use_cache=True).past_key_values
        with longattn.apply(m, "kvzip:ratio=0.75", tokenizer=tok) as s:
            out = m.generate(ids, attention_mask=am, max_new_tokens=6, do_sample=False)
            nbytes = cache_nbytes(s.cache)
            assert s.compressions == m.config.num_hidden_layers and s.method_s > 0
    assert out.shape == (2, 134)
    assert nbytes < 0.4 * cache_nbytes(full)


def test_ratio_zero_is_dense_and_needs_no_tokenizer():
    m = tiny_model("llama")
    ids, am = ids_batch(b=2, n=64, pad=(0, 9))
    with torch.no_grad():
        ref = m.generate(ids, attention_mask=am, max_new_tokens=4, do_sample=False)
        with longattn.apply(m, "kvzip:ratio=0") as s:
            out = m.generate(ids, attention_mask=am, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref) and s.compressions == 0


def test_without_a_tokenizer_or_with_holes_in_the_mask_it_says_so():
    m = tiny_model("llama")
    ids, am = ids_batch(b=1, n=64, pad=(0,))
    with pytest.raises(ValueError, match="kvzip needs the tokenizer"), longattn.apply(m, "kvzip:ratio=0.5"):
        m(ids, attention_mask=am, use_cache=True)
    am[0, 10] = 0
    with pytest.raises(ValueError, match="contiguous"), longattn.apply(m, "kvzip:ratio=0.5", tokenizer=tiny_tokenizer()):
        m(ids, attention_mask=am, use_cache=True)


@pytest.mark.parametrize("spec,match", [("kvzip:budget=all", "budget"), ("kvzip:chunk=4", "chunk"),
                                        ("kvzip:head_level=2", "head_level"), ("kvzip:plus=2", "plus")])
def test_bad_settings_name_the_argument(spec, match):
    with pytest.raises(ValueError, match=match):
        longattn.parse(spec)
