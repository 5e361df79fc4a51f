"""``longattn bench --peer kvpress``: the same samples through kvpress's presses, in the same run, beside ours.

kvpress (NVIDIA, https://github.com/NVIDIA/kvpress) is optional and must be importable in this environment
(kvpress 0.5 pins transformers < 5.3; longattn also runs there). For every bench method whose KV policy has a
kvpress equivalent, the peer row ``kvpress:<Press>:ratio=R`` runs the same sample the way kvpress's pipeline
does: the context is prefilled inside ``with press(model)`` (compressed there), then the question and answer
prefix are fed with explicit positions (kvpress's cache reports the compressed length) and the answer is
decoded greedily; fidelity is teacher-forced along dense's answer from a copy of the compressed cache, as for
our rows. Time inside the press (``press.compress``) is the row's ``method_s``.
"""

from __future__ import annotations

import copy
import time

import torch

__all__ = ["presses", "peer_method", "make_press", "run_press", "require_kvpress"]


def presses() -> dict[str, str]:
    """Our KV policy name -> kvpress press class name, from each policy's own ``kvpress_press``."""
    from .. import registry

    return {e.name: e.cls.__dict__["kvpress_press"] for e in registry.entries("kv")
            if e.cls.__dict__.get("kvpress_press")}


def require_kvpress():
    try:
        import kvpress
    except ImportError:
        raise ValueError("--peer kvpress: kvpress is not installed in this environment (pip install kvpress; "
                         "kvpress 0.5 pins transformers<5.3, so use an environment with both)") from None
    return kvpress


def peer_method(method: str) -> str | None:
    """The peer row's name for one of our methods (``snapkv:ratio=0.5`` -> ``kvpress:SnapKVPress:ratio=0.5``), or
    None when the recipe is not a plain KV policy with a kvpress equivalent."""
    from ..api import parse

    r = parse(method)
    if r.kv is None or r.prefill is not None or r.decode is not None or r.kv.is_noop:
        return None
    args = press_args(r.kv)
    if args is None:
        return None
    name, kw = args
    return ":".join([f"kvpress:{name}:ratio={r.kv.ratio}"] + [f"{k}={v}" for k, v in kw.items()])


def press_args(policy) -> tuple[str, dict] | None:
    """``(press class name, its arguments besides the ratio)`` of our KV ``policy``, or None without an
    equivalent (a nested press is written ``Press/arg=value/...``)."""
    table = presses()
    if policy.name not in table:
        return None
    kw = policy.kvpress_kwargs()
    return None if kw is None else (table[policy.name], kw)


def _value(text: str):
    if text in ("True", "False"):
        return text == "True"
    try:
        return int(text)
    except ValueError:
        return float(text)


def _nested(kvpress, spec: str):
    """``Press/arg=value/...`` -> that press (its ratio is set by the wrapper)."""
    cls, *args = spec.split("/")
    return getattr(kvpress, cls)(**{a.split("=", 1)[0]: _value(a.split("=", 1)[1]) for a in args})


def make_press(peer: str):
    """The press of a peer row's name (``kvpress:<Press>:ratio=R[:arg=value...]``)."""
    kvpress = require_kvpress()
    _, cls, *args = peer.split(":")
    kw = {}
    for arg in args:
        name, _, value = arg.partition("=")
        kw["compression_ratio" if name == "ratio" else name] = _value(value) if "/" not in value and not \
            value.endswith("Press") else _nested(kvpress, value)
    if cls == "RandomPress":
        kw["seed"] = 0
    press_cls = getattr(kvpress, cls)
    ratio = kw.pop("compression_ratio")
    if "press" in kw:  # a wrapper (CriticalKVPress): its ratio is its inner press's
        press = press_cls(**kw)
        press.compression_ratio = ratio
        return press
    return press_cls(compression_ratio=ratio, **kw)


def _forward(model, ids, cache, start: int):
    from ..hf import cache_kwarg_name

    pos = torch.arange(start, start + len(ids)).unsqueeze(0)
    return model(torch.tensor([ids]), position_ids=pos, use_cache=True, **{cache_kwarg_name(model): cache}).logits[0]


def run_press(model, tokenizer, peer: str, ctx: list[int], rest: list[int], max_new_tokens: int, ref: dict,
              decode_steps: int = 0) -> dict:
    """One sample through kvpress (see the module docstring); fields as ``protocols.run_qa`` (``decode_steps``
    likewise: greedy steps past the answer, for the decode timing only)."""
    from transformers import DynamicCache

    from ..cache import cache_nbytes
    from ..hf import cache_kwarg_name
    from .decoding import greedy
    from .metrics import PeakMemory, fidelity
    from .protocols import more_steps

    kvpress = require_kvpress()
    press = make_press(peer)
    eager = isinstance(press, kvpress.ObservedAttentionPress)
    prev = model.config._attn_implementation
    spent = [0.0]
    orig = press.compress

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = orig(*args, **kwargs)
        spent[0] += time.perf_counter() - t0
        return out

    press.compress = timed
    eos = set(tokenizer.all_special_ids)
    cache = DynamicCache()
    if eager:
        model.set_attn_implementation("eager")
    try:
        # timed across the whole press block: a press may compress on leaving it (KVzipPress runs its
        # reconstruction passes there), which a timer around the forward alone would miss
        t0 = time.perf_counter()
        with torch.no_grad(), PeakMemory(model.device) as pm, press(model):
            model(torch.tensor([ctx]), use_cache=True, output_attentions=eager, **{cache_kwarg_name(model): cache})
        prefill_s = time.perf_counter() - t0
    finally:
        if eager:
            model.set_attn_implementation(prev)
    kv_bytes = cache_nbytes(cache)
    snapshot = copy.deepcopy(cache)
    with torch.no_grad():
        # one token at a time where layers hold different lengths (a multi-token mask is sized by layer 0)
        if isinstance(press, kvpress.PyramidKVPress):
            for j, t in enumerate(rest):
                logits = _forward(model, [t], cache, len(ctx) + j)[-1]
        else:
            logits = _forward(model, rest, cache, len(ctx))[-1]
        pos = [len(ctx) + len(rest)]

        def feed(tok):
            pos[0] += 1
            return _forward(model, [tok], cache, pos[0] - 1)[-1]

        gen, decode_s = greedy(logits, feed, max_new_tokens, eos)
        more, more_s = more_steps(feed, gen, decode_steps - max(len(gen) - 1, 0))
        steps, decode_s = max(len(gen) - 1, 0) + more, decode_s + more_s
        kv_end = cache_nbytes(cache)
        feed = rest + ref["answer_ids"][:-1]
        if isinstance(press, kvpress.PyramidKVPress):
            tf = torch.stack([_forward(model, [t], snapshot, len(ctx) + j)[-1] for j, t in enumerate(feed)])
        else:
            tf = _forward(model, feed, snapshot, len(ctx))
        tf = tf[len(rest) - 1 :]
    kl, top1 = fidelity(ref["ref_logits"], tf)
    return {"prediction": tokenizer.decode(gen, skip_special_tokens=True), "n_tokens": len(ctx) + len(rest),
            "kv_cache_bytes": kv_bytes, "kv_cache_bytes_end": kv_end, "peak_bytes": pm.peak_bytes,
            "prefill_s": prefill_s, "decode_s": decode_s,
            "decode_tok_s": (steps / decode_s) if steps and decode_s > 0 else None, "decode_steps": steps,
            "method_s": spent[0],
            "kl": kl, "top1_agree": top1, "protocol": "question_agnostic", "recall": None, "decode_density": None}
