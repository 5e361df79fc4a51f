"""``longattn bench``: run tasks x lengths x samples x methods on one model, in one process.

Protocol (as kvpress's pipeline): the context is prefilled and the KV policy compresses it (question-agnostic);
then the question and answer prefix are fed uncompressed and the answer is decoded greedily. Prefill patterns
apply to every multi-token forward; decode selectors to every single-token forward (the generated tokens).
The chat template of the model is applied when it has one. Fidelity: the method is teacher-forced along the
dense answer, from a copy of its cache taken after the context (one token at a time when the recipe has a
decode selector), and its next-token distributions are compared with dense's.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import api, registry
from ..cache import cache_nbytes
from ..recall import attention_recall
from .metrics import PeakMemory, fidelity
from .tasks.base import Sample

RECALL_ROWS = 32  # query rows per layer on which a prefill pattern's attention recall is measured

__all__ = ["BenchConfig", "run", "encode", "RECORD_FIELDS", "record_key", "read_results"]

RECORD_FIELDS = (
    "task", "method", "length", "sample", "correct", "score", "kv_cache_bytes", "peak_bytes", "prefill_s",
    "decode_tok_s", "method_s", "kl", "top1_agree", "model", "seed",
)
DEFAULT_METHODS = ("dense", "streaming_llm:ratio=0.5", "snapkv:ratio=0.5")


@dataclass
class BenchConfig:
    model: str = "smollm2-135m"
    tasks: tuple[str, ...] = ("passkey",)
    lengths: tuple[int, ...] = (1024,)
    samples: int = 5
    methods: tuple[str, ...] = DEFAULT_METHODS
    seed: int = 0
    json_path: str | None = None
    out_dir: str | None = None
    resume: bool = False
    progress: bool = True
    data: str | None = None  # --task custom: the JSONL file
    scorer: str = "contains"  # --task custom: contains | exact | rouge
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if not self.tasks:
            raise ValueError("--task: give at least one task; allowed: " + ", ".join(registry.names("task")))
        for t in self.tasks:
            registry.get(t.split(":")[0], "task")
        if self.data and "custom" not in self.tasks:
            raise ValueError("--data is read by --task custom only")
        if not self.lengths or any((not isinstance(n, int)) or n < 64 for n in self.lengths):
            raise ValueError(f"--lengths: token counts must be integers >= 64, got {list(self.lengths)}")
        if not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"--samples must be an integer >= 1, got {self.samples}")
        if not self.methods:
            raise ValueError("--methods: give at least one recipe (e.g. dense,snapkv:ratio=0.5)")
        for m in self.methods:
            api.parse(m)


def encode(tokenizer, sample: Sample) -> tuple[list[int], list[int]]:
    """Token ids of (context part, question part) with the chat template applied when the model has one.
    The question part ends with the assistant turn's start and the answer prefix."""
    marker = "\n\n" + sample.question
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": sample.context + marker}], tokenize=False, add_generation_prompt=True
        )
        cut = text.rindex(marker)
        ctx_text, rest_text = text[:cut], text[cut:] + sample.answer_prefix
    else:
        ctx_text, rest_text = sample.context, marker + "\n" + sample.answer_prefix
    ctx = tokenizer(ctx_text, add_special_tokens=False)["input_ids"]
    rest = tokenizer(rest_text, add_special_tokens=False)["input_ids"]
    if not getattr(tokenizer, "chat_template", None) and tokenizer.bos_token_id is not None:
        ctx = [tokenizer.bos_token_id] + ctx
    return ctx, rest


def record_key(r: dict) -> tuple:
    return (r["task"], r["method"], int(r["length"]), int(r["sample"]))


def read_results(path: Path, warn=print) -> list[dict]:
    """Read results.jsonl; corrupt lines are reported and skipped."""
    out = []
    if not path.exists():
        return out
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            record_key(r)
        except (ValueError, KeyError, TypeError) as e:
            warn(f"{path}:{i}: skipping corrupt record ({e})")
            continue
        out.append(r)
    return out


def _forward(model, ids: list[int] | torch.Tensor, cache, kw: str):
    x = ids if torch.is_tensor(ids) else torch.tensor([ids], device=model.device)
    return model(input_ids=x, use_cache=True, **{kw: cache}).logits


def run_one(model, tokenizer, recipe: str, sample: Sample, max_new_tokens: int, ref: dict | None) -> dict:
    """One (method, sample): returns the measured fields (and ``answer_ids``/``ref_logits`` for dense)."""
    from transformers import DynamicCache

    from ..hf import cache_kwarg_name

    kw = cache_kwarg_name(model)
    ctx, rest = encode(tokenizer, sample)
    eos = set(tokenizer.all_special_ids) if tokenizer is not None else set()
    recipe = api.parse(recipe)
    kv = recipe.kv
    query_aware = bool(kv is not None and kv.query_aware)
    chunk = kv.chunk if (kv is not None and kv.repeat) else None
    with torch.no_grad(), api.apply(model, recipe) as session:
        cache = DynamicCache()
        # question-agnostic: prefill (and compress) the context alone; query-aware: context + question
        first = ctx + rest if query_aware else ctx
        recalls: list[float] = []
        obs_s = [0.0]
        pattern = recipe.prefill
        if pattern is not None:  # the pattern's recall per layer, on sampled query rows; its time is excluded
            def observe(layer_idx, q, k, v, key_valid):
                t = time.perf_counter()
                lay = pattern.for_layer(layer_idx).layout(q, k, key_valid)
                recalls.append(float(attention_recall(lay, q, k, rows=RECALL_ROWS, key_valid=key_valid).mean()))
                obs_s[0] += time.perf_counter() - t

            session.observers.append(observe)
        with PeakMemory(model.device) as pm:
            t0 = time.perf_counter()
            size = chunk or len(first)
            for s0 in range(0, len(first), size):
                logits = _forward(model, first[s0 : s0 + size], cache, kw)[0, -1]
            prefill_s = time.perf_counter() - t0 - obs_s[0]
        session.observers.clear()
        session.compress_enabled = False  # the question and the answer are never compressed
        kv_bytes = cache_nbytes(cache)
        # the fidelity pass continues from a copy of this cache (selector state included): no crop, exact
        snapshot = copy.deepcopy(cache)
        # free greedy decoding of the answer
        if not query_aware:
            logits = _forward(model, rest, cache, kw)[0, -1]
        gen: list[int] = []
        tf_first = logits.clone()
        t1 = time.perf_counter()
        for step in range(max_new_tokens):
            tok = int(logits.argmax())
            gen.append(tok)
            if tok in eos or step == max_new_tokens - 1:
                break
            logits = _forward(model, [tok], cache, kw)[0, -1]
        decode_s = time.perf_counter() - t1
        kv_bytes_end = cache_nbytes(cache)
        del cache
        # teacher-forced along the dense answer, for fidelity (dense's logits are the reference); with a decode
        # selector the answer tokens go one at a time, so the selector is what produces those logits
        answer_ids = ref["answer_ids"] if ref is not None else gen
        one_by_one = recipe.decode is not None
        if query_aware:  # the question is inside the compressed cache: continue from the first answer token
            head, feed = tf_first[None], answer_ids[:-1]
        else:
            head = _forward(model, rest, snapshot, kw)[0, -1:]
            feed = answer_ids[:-1]
        parts = [head]
        if feed and one_by_one:
            parts += [_forward(model, [t], snapshot, kw)[0] for t in feed]
        elif feed:
            parts.append(_forward(model, feed, snapshot, kw)[0])
        tf = torch.cat(parts)
        del snapshot
        method_s = session.method_s
        dstats = dict(session.decode_stats)
    pred = tokenizer.decode(gen, skip_special_tokens=True)
    kl, top1 = (0.0, 1.0) if ref is None else fidelity(ref["ref_logits"], tf)
    steps = max(len(gen) - 1, 0)
    return {
        "prediction": pred,
        "n_tokens": len(ctx) + len(rest),
        "kv_cache_bytes": kv_bytes,
        "kv_cache_bytes_end": kv_bytes_end,
        "peak_bytes": pm.peak_bytes,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "decode_tok_s": (steps / decode_s) if steps and decode_s > 0 else None,
        "method_s": method_s,
        "kl": kl,
        "top1_agree": top1,
        "answer_ids": gen,
        "ref_logits": tf,
        "protocol": "query_aware" if query_aware else "question_agnostic",
        "recall": (sum(recalls) / len(recalls)) if recalls else None,
        # decode selectors: fraction of the cached tokens the selected layers attended, over all decode steps
        "decode_density": (dstats["selected"] / dstats["possible"]) if dstats.get("possible") else None,
    }


def make_task(spec: str, cfg: BenchConfig):
    """A task from ``name[:key=value...]`` (``niah:haystack=filler:keys=4``)."""
    if spec.split(":")[0] == "custom":
        return registry.get("custom", "task").cls(data=cfg.data or "", scorer=cfg.scorer)
    return api.parse_method(spec, "task")


def run(cfg: BenchConfig, model=None, tokenizer=None, log=None) -> list[dict]:
    """Run the sweep; returns the records (also written to ``--json`` / ``--out``)."""
    from tqdm.auto import tqdm

    from .. import models

    log = log or (lambda s: print(s, file=sys.stderr))
    cfg.validate()
    tasks = [(t, make_task(t, cfg)) for t in cfg.tasks]  # before loading the model: bad data fails fast
    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    done: dict[tuple, dict] = {}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            for r in read_results(out_dir / "results.jsonl", warn=log):
                done[record_key(r)] = r
        elif (out_dir / "results.jsonl").exists():
            (out_dir / "results.jsonl").unlink()
    if model is None:
        model, tokenizer = models.load(cfg.model)
    with torch.no_grad():  # warm-up, so the first record does not pay for first-touch allocations
        model(input_ids=torch.ones(1, 64, dtype=torch.long, device=model.device))
    methods = list(dict.fromkeys(cfg.methods))
    plan = [(tname, task, length, min(cfg.samples, task.count() or cfg.samples))
            for tname, task in tasks for length in (cfg.lengths if task.uses_length else (0,))]
    total = sum(n for *_, n in plan) * len(methods)
    records: list[dict] = []
    bar = tqdm(total=total, desc="bench", unit="run", disable=not cfg.progress, file=sys.stderr)
    sink = (out_dir / "results.jsonl").open("a") if out_dir is not None else None
    try:
        for tname, task, length, n_samples in plan:
            for i in range(n_samples):
                keys = {m: (tname, m, length, i) for m in methods}
                todo = [m for m in methods if keys[m] not in done]
                for m in methods:
                    if keys[m] in done:
                        records.append(done[keys[m]])
                        bar.update(1)
                if not todo:
                    continue
                sample = task.make(tokenizer, length, i, cfg.seed)
                # dense is the reference of every method's fidelity: it always runs first
                bar.set_postfix_str(f"{tname} {length} #{i} dense")
                ref = run_one(model, tokenizer, "dense", sample, task.max_new_tokens, None)
                for m in todo:
                    bar.set_postfix_str(f"{tname} {length} #{i} {m}")
                    res = ref if m == "dense" else run_one(model, tokenizer, m, sample, task.max_new_tokens, ref)
                    score = task.score(res["prediction"], sample)
                    rec = {
                        "task": tname, "method": m, "length": length, "sample": i,
                        "correct": task.correct(score), "score": score,
                        **{k: res[k] for k in ("kv_cache_bytes", "peak_bytes", "prefill_s", "decode_tok_s",
                                               "method_s", "kl", "top1_agree")},
                        "model": cfg.model, "seed": cfg.seed,
                        "decode_s": res["decode_s"], "n_tokens": res["n_tokens"],
                        "kv_cache_bytes_end": res["kv_cache_bytes_end"],
                        "prediction": res["prediction"], "answer": sample.answers[0],
                        "protocol": res["protocol"], "recall": res["recall"],
                        "decode_density": res["decode_density"],
                    }
                    records.append(rec)
                    if sink is not None:
                        sink.write(json.dumps(rec) + "\n")
                        sink.flush()
                    bar.update(1)
    finally:
        bar.close()
        if sink is not None:
            sink.close()
    if cfg.json_path:
        Path(cfg.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json_path).write_text(json.dumps(records, indent=1))
    return records
