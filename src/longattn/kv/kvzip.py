"""KVzip: query-agnostic compression scored by how much each cached pair helps the model reconstruct its context.

Paper: "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction" (Kim et al., NeurIPS 2025,
https://arxiv.org/abs/2505.23416); reference code https://github.com/snu-mllab/KVzip. After the context is
prefilled, the model is asked to repeat it: for each chunk of ``chunk`` context tokens, the input "Repeat the
previous context exactly." (later chunks: "Repeat the part of the previous context exactly, starting with" + the
last ``prev`` tokens of the previous chunk), the chat template's assistant turn and the chunk itself are run over
the cached context, teacher-forced. A cached pair's importance is the largest attention any reconstruction query
(of any query head of its group) pays it, the softmax taken over the first ``sink`` tokens, the chunk being
reconstructed and the reconstruction tokens themselves (as the paper's code does, so a pass costs the chunk, not
the cache). The reconstruction tokens are then dropped from the cache and the pairs with the lowest importance
are evicted: ``budget=global`` ranks every pair of every full-attention layer and head together (the paper's
default, so layers and heads keep different amounts: a ragged per-head cache), ``budget=layer`` gives every layer
the same share (heads ragged inside it), ``budget=head`` every head the same. ``head_level=true`` is the
paper's head-level variant: a head's importance is its largest pair score; the least important heads keep only
their ``sink`` first and ``recent`` last tokens, the others everything, as many heads as remove ``ratio`` of the
cache. The first ``sink`` tokens are never evicted. ``plus=true`` is KVzip+ (the scores kvpress's KVzap is
trained to predict, Jegou & Jeblick 2026, https://arxiv.org/abs/2601.07891): each attention weight of a
reconstruction query ``t`` on pair ``i`` is first multiplied by ``||W_O^h v_i|| / ||x_t||`` (the norm of what the
pair adds to the head's output through the output projection, over the norm of the attention's input at ``t``:
the pair's share of the update it makes), then maximised as above; the ranking is unchanged by the log the
KVzap targets take.

Departures: the scores use the layer's own logit scale (Gemma's ``query_pre_attn_scalar``) and softcap;
sliding-window layers of hybrid models are left to
their window (they are not in the budget). Costs 1-2 extra forwards of the context (one per chunk, each the
length of the chunk plus ~20 tokens). Needs the tokenizer: ``apply(model, recipe, tokenizer=tok)`` (the bench
and the command line pass it). Batch size 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..checks import check_choice, check_int
from ..registry import register
from .base import KVPolicy, press_changes

__all__ = ["KVzip"]

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
BUDGETS = ("global", "layer", "head")


def template_parts(tokenizer) -> tuple[list[int], list[int]]:
    """``(prefix ids, suffix ids)``: what the chat template puts before a user message and after it (up to the
    assistant's turn); ``([], "\\n")`` without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return [], tokenizer("\n", add_special_tokens=False)["input_ids"]
    dummy, sep = "dummy context", "\n" + "#" * 13
    text = tokenizer.apply_chat_template([{"role": "user", "content": dummy + sep}], add_generation_prompt=True,
                                         tokenize=False, enable_thinking=False)
    before, suffix = text.split(sep)
    prefix = before.split(dummy)[0]
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    return enc(prefix), enc(suffix)


def chunk_scores(q, k, start: int, end: int, sink: int, scale: float, softcap: float | None = None,
                 first: int = 0, key_weight=None, query_weight=None):
    """``[b, hk, end - start]``: for the reconstruction queries ``q [b, hq, m, d]`` (the last ``m`` of ``k``), the
    largest softmax weight each cached key in ``[first + start, first + end)`` receives, over the group's query
    heads and the queries; the softmax runs over the first ``sink`` real keys (from ``first``: left padding), the
    chunk and the reconstruction keys (causal among themselves). KVzip+: each weight times ``key_weight [b, hq,
    end - start]`` (per query head and key) and ``query_weight [b, m]`` (per query) before the maximum."""
    from ..ops.core import capped

    b, hq, m, d = q.shape
    hk = k.shape[1]
    s = min(sink, start)
    lo, hi = first + start, first + end
    ks = torch.cat([k[:, :, first : first + s], k[:, :, lo:hi], k[:, :, -m:]], 2).float()  # [b, hk, s + c + m, d]
    logits = capped(torch.matmul(q.float().view(b, hk, hq // hk, m, d), ks.unsqueeze(2).transpose(-1, -2)) * scale,
                    softcap)
    own = torch.arange(m, device=q.device)
    causal = own[None, :] <= own[:, None]  # [m, m]
    allowed = torch.cat([torch.ones(m, ks.shape[2] - m, dtype=torch.bool, device=q.device), causal], 1)
    p = logits.masked_fill(~allowed, float("-inf")).softmax(-1)[..., s : s + end - start]  # [b, hk, g, m, c]
    if key_weight is not None:
        p = p * key_weight.float().view(b, hk, hq // hk, 1, end - start)
    if query_weight is not None:
        p = p * query_weight.float().view(b, 1, 1, m, 1)
    return p.amax(dim=(2, 3))


def value_out_norms(v, o_weight, hq: int):
    """``[b, hq, n]``: ``||W_O^h v_i||`` for every query head ``h`` and value ``v [b, hk, n, d]`` (its kv head's),
    ``W_O^h`` the head's ``d`` columns of the output projection ``o_weight [hidden, hq * d]``; through the head's
    ``d x d`` Gram matrix ``W_O^h^T W_O^h`` (never the ``hidden``-wide products)."""
    b, hk, n, d = v.shape
    w = o_weight.float().view(o_weight.shape[0], hq, d)  # [hidden, hq, d]
    gram = torch.einsum("jhd,jhe->hde", w, w)  # [hq, d, d]
    vv = v.float().repeat_interleave(hq // hk, dim=1)  # [b, hq, n, d]
    return torch.einsum("bhnd,hde,bhne->bhn", vv, gram, vv).clamp_min(0).sqrt()


class _removing:
    """Removes the hook handles on leaving the block."""

    def __init__(self, hooks):
        self.hooks = hooks

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        return False


def row_cache(cache, b: int):
    """A cache holding batch row ``b`` of every layer of ``cache`` (views: nothing copied), for a forward of that
    row alone; what the forward appends stays in the row cache."""
    from transformers import DynamicCache

    from ..cache import LongattnLayer

    out = DynamicCache()
    out.layers = []
    for layer in cache.layers:
        row = LongattnLayer(window=layer.window)
        row.lazy_initialization(layer.keys[b : b + 1], layer.values[b : b + 1])
        row.keys, row.values, row.dropped = layer.keys[b : b + 1], layer.values[b : b + 1], layer.dropped
        out.layers.append(row)
    return out


@register("kvzip", "kv", paper="KVzip (Kim et al., NeurIPS 2025) https://arxiv.org/abs/2505.23416",
          summary="importance = max attention a pair gets while the model reconstructs its context (query-agnostic)")
@dataclass(frozen=True)
class KVzip(KVPolicy):
    """Context-reconstruction importance, evicted globally (ragged per head)."""

    kvpress_press = "KVzipPress"
    examples = ({"chunk": 64, "sink": 4}, {"chunk": 64, "budget": "layer"}, {"head_level": True, "recent": 8})

    sink: int = 4
    chunk: int = 2048
    prev: int = 8
    budget: str = "global"
    head_level: bool = False
    recent: int = 64
    plus: bool = False

    model_pass: ClassVar[bool] = True
    no_reference = ("scored by forwards of the model (not per layer): tests/test_kvzip.py holds the whole procedure "
                    "to a loop-by-loop reference")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.sink, "sink", 0)
        check_int(self.chunk, "chunk", 16)
        check_int(self.prev, "prev", 0)
        check_int(self.recent, "recent", 0)
        check_choice(self.budget, "budget", BUDGETS)
        if not isinstance(self.head_level, bool):
            raise ValueError(f"head_level must be true or false, got {self.head_level!r}")
        if not isinstance(self.plus, bool):
            raise ValueError(f"plus must be true or false, got {self.plus!r}")

    def kvpress_kwargs(self) -> dict | None:
        if self.head_level or self.budget == "head" or self.prev != 8 or self.plus:
            return None  # KVzipPress scores pairs (no head-level variant, no KVzip+), by layer or globally, prev 8
        return press_changes({"layerwise": self.budget == "layer", "n_sink": self.sink, "chunk_size": self.chunk},
                             {"layerwise": False, "n_sink": 4, "chunk_size": 2048})

    def score(self, q, k, v, key_valid, module=None):  # pragma: no cover - model_pass: scored in after_prefill
        raise NotImplementedError("kvzip scores with reconstruction forwards (after_prefill), not per layer")

    def reconstruction_inputs(self, tokenizer, ids: list[int]) -> list[tuple[int, int, list[int]]]:
        """``(start, end, reconstruction ids)`` per chunk of the context (after the chat template's prefix)."""
        prefix, suffix = template_parts(tokenizer)
        p = len(prefix) if ids[: len(prefix)] == prefix else 0
        enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
        out = []
        for i, start in enumerate(range(p, len(ids), self.chunk)):
            end = min(start + self.chunk, len(ids))
            head = enc(FIRST_PROMPT) if i == 0 else enc(NEXT_PROMPT) + ids[max(p, start - self.prev) : start]
            out.append((start, end, head + suffix + ids[start:end]))
        return out

    def after_prefill(self, session, input_ids, attention_mask=None, position_ids=None) -> None:
        rows = self.importance(session, input_ids, attention_mask, position_ids)
        if rows is None:
            return  # not a fresh prefill of these ids (a continuation, or no full-attention layer): nothing to score
        cache = session.cache
        kept: dict[int, list] = {i: [] for i in rows[0][1]}
        for first, scores in rows:
            for i, heads in self.evict(scores, scores[next(iter(scores))].shape[-1]).items():
                kept[i].append([h + first for h in heads])  # back to the row's physical positions
        for i, per_row in kept.items():
            self._compress(cache.layers[i], per_row)

    def importance(self, session, input_ids, attention_mask=None, position_ids=None) -> list[tuple[int, dict]] | None:
        """Per batch row, ``(first real position, {full-attention layer: [kv heads, real tokens] importance})``
        of the context ``input_ids`` just prefilled into ``session.cache`` (None where the cache does not hold
        exactly that prefill): the reconstruction forwards run on a view of the row's cache, dense, at the
        positions after the context's last (``position_ids``, as the prefill was given them; else the cache
        length), and what they append is dropped with the view."""
        from ..cache import LongattnLayer

        if session.tokenizer is None:
            raise ValueError("kvzip needs the tokenizer (its reconstruction prompt): apply(model, recipe, "
                             "tokenizer=tok)")
        model, cache = session.model, session.cache
        full = [i for i, layer in enumerate(cache.layers) if isinstance(layer, LongattnLayer) and layer.window is None]
        b, n = input_ids.shape
        if not full or any(cache.layers[i].compressed or cache.layers[i].physical_len != n for i in full):
            return None
        valid = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                 else attention_mask[:, -n:].bool())
        modules = {}
        for mod in model.modules():
            if getattr(mod, "layer_idx", None) is not None and hasattr(mod, "scaling"):  # the attention modules
                modules.setdefault(mod.layer_idx, mod)
        rows = []
        for row in range(b):
            real = valid[row].nonzero().flatten()
            first, n_real = int(real[0]) if len(real) else n, len(real)
            if n_real == 0 or int(real[-1]) - first + 1 != n_real:
                raise ValueError(f"kvzip: row {row}'s real tokens must be contiguous (left or right padding)")
            nxt = n if position_ids is None else int(position_ids[min(row, position_ids.shape[0] - 1), -1]) + 1
            ids = input_ids[row, first : first + n_real].tolist()
            rows.append((first, self._row_importance(session, row, ids, first, valid[row : row + 1], nxt, full,
                                                     modules)))
        return rows

    def _row_importance(self, session, row: int, ids: list[int], first: int, valid, nxt: int, full: list[int],
                        modules: dict) -> dict:
        """One batch row's ``{layer: [kv heads, len(ids)]}``: its reconstruction forwards, scored as they run."""
        from ..hf import cache_kwarg_name, module_logits

        cache, base = session.cache, session.model.base_model
        dev = valid.device
        scores = {i: torch.zeros(cache.layers[i].keys.shape[1], len(ids), device=dev) for i in full}
        span = {}
        hidden_norm: dict[int, torch.Tensor] = {}  # KVzip+: ||x_t|| of the attention's input, per layer

        def observe(layer_idx, q, k, v, key_valid):
            if layer_idx not in scores:
                return
            mod = modules.get(layer_idx)
            d = q.shape[-1]
            scale, softcap, _ = module_logits(mod, d) if mod is not None else (1.0 / math.sqrt(d), None, None)
            lo, hi = span["now"]
            kwt = qwt = None
            if self.plus:
                kwt = value_out_norms(v[:, :, first + lo : first + hi], mod.o_proj.weight, q.shape[1])
                qwt = 1.0 / hidden_norm[layer_idx][:, -q.shape[2]:].clamp_min(1e-12)
            sc = chunk_scores(q, k, lo, hi, self.sink, scale, softcap, first, kwt, qwt)[0]
            scores[layer_idx][:, lo:hi] = torch.maximum(scores[layer_idx][:, lo:hi], sc)

        hooks = []
        if self.plus:
            for i in full:
                mod = modules.get(i)
                if mod is None or not hasattr(mod, "o_proj"):
                    raise ValueError("kvzip:plus=true needs each full-attention layer's output projection (o_proj) "
                                     f"for ||W_O v||; layer {i} of this model has none")

                def grab(module, args, kwargs, i=i):
                    h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                    hidden_norm[i] = h.float().norm(dim=-1)

                hooks.append(mod.register_forward_pre_hook(grab, with_kwargs=True))
        kw = cache_kwarg_name(base)
        with torch.no_grad(), session.scoring_pass(), session.observe(observe), _removing(hooks):
            for lo, hi, rec in self.reconstruction_inputs(session.tokenizer, ids):
                span["now"] = (lo, hi)
                m = len(rec)
                am = torch.cat([valid.long(), torch.ones(1, m, dtype=torch.long, device=dev)], 1)
                pos = torch.arange(nxt, nxt + m, device=dev)[None]
                base(input_ids=torch.tensor([rec], device=dev), attention_mask=am, position_ids=pos, use_cache=True,
                     **{kw: row_cache(cache, row)})
        return scores

    def evict(self, scores: dict, n: int) -> dict:
        """Kept positions ``{layer: [per kv head, ascending]}`` from one row's importance ``{layer: [hk, n]}``."""
        scores = {i: s.clone() for i, s in scores.items()}
        top = max(float(s.max()) for s in scores.values()) + 1.0
        for s in scores.values():
            s[:, : self.sink] = top  # sinks are never evicted
        if self.head_level:
            return self._evict_heads(scores, n)
        idxs = sorted(scores)
        if self.budget == "global":
            flat = torch.cat([scores[i].flatten() for i in idxs])
            order = torch.argsort(flat, stable=True)[: int(flat.numel() * self.ratio)]  # the least important pairs
            drop_layer = torch.bincount(order // scores[idxs[0]].numel(), minlength=len(idxs)).tolist()
        else:
            drop_layer = [int(scores[i].numel() * self.ratio) for i in idxs]
        out = {}
        for j, i in enumerate(idxs):
            s = scores[i]  # [hk, n]
            hk = s.shape[0]
            if self.budget == "head":
                keep = max(1, n - int(n * self.ratio))
                out[i] = [torch.topk(s[h], keep).indices.sort().values for h in range(hk)]
            else:  # the layer's least important pairs across its heads
                gone = torch.zeros(hk * n, dtype=torch.bool, device=s.device)
                gone[torch.argsort(s.flatten(), stable=True)[: drop_layer[j]]] = True
                out[i] = [torch.nonzero(~g).flatten() for g in gone.view(hk, n)]
        return out

    def _evict_heads(self, scores: dict, n: int) -> dict:
        keep_stream = min(self.sink + self.recent, n)
        saved = n - keep_stream
        heads = sorted((float(scores[i][h, self.sink :].max()) if n > self.sink else 0.0, i, h)
                       for i in scores for h in range(scores[i].shape[0]))
        count = 0 if saved <= 0 else min(len(heads), math.ceil(self.ratio * len(heads) * n / saved))
        stream = {(i, h) for _, i, h in heads[:count]}
        pos = torch.arange(n, device=next(iter(scores.values())).device)
        short = ((pos < self.sink) | (pos >= n - self.recent)).nonzero().flatten()
        return {i: [short if (i, h) in stream else pos for h in range(scores[i].shape[0])] for i in scores}

    @staticmethod
    def _compress(layer, kept: list[list[torch.Tensor]]) -> None:
        """Keep ``kept[row][head]`` (physical positions) of ``layer``."""
        lengths = torch.tensor([[len(x) for x in row] for row in kept])
        width = max(int(lengths.max()), 1)
        idx = torch.stack([torch.stack([torch.nn.functional.pad(x, (0, width - len(x))) for x in row])
                           for row in kept])
        layer.compress(idx.to(layer.keys.device), lengths)
