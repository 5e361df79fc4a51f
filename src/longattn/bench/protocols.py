"""How one (method, sample) runs: the protocols a task declares (``Task.protocol``).

- ``qa`` (kvpress's pipeline): the context is prefilled and the KV policy compresses it (question-agnostic);
  then the question and answer prefix are fed uncompressed and the answer is decoded greedily. A
  ``query_aware`` policy compresses after the question instead (SnapKV's paper setting).
- ``shared_context`` (SCBench): the context is prefilled and compressed once; every query then runs as the
  next turn of one conversation (``multi_turn``) or on a fresh copy of the compressed context
  (``multi_request``).
- ``perplexity`` (StreamingLLM): prefill (and compress) a text but its last ``eval_tokens``, then score those
  teacher-forced.

Every protocol returns the same fields; fidelity is teacher-forced along dense's answer from a copy of the
cache taken after the context (one token at a time when the recipe has a decode selector), and compared with
dense's next-token distributions.
"""

from __future__ import annotations

import copy
import time

import torch

from .. import api
from ..cache import cache_nbytes, kept_fraction
from . import decoding
from .decoding import forward, greedy_model, teacher
from .metrics import fidelity
from .prompts import encode, followup_ids, text_positions
from .tasks.base import Sample

__all__ = ["PROTOCOLS", "answer_kept", "run_qa", "run_perplexity", "run_turns", "run_sample"]


def _stats(session) -> dict:
    """The fields every protocol reads off the session once the sample ran."""
    d = session.decode_stats
    return {"method_s": session.method_s,
            # decode selectors: fraction of the cached tokens the selected layers attended, over all decode steps
            "decode_density": (d["selected"] / d["possible"]) if d.get("possible") else None}


def _plain(model, n_tokens: int) -> dict:
    """What the plain model's cache holds for the same tokens (and its full-attention, compressible part)."""
    from ..hf import plain_cache_bytes

    total, full = plain_cache_bytes(model, n_tokens)
    return {"plain_bytes": total, "plain_full_bytes": full}


def _eos(tokenizer) -> set[int]:
    return set(tokenizer.all_special_ids) if tokenizer is not None else set()


def _tok_s(steps: int, seconds: float):
    return (steps / seconds) if steps and seconds > 0 else None


def more_steps(feed, gen: list[int], steps: int) -> tuple[int, float]:
    """After a greedy answer ``gen``, ``steps`` more decode steps (greedy, EOS ignored) for the timing only:
    ``(steps run, seconds)``; ``feed(token)`` returns the next token's logits. The answer is what was scored;
    these steps only lengthen the timed window (ours and the kvpress rows alike)."""
    if steps <= 0 or not gen:
        return 0, 0.0
    t0 = time.perf_counter()
    tok = gen[-1]
    for _ in range(steps):
        tok = int(feed(tok).argmax())
    return steps, time.perf_counter() - t0


NOT_KEPT = {"answer_kept": None, "answer_kept_rows": None, "needle_kept": None, "needle_kept_rows": None}


def answer_kept(tokenizer, sample: Sample, cache) -> dict:
    """``answer_kept``: the mean, over the (layer, kv head) rows a KV policy compressed, of the fraction of the
    answer's tokens in the context (every place it is written) that the cache still holds; ``answer_kept_rows``:
    the fraction of those rows that hold all of them. ``needle_kept`` / ``needle_kept_rows``: the same over the
    tokens of the whole needle sentences the task lists (``sample.meta["needles"]``: with the key a question
    asks by, a niah city). None where nothing was compressed (dense, decode selectors) or the text cannot be
    located (``prompts.text_positions``). They tell a policy that dropped the needle from one that kept it and
    still lost the answer."""
    out = {}
    for name, strings in (("answer", sample.answers), ("needle", sample.meta.get("needles", []))):
        pos = text_positions(tokenizer, sample, strings)
        got = kept_fraction(cache, pos) if pos else None
        out[f"{name}_kept"], out[f"{name}_kept_rows"] = (got if got else (None, None))
    return out


def run_qa(model, tokenizer, recipe, sample: Sample, max_new_tokens: int, ref: dict | None,
           decode_steps: int = 0, answer_in_context: bool = False, keep: dict | None = None) -> dict:
    """One question over one context (the ``qa`` protocol, see the module docstring). ``decode_steps``: decode
    at least that many steps for the decode timing (the answer first, then greedy steps past it, untimed for
    nothing else). ``answer_in_context``: the answer is written in the context (a needle), so the result says
    how much of it the compressed cache holds (``answer_kept``, ``needle_kept``, ...: see ``answer_kept``).
    ``keep``: a dict that receives the decode state the run ends with (``recipe``, ``cache``, the next token
    ``tok``) instead of freeing it (``bench --decode-rounds``)."""
    from transformers import DynamicCache

    ctx, rest = encode(tokenizer, sample)
    eos = _eos(tokenizer)
    recipe = api.parse(recipe)
    query_aware = bool(recipe.kv is not None and recipe.kv.query_aware)
    with torch.no_grad(), api.apply(model, recipe, tokenizer=tokenizer) as session:
        kw = session.cache_kwarg
        cache = DynamicCache(config=model.config)  # sliding-window layers hold their window, as in generate()
        # question-agnostic: prefill (and compress) the context alone; query-aware: context + question
        logits, prefill_s, peak, recall, extra = decoding.prefill(model, session, recipe,
                                                                  ctx + rest if query_aware else ctx, cache, kw)
        session.set_compression(False)  # the question and the answer are never compressed
        kv_bytes = cache_nbytes(cache)
        extra.update(answer_kept(tokenizer, sample, cache) if answer_in_context else NOT_KEPT)
        # the fidelity pass continues from a copy of this cache (selector state included): no crop, exact
        snapshot = copy.deepcopy(cache)
        if not query_aware:
            logits = forward(model, rest, cache, kw, last=True)[0, -1]
        tf_first = logits.clone()
        a0, s0 = session.attention_seconds["decode"], session.decode_stats.get("select_s", 0.0)
        gen, decode_s = greedy_model(model, logits, cache, kw, max_new_tokens, eos)
        more, more_s = more_steps(lambda t, c=cache: forward(model, [t], c, kw, last=True)[0, -1], gen,
                                  decode_steps - max(len(gen) - 1, 0))
        steps, decode_s = max(len(gen) - 1, 0) + more, decode_s + more_s
        extra["attn_decode_s"] = session.attention_seconds["decode"] - a0
        extra["select_decode_s"] = session.decode_stats.get("select_s", 0.0) - s0  # the selector, generating
        kv_bytes_end = cache_nbytes(cache)
        if keep is not None:  # the decode state, for interleaved timing rounds after the sample's runs
            keep.update(recipe=recipe, cache=cache, tok=gen[-1])
        del cache
        # teacher-forced along the dense answer, for fidelity (dense's logits are the reference)
        answer_ids = ref["answer_ids"] if ref is not None else gen
        tf = teacher(model, snapshot, kw, tf_first, [] if query_aware else rest, answer_ids, recipe.decode is not None)
        del snapshot
    kl, top1 = (0.0, 1.0) if ref is None else fidelity(ref["ref_logits"], tf)
    return {
        "prediction": tokenizer.decode(gen, skip_special_tokens=True), "n_tokens": len(ctx) + len(rest),
        "kv_cache_bytes": kv_bytes, "kv_cache_bytes_end": kv_bytes_end, "peak_bytes": peak, "prefill_s": prefill_s,
        "decode_s": decode_s, "decode_tok_s": _tok_s(steps, decode_s), "decode_steps": steps, "kl": kl,
        "top1_agree": top1, "answer_ids": gen, "ref_logits": tf,
        "protocol": "query_aware" if query_aware else "question_agnostic",
        "recall": recall, **_stats(session), **extra, **_plain(model, len(ctx) + (len(rest) if query_aware else 0)),
    }


def run_perplexity(model, tokenizer, recipe, sample: Sample, max_new_tokens: int, ref: dict | None) -> dict:
    """Prefill (and compress) the text but its last ``eval_tokens``, then score those teacher-forced."""
    from transformers import DynamicCache

    ids = tokenizer(sample.context, add_special_tokens=False)["input_ids"][: sample.meta["length"]]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids[:-1]
    n_eval = sample.meta["eval_tokens"]
    split = len(ids) - n_eval
    recipe = api.parse(recipe)
    with torch.no_grad(), api.apply(model, recipe, tokenizer=tokenizer) as session:
        kw = session.cache_kwarg
        cache = DynamicCache(config=model.config)  # sliding-window layers hold their window, as in generate()
        logits, prefill_s, peak, recall, extra = decoding.prefill(model, session, recipe, ids[:split], cache, kw)
        session.set_compression(False)
        kv_bytes = cache_nbytes(cache)
        a0 = sum(session.attention_seconds.values())
        t0 = time.perf_counter()
        tf = teacher(model, cache, kw, logits, [], ids[split:], recipe.decode is not None)
        eval_s = time.perf_counter() - t0
        extra["attn_decode_s"] = sum(session.attention_seconds.values()) - a0
        kv_bytes_end = cache_nbytes(cache)
    target = torch.tensor(ids[split:], device=tf.device)
    nll = float(torch.nn.functional.cross_entropy(tf.float(), target))
    kl, top1 = (0.0, 1.0) if ref is None else fidelity(ref["ref_logits"], tf)
    return {
        "prediction": "", "n_tokens": len(ids), "kv_cache_bytes": kv_bytes, "kv_cache_bytes_end": kv_bytes_end,
        "peak_bytes": peak, "prefill_s": prefill_s, "decode_s": eval_s,
        "decode_tok_s": n_eval / eval_s if recipe.decode is not None and eval_s > 0 else None,
        "kl": kl, "top1_agree": top1, "answer_ids": [], "ref_logits": tf,
        "protocol": "perplexity", "recall": recall, "nll": nll, "ppl": float(torch.exp(torch.tensor(nll))),
        **_stats(session), **extra, **_plain(model, split),
    }


def run_turns(model, tokenizer, recipe, sample: Sample, max_new_tokens: int, ref: dict | None) -> dict:
    """A shared-context sample: the context is prefilled and compressed once, then every query runs either as
    the next turn of one conversation (``multi_turn``) or on a fresh copy of the compressed context
    (``multi_request``). Fidelity is teacher-forced along dense's answers (and, multi-turn, dense's history)."""
    from transformers import DynamicCache

    recipe = api.parse(recipe)
    if recipe.kv is not None and recipe.kv.query_aware:
        raise ValueError(f"{recipe}: a query-aware KV policy compresses after one question; a shared context is "
                         "compressed once for every query (use the question-agnostic policy)")
    queries = sample.queries()
    ctx, rest0 = encode(tokenizer, sample)
    eos = _eos(tokenizer)
    one_by_one = recipe.decode is not None
    multi_turn = sample.mode == "multi_turn"
    with torch.no_grad(), api.apply(model, recipe, tokenizer=tokenizer) as session:
        kw = session.cache_kwarg
        cache = DynamicCache(config=model.config)  # sliding-window layers hold their window, as in generate()
        _, prefill_s, peak, recall, extra = decoding.prefill(model, session, recipe, ctx, cache, kw)
        session.set_compression(False)
        kv_bytes = cache_nbytes(cache)
        snapshot = copy.deepcopy(cache)

        def run(work, base, answers_given: list[list[int]] | None):
            """Every turn from ``work`` (fresh copies of ``base`` for later requests), free (greedy) or
            teacher-forced along ``answers_given``; returns per turn ``(generated ids, logits or None)`` and the
            decode seconds and steps."""
            history, out, dec_s, steps = [], [], 0.0, 0
            for i, (q, prefix, _) in enumerate(queries):
                if i and not multi_turn:
                    work = copy.deepcopy(base)
                if i == 0 or not multi_turn:
                    rest = encode(tokenizer, Sample("", sample.context, q, prefix, []))[1] if i else rest0
                else:
                    rest = followup_ids(tokenizer, sample, history, q, prefix)
                if answers_given is None:
                    logits = forward(model, rest, work, kw, last=True)[0, -1]
                    gen, sec = greedy_model(model, logits, work, kw, max_new_tokens, eos)
                    dec_s, steps = dec_s + sec, steps + max(len(gen) - 1, 0)
                    out.append((gen, None))
                else:
                    gen = answers_given[i]
                    out.append((gen, teacher(model, work, kw, None, rest, gen, one_by_one)))
                if multi_turn and i + 1 < len(queries):
                    if gen and gen[-1] not in eos:  # complete the history in the cache with the last token
                        forward(model, [gen[-1]], work, kw, last=True)
                    history.append((q, prefix + tokenizer.decode(gen, skip_special_tokens=True)))
            return out, dec_s, steps

        a0, s0 = session.attention_seconds["decode"], session.decode_stats.get("select_s", 0.0)
        free, decode_s, steps = run(cache, snapshot, None)
        extra["attn_decode_s"] = session.attention_seconds["decode"] - a0
        extra["select_decode_s"] = session.decode_stats.get("select_s", 0.0) - s0
        kv_bytes_end = cache_nbytes(cache)
        del cache
        gens = [g for g, _ in free]
        answers = ref["turn_answer_ids"] if ref is not None else gens
        forced, _, _ = run(copy.deepcopy(snapshot), snapshot, answers)
        del snapshot
    preds = [tokenizer.decode(g, skip_special_tokens=True) for g in gens]
    tf = torch.cat([lg for _, lg in forced])
    kl, top1 = (0.0, 1.0) if ref is None else fidelity(ref["ref_logits"], tf)
    return {
        "prediction": preds[0], "turn_predictions": preds, "n_tokens": len(ctx) + len(rest0),
        "kv_cache_bytes": kv_bytes, "kv_cache_bytes_end": kv_bytes_end, "peak_bytes": peak, "prefill_s": prefill_s,
        "decode_s": decode_s, "decode_tok_s": _tok_s(steps, decode_s), "kl": kl, "top1_agree": top1,
        "answer_ids": gens[0], "turn_answer_ids": gens, "ref_logits": tf, "protocol": f"shared_context:{sample.mode}",
        "recall": recall, **_stats(session), **extra, **_plain(model, len(ctx)),
    }


PROTOCOLS = {"qa": run_qa, "shared_context": run_turns, "perplexity": run_perplexity}


def run_sample(model, tokenizer, recipe, task, sample: Sample, ref: dict | None, decode_steps: int = 0,
               keep: dict | None = None) -> dict:
    """One (method, sample) through the protocol its task declares for it (``decode_steps``, ``keep``: the
    ``qa`` protocol's minimum of timed decode steps and where it leaves its decode state)."""
    proto = task.protocol(sample)
    kw = ({"decode_steps": decode_steps, "answer_in_context": task.answer_in_context, "keep": keep}
          if proto == "qa" else {})
    return PROTOCOLS[proto](model, tokenizer, recipe, sample, task.max_new_tokens, ref, **kw)
