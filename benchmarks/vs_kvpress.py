"""longattn's KV policies side by side with kvpress's presses: same model, same inputs, same ratios, one run.

    python benchmarks/vs_kvpress.py [--samples 10] [--length 1024] [--ratios 0.25,0.5,0.75,0.875]
                                    [--json bench_out/vs_kvpress.json]

kvpress 0.5.x pins transformers < 5.3: run this from an environment where ``pip install kvpress`` was done
(longattn works on transformers 5.2). Skips with a message when kvpress is not installed.

For each policy both have, at each ratio, on the embedded SmolLM2-135M and on a tiny random Llama:
- ``jaccard``: overlap of the kept positions per (layer, kv head), averaged (the first passkey sample);
- ``acc``: passkey accuracy, question-agnostic protocol (context compressed, then question + answer prefix);
- ``kv_bytes``: bytes the cache holds after compression (kvpress's DuoAttention only masks: it keeps them all);
- ``overhead_ms``: time inside the compression (scoring + gather) during the prefill: our ``method_s``, and
  kvpress's ``press.compress`` timed by a wrapper (kvpress's H2O equivalent needs eager attention, whose extra
  cost in the attention itself is not counted).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

try:
    import kvpress
except ImportError:  # pragma: no cover - optional
    kvpress = None

import longattn
from longattn import models
from longattn.bench.peer_kvpress import presses
from longattn.bench.prompts import encode
from longattn.bench.tasks import Passkey
from longattn.cache import cache_nbytes
from longattn.hf import cache_kwarg_name

POLICIES = ("snapkv", "streaming_llm", "knorm", "tova", "pyramidkv", "h2o", "random", "duo_attention")


def make_press(name: str, ratio: float, profile=None):
    """kvpress's equivalent of our policy ``name`` (the policy's own ``kvpress_press``; DuoAttention with our
    head scores)."""
    if name == "duo_attention":
        return _duo_press(ratio, profile)
    cls = getattr(kvpress, presses()[name])
    return cls(compression_ratio=ratio, **({"seed": 0} if name == "random" else {}))


def _duo_press(ratio, profile):
    """kvpress's DuoAttentionPress with our head scores (it otherwise downloads patterns) and our sink/recent."""
    import numpy as np

    class Duo(kvpress.DuoAttentionPress):
        def post_init_from_model(self, model):
            self.sink_size, self.recent_size = 16, 64
            scores = np.array(profile)
            n_pruned = round(scores.size * self.head_compression_ratio)
            self.streaming_mask = torch.zeros(scores.shape, dtype=bool, device=model.device)
            if n_pruned > 0:
                idx = np.argsort(scores, axis=None)[:n_pruned]
                self.streaming_mask[np.unravel_index(idx, scores.shape)] = True

    return Duo(head_compression_ratio=ratio)


def ours_spec(name: str, ratio: float, n: int, num_heads: int) -> str:
    if name == "duo_attention":
        return f"duo_attention:ratio={ratio}"
    return f"{name}:ratio={ratio}"


def _rows_index(full: torch.Tensor, kept: torch.Tensor) -> list[int]:
    """Positions of ``kept`` rows inside ``full``: the nearest row (the eager attention kvpress's H2O needs
    changes the keys of deeper layers in the last bits, so exact matching would miss)."""
    return sorted(set(torch.cdist(kept.float(), full.float()).argmin(-1).tolist()))


def run_kvpress(model, press, ctx, rest, max_new, eos, dense_keys):
    from transformers import DynamicCache

    cache = DynamicCache()
    eager = isinstance(press, kvpress.ObservedAttentionPress)
    prev = model.config._attn_implementation
    if eager:
        model.set_attn_implementation("eager")
    spent = [0.0]
    orig = press.compress

    def timed(*args, **kwargs):  # time spent inside the press (scoring + gather), as our method_s
        t0 = time.perf_counter()
        out = orig(*args, **kwargs)
        spent[0] += time.perf_counter() - t0
        return out

    press.compress = timed
    try:
        with torch.no_grad(), press(model):
            model(torch.tensor([ctx]), past_key_values=cache, use_cache=True, output_attentions=eager)
        t = spent[0]
    finally:
        if eager:
            model.set_attn_implementation(prev)
    kept = None
    masked = [getattr(layer.self_attn, "masked_key_indices", None) for layer in model.model.layers]
    if any(m is not None for m in masked):
        # a press that masks instead of evicting (KVzip, DuoAttention, AdaKV-style): kept = the context minus the
        # masked (batch 0, head, position) triples it hands its attention patch
        kept = []
        for i, m in enumerate(masked):
            heads = cache.layers[i].keys.shape[1]
            drop = [set() for _ in range(heads)]
            if m is not None:
                for b_, h_, s_ in zip(*(t.tolist() for t in m)):
                    if b_ == 0:
                        drop[h_].add(s_)
            kept.append([sorted(set(range(len(ctx))) - drop[h]) for h in range(heads)])
    elif dense_keys is not None:
        kept = [[_rows_index(dense_keys[i][0, h], cache.layers[i].keys[0, h]) for h in range(cache.layers[i].keys.shape[1])]
                for i in range(len(cache.layers))]
    nbytes = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    gen = []
    # as kvpress's pipeline: explicit positions, since its cache reports the compressed length
    pos = torch.arange(len(ctx), len(ctx) + len(rest)).unsqueeze(0)
    with torch.no_grad(), (press(model) if isinstance(press, kvpress.DuoAttentionPress) else _null()):
        if isinstance(press, kvpress.PyramidKVPress):
            # layers hold different lengths; transformers sizes a multi-token mask by layer 0, so one token at a time
            for j, t_id in enumerate(rest):
                logits = model(torch.tensor([[t_id]]), past_key_values=cache, position_ids=pos[:, j : j + 1],
                               use_cache=True).logits[0, -1]
        else:
            logits = model(torch.tensor([rest]), past_key_values=cache, position_ids=pos,
                           use_cache=True).logits[0, -1]
        nxt = len(ctx) + len(rest)
        for _ in range(max_new):
            tok = int(logits.argmax())
            gen.append(tok)
            if tok in eos:
                break
            logits = model(torch.tensor([[tok]]), past_key_values=cache, position_ids=torch.tensor([[nxt]]),
                           use_cache=True).logits[0, -1]
            nxt += 1
    return gen, t, nbytes, kept


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def run_ours(model, spec, ctx, rest, max_new, eos, tokenizer=None):
    from transformers import DynamicCache

    kw = cache_kwarg_name(model)
    cache = DynamicCache()
    with torch.no_grad(), longattn.apply(model, spec, tokenizer=tokenizer) as s:  # kvzip needs the tokenizer
        t0 = time.perf_counter()
        model(input_ids=torch.tensor([ctx]), use_cache=True, **{kw: cache})
        t = time.perf_counter() - t0
        s.set_compression(False)
        nbytes = cache_nbytes(cache)
        kept = None
        layers = cache.layers
        if getattr(layers[0], "compressed", False):
            kept = [[layers[i].kept(0, h).tolist() for h in range(layers[i].kept_lengths().shape[1])]
                    for i in range(len(layers))]
        gen = []
        logits = model(input_ids=torch.tensor([rest]), use_cache=True, **{kw: cache}).logits[0, -1]
        for _ in range(max_new):
            tok = int(logits.argmax())
            gen.append(tok)
            if tok in eos:
                break
            logits = model(input_ids=torch.tensor([[tok]]), use_cache=True, **{kw: cache}).logits[0, -1]
    return gen, t, nbytes, kept, s.method_s


def dense_keys_of(model, ctx):
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        t0 = time.perf_counter()
        model(torch.tensor([ctx]), past_key_values=cache, use_cache=True)
        t = time.perf_counter() - t0
    return [layer.keys for layer in cache.layers], t


def jaccard(a, b):
    out = []
    for la, lb in zip(a, b):
        for ha, hb in zip(la, lb):
            sa, sb = set(ha), set(hb)
            out.append(len(sa & sb) / max(len(sa | sb), 1))
    return sum(out) / len(out)


def tiny_overlap(policies, ratios, json_path) -> int:
    """Kept-position Jaccard on a tiny random Llama (no accuracy: its answers mean nothing)."""
    m = models.tiny_model("llama", num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                          hidden_size=128, head_dim=16)
    m.config.name_or_path = "tiny-llama"
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(3, 128, (512,), generator=g).tolist()
    dense_keys, _ = dense_keys_of(m, ctx)
    scores = torch.rand(m.config.num_hidden_layers, m.config.num_key_value_heads, generator=g).tolist()
    rows = []
    for pol in [p for p in policies if p not in ("duo_attention",)]:
        for r in ratios:
            press = make_press(pol, r, scores)
            _, _, _, kept_k = run_kvpress(m, press, ctx, ctx[-4:], 1, set(), dense_keys)
            _, _, _, kept_o, _ = run_ours(m, ours_spec(pol, r, len(ctx), 2), ctx, ctx[-4:], 1, set())
            rows.append({"policy": pol, "ratio": r, "model": "tiny-llama", "jaccard": jaccard(kept_o, kept_k)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(rows, indent=1))
    print("| policy | " + " | ".join(str(r) for r in ratios) + " |")
    print("|---|" + "---|" * len(ratios))
    for pol in dict.fromkeys(r["policy"] for r in rows):
        cells = [f"{r['jaccard']:.2f}" for r in rows if r["policy"] == pol]
        print(f"| {pol} | " + " | ".join(cells) + " |")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--ratios", default="0.25,0.5,0.75,0.875")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--json", default="bench_out/vs_kvpress.json")
    ap.add_argument("--tiny", action="store_true",
                    help="only the kept-position overlap on a tiny random Llama (random tokens, 512 long)")
    a = ap.parse_args(argv)
    if kvpress is None:
        print("vs_kvpress: kvpress is not installed (pip install kvpress, which pins transformers < 5.3); "
              "skipping", file=sys.stderr)
        return 0
    ratios = [float(x) for x in a.ratios.split(",")]
    policies = [p for p in a.policies.split(",") if p]
    if a.tiny:
        return tiny_overlap(policies, ratios, a.json)
    model, tok = models.load("smollm2-135m")
    # KVzipPress loads the tokenizer from name_or_path (for its chat template): the local converted copy
    model.config.name_or_path = str(models.resolve("smollm2-135m")) if "kvzip" in policies else "smollm2-135m"
    from longattn.profiles import load_profile

    profile = [list(r) for r in load_profile("smollm2-135m").scores]
    eos = set(tok.all_special_ids)
    task = Passkey()
    samples = [task.make(tok, a.length, i, 0) for i in range(a.samples)]
    enc = [encode(tok, s) for s in samples]
    records = []
    dense_ok = 0
    dense_keys, _ = dense_keys_of(model, enc[0][0])
    dense_t = []
    for ctx, _ in enc:
        _, t = dense_keys_of(model, ctx)
        dense_t.append(t)
    dense_t = sorted(dense_t)[len(dense_t) // 2]
    for (ctx, rest), s in zip(enc, samples):
        gen, *_ = run_ours(model, "dense", ctx, rest, task.max_new_tokens, eos)
        dense_ok += task.score(tok.decode(gen), s)
    print(f"dense: {dense_ok}/{len(samples)}  prefill {dense_t * 1e3:.0f} ms", file=sys.stderr)
    for pol in policies:
        for r in ratios:
            rec = {"policy": pol, "ratio": r, "model": "smollm2-135m", "length": a.length, "samples": a.samples}
            for side in ("longattn", "kvpress"):
                ok, nb, over = 0, [], []
                kept_first = None
                for i, ((ctx, rest), s) in enumerate(zip(enc, samples)):
                    if side == "kvpress":
                        press = make_press(pol, r, profile)
                        gen, t, nbytes, kept = run_kvpress(model, press, ctx, rest, task.max_new_tokens, eos,
                                                           dense_keys if i == 0 else None)
                        over.append(t * 1e3)
                    else:
                        gen, t, nbytes, kept, ms = run_ours(model, ours_spec(pol, r, len(ctx), 3), ctx, rest,
                                                            task.max_new_tokens, eos, tokenizer=tok)
                        over.append(ms * 1e3)
                    if i == 0:
                        kept_first = kept
                    ok += task.score(tok.decode(gen), s)
                    nb.append(nbytes)
                rec[f"{side}_acc"] = ok / len(samples)
                rec[f"{side}_kv_bytes"] = sum(nb) / len(nb)
                rec[f"{side}_overhead_ms"] = sorted(over)[len(over) // 2]
                rec[f"{side}_kept"] = kept_first
            if rec["longattn_kept"] and rec["kvpress_kept"] and pol != "duo_attention":
                rec["jaccard"] = jaccard(rec["longattn_kept"], rec["kvpress_kept"])
            else:
                rec["jaccard"] = None
            del rec["longattn_kept"], rec["kvpress_kept"]
            records.append(rec)
            print(json.dumps(rec), file=sys.stderr, flush=True)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"dense_acc": dense_ok / len(samples), "records": records}, indent=1))
    print("| policy | ratio | acc longattn | acc kvpress | KV MiB longattn | KV MiB kvpress | Jaccard | "
          "overhead ms longattn | overhead ms kvpress |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        j = "-" if r["jaccard"] is None else f"{r['jaccard']:.2f}"
        print(f"| {r['policy']} | {r['ratio']} | {r['longattn_acc']:.2f} | {r['kvpress_acc']:.2f} | "
              f"{r['longattn_kv_bytes'] / 2**20:.1f} | {r['kvpress_kv_bytes'] / 2**20:.1f} | {j} | "
              f"{r['longattn_overhead_ms']:.0f} | {r['kvpress_overhead_ms']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
