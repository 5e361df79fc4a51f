"""The forward passes a bench row is made of: prefill (timed, peak memory, a prefill pattern's recall on the
side), greedy decoding, teacher forcing along a reference answer. Shared by our rows and the kvpress peer rows."""

from __future__ import annotations

import contextlib
import time

import torch

from ..recall import attention_recall
from .metrics import PeakMemory

__all__ = ["RECALL_ROWS", "forward", "prefill", "greedy", "greedy_model", "teacher"]

RECALL_ROWS = 32  # query rows per layer on which a prefill pattern's attention recall is measured


def _keeps_logits(model) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


def forward(model, ids: list[int] | torch.Tensor, cache, kw: str, last: bool = False):
    """The logits of ``ids`` fed after ``cache``; ``last``: only the last position's (a long prefill would
    otherwise materialise ``tokens x vocab`` logits: 8.6 GB at 8K tokens for Gemma's 262K vocabulary)."""
    x = ids if torch.is_tensor(ids) else torch.tensor([ids], device=model.device)
    extra = {"logits_to_keep": 1} if last and _keeps_logits(model) else {}
    return model(input_ids=x, use_cache=True, **{kw: cache}, **extra).logits


def prefill(model, session, recipe, ids: list[int], cache, kw: str):
    """Prefill ``ids`` into ``cache`` (in the KV policy's chunks when it has some), measuring time and peak
    memory; a prefill pattern's recall is measured on the side (its time excluded). Returns
    ``(last logits, prefill_s, peak_bytes, recall or None, extra)``; ``extra``: ``attn_prefill_s`` (seconds inside
    the full-attention layers' attention during the prefill), ``compile_s`` (FlexAttention's compilation during it,
    left out of ``prefill_s`` and ``attn_prefill_s``) and ``prefill_density`` (the pattern's share of the
    causal pairs it computes, mean over layers; None without a pattern)."""
    kv = recipe.kv
    chunk = kv.chunk if (kv is not None and kv.repeat) else None
    recalls: list[float] = []
    densities: list[float] = []
    pattern = recipe.prefill

    def observe(layer_idx, q, k, v, key_valid):  # the pattern's recall per layer, on sampled query rows
        lay = pattern.for_layer(layer_idx).layout(q, k, key_valid)
        recalls.append(float(attention_recall(lay, q, k, rows=RECALL_ROWS, key_valid=key_valid).mean()))
        densities.append(float(lay.density()))

    from ..ops.flex import compile_seconds

    watch = session.observe(observe) if pattern is not None else contextlib.nullcontext()
    a0, o0 = session.attention_seconds["prefill"], session.observed_seconds
    c0 = compile_seconds()
    with watch, PeakMemory(model.device) as pm:
        t0 = time.perf_counter()
        size = chunk or len(ids)
        for s0 in range(0, len(ids), size):
            logits = forward(model, ids[s0 : s0 + size], cache, kw, last=True)[0, -1]
        compile_s = compile_seconds() - c0
        # the recall's time is excluded, and compilation is reported apart (compile_s)
        prefill_s = time.perf_counter() - t0 - (session.observed_seconds - o0) - compile_s
    # the session leaves its observers and compilation out of the full layers' attention seconds itself
    extra = {"attn_prefill_s": session.attention_seconds["prefill"] - a0,
             "prefill_density": (sum(densities) / len(densities)) if densities else None, "compile_s": compile_s}
    return logits, prefill_s, pm.peak_bytes, (sum(recalls) / len(recalls)) if recalls else None, extra


def greedy(logits, feed, max_new_tokens: int, eos: set[int]) -> tuple[list[int], float]:
    """Greedy decoding from ``logits``; ``feed(token)`` runs one step and returns the next logits (the last
    token is not fed). Returns ``(tokens, seconds)``."""
    gen: list[int] = []
    t1 = time.perf_counter()
    for step in range(max_new_tokens):
        tok = int(logits.argmax())
        gen.append(tok)
        if tok in eos or step == max_new_tokens - 1:
            break
        logits = feed(tok)
    return gen, time.perf_counter() - t1


def greedy_model(model, logits, cache, kw: str, max_new_tokens: int, eos: set[int]) -> tuple[list[int], float]:
    return greedy(logits, lambda tok: forward(model, [tok], cache, kw, last=True)[0, -1], max_new_tokens, eos)


def teacher(model, cache, kw: str, head: torch.Tensor | None, rest: list[int], answer: list[int],
             one_by_one: bool) -> torch.Tensor:
    """Teacher-forced next-token logits over ``answer``: the logits after ``rest`` (or ``head`` when ``rest`` is
    empty), then after each answer token but the last. With a decode selector the answer tokens go one at a
    time, so the selector is what produces those logits."""
    parts = [head[None] if not rest else forward(model, rest, cache, kw, last=True)[0, -1:]]
    feed = answer[:-1]
    if feed and one_by_one:
        parts += [forward(model, [t], cache, kw)[0] for t in feed]
    elif feed:
        parts.append(forward(model, feed, cache, kw)[0])
    return torch.cat(parts)
