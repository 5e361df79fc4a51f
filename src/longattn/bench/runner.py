"""``longattn bench``: run tasks x lengths x samples x methods on one model, in one process.

Protocol (as kvpress's pipeline): the context is prefilled and the KV policy compresses it (question-agnostic);
then the question and answer prefix are fed uncompressed and the answer is decoded greedily. Prefill patterns
apply to every multi-token forward; decode selectors to every single-token forward (the generated tokens).
The chat template of the model is applied when it has one. Fidelity: the method is teacher-forced along the
dense answer, from a copy of its cache taken after the context (one token at a time when the recipe has a
decode selector), and its next-token distributions are compared with dense's.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
from dataclasses import dataclass, field, replace
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
    peer: str | None = None  # "kvpress": kvpress rows beside the methods that have an equivalent press
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
        if self.peer is not None:
            from .peer_kvpress import peer_method, presses, require_kvpress

            if self.peer != "kvpress":
                raise ValueError(f"--peer must be kvpress, got {self.peer!r}")
            require_kvpress()
            if not any(peer_method(m) for m in self.methods):
                raise ValueError("--peer kvpress: none of --methods is a KV policy with a kvpress equivalent "
                                 f"({', '.join(presses())}, with ratio > 0)")


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


def _prefill(model, session, recipe, ids: list[int], cache, kw: str):
    """Prefill ``ids`` into ``cache`` (in the KV policy's chunks when it has some), measuring time and peak
    memory; a prefill pattern's recall is measured on the side (its time excluded). Returns
    ``(last logits, prefill_s, peak_bytes, recall or None)``."""
    kv = recipe.kv
    chunk = kv.chunk if (kv is not None and kv.repeat) else None
    recalls: list[float] = []
    obs_s = [0.0]
    pattern = recipe.prefill

    def observe(layer_idx, q, k, v, key_valid):  # the pattern's recall per layer, on sampled query rows
        t = time.perf_counter()
        lay = pattern.for_layer(layer_idx).layout(q, k, key_valid)
        recalls.append(float(attention_recall(lay, q, k, rows=RECALL_ROWS, key_valid=key_valid).mean()))
        obs_s[0] += time.perf_counter() - t

    watch = session.observe(observe) if pattern is not None else contextlib.nullcontext()
    with watch, PeakMemory(model.device) as pm:
        t0 = time.perf_counter()
        size = chunk or len(ids)
        for s0 in range(0, len(ids), size):
            logits = _forward(model, ids[s0 : s0 + size], cache, kw)[0, -1]
        prefill_s = time.perf_counter() - t0 - obs_s[0]  # the recall's time is excluded
    return logits, prefill_s, pm.peak_bytes, (sum(recalls) / len(recalls)) if recalls else None


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


def _greedy(model, logits, cache, kw: str, max_new_tokens: int, eos: set[int]) -> tuple[list[int], float]:
    return greedy(logits, lambda tok: _forward(model, [tok], cache, kw)[0, -1], max_new_tokens, eos)


def _teacher(model, cache, kw: str, head: torch.Tensor | None, rest: list[int], answer: list[int],
             one_by_one: bool) -> torch.Tensor:
    """Teacher-forced next-token logits over ``answer``: the logits after ``rest`` (or ``head`` when ``rest`` is
    empty), then after each answer token but the last. With a decode selector the answer tokens go one at a
    time, so the selector is what produces those logits."""
    parts = [head[None] if not rest else _forward(model, rest, cache, kw)[0, -1:]]
    feed = answer[:-1]
    if feed and one_by_one:
        parts += [_forward(model, [t], cache, kw)[0] for t in feed]
    elif feed:
        parts.append(_forward(model, feed, cache, kw)[0])
    return torch.cat(parts)


def run_one(model, tokenizer, recipe: str, sample: Sample, max_new_tokens: int, ref: dict | None) -> dict:
    """One (method, sample): returns the measured fields (and ``answer_ids``/``ref_logits`` for dense)."""
    if sample.turns:
        return run_turns(model, tokenizer, recipe, sample, max_new_tokens, ref)
    if sample.meta.get("kind") == "perplexity":
        return run_perplexity(model, tokenizer, recipe, sample, ref)
    from transformers import DynamicCache

    from ..hf import cache_kwarg_name

    kw = cache_kwarg_name(model)
    ctx, rest = encode(tokenizer, sample)
    eos = set(tokenizer.all_special_ids) if tokenizer is not None else set()
    recipe = api.parse(recipe)
    kv = recipe.kv
    query_aware = bool(kv is not None and kv.query_aware)
    with torch.no_grad(), api.apply(model, recipe) as session:
        cache = DynamicCache()
        # question-agnostic: prefill (and compress) the context alone; query-aware: context + question
        logits, prefill_s, peak, recall = _prefill(model, session, recipe, ctx + rest if query_aware else ctx,
                                                   cache, kw)
        session.set_compression(False)  # the question and the answer are never compressed
        kv_bytes = cache_nbytes(cache)
        # the fidelity pass continues from a copy of this cache (selector state included): no crop, exact
        snapshot = copy.deepcopy(cache)
        if not query_aware:
            logits = _forward(model, rest, cache, kw)[0, -1]
        tf_first = logits.clone()
        gen, decode_s = _greedy(model, logits, cache, kw, max_new_tokens, eos)
        kv_bytes_end = cache_nbytes(cache)
        del cache
        # teacher-forced along the dense answer, for fidelity (dense's logits are the reference)
        answer_ids = ref["answer_ids"] if ref is not None else gen
        tf = _teacher(model, snapshot, kw, tf_first, [] if query_aware else rest, answer_ids,
                      recipe.decode is not None)
        del snapshot
        method_s = session.method_s
        dstats = session.decode_stats
    pred = tokenizer.decode(gen, skip_special_tokens=True)
    kl, top1 = (0.0, 1.0) if ref is None else fidelity(ref["ref_logits"], tf)
    steps = max(len(gen) - 1, 0)
    return {
        "prediction": pred,
        "n_tokens": len(ctx) + len(rest),
        "kv_cache_bytes": kv_bytes,
        "kv_cache_bytes_end": kv_bytes_end,
        "peak_bytes": peak,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "decode_tok_s": (steps / decode_s) if steps and decode_s > 0 else None,
        "method_s": method_s,
        "kl": kl,
        "top1_agree": top1,
        "answer_ids": gen,
        "ref_logits": tf,
        "protocol": "query_aware" if query_aware else "question_agnostic",
        "recall": recall,
        # decode selectors: fraction of the cached tokens the selected layers attended, over all decode steps
        "decode_density": (dstats["selected"] / dstats["possible"]) if dstats.get("possible") else None,
    }


def run_perplexity(model, tokenizer, recipe: str, sample: Sample, ref: dict | None) -> dict:
    """Prefill (and compress) the text but its last ``eval_tokens``, then score those teacher-forced."""
    from transformers import DynamicCache

    from ..hf import cache_kwarg_name

    kw = cache_kwarg_name(model)
    ids = tokenizer(sample.context, add_special_tokens=False)["input_ids"][: sample.meta["length"]]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids[:-1]
    n_eval = sample.meta["eval_tokens"]
    split = len(ids) - n_eval
    recipe = api.parse(recipe)
    with torch.no_grad(), api.apply(model, recipe) as session:
        cache = DynamicCache()
        logits, prefill_s, peak, recall = _prefill(model, session, recipe, ids[:split], cache, kw)
        session.set_compression(False)
        kv_bytes = cache_nbytes(cache)
        t0 = time.perf_counter()
        tf = _teacher(model, cache, kw, logits, [], ids[split:], recipe.decode is not None)
        eval_s = time.perf_counter() - t0
        kv_bytes_end = cache_nbytes(cache)
        method_s = session.method_s
        dstats = session.decode_stats
    target = torch.tensor(ids[split:], device=tf.device)
    nll = float(torch.nn.functional.cross_entropy(tf.float(), target))
    kl, top1 = (0.0, 1.0) if ref is None else fidelity(ref["ref_logits"], tf)
    return {
        "prediction": "", "n_tokens": len(ids), "kv_cache_bytes": kv_bytes, "kv_cache_bytes_end": kv_bytes_end,
        "peak_bytes": peak, "prefill_s": prefill_s, "decode_s": eval_s,
        "decode_tok_s": n_eval / eval_s if recipe.decode is not None and eval_s > 0 else None,
        "method_s": method_s, "kl": kl, "top1_agree": top1, "answer_ids": [], "ref_logits": tf,
        "protocol": "perplexity", "recall": recall, "nll": nll, "ppl": float(torch.exp(torch.tensor(nll))),
        "decode_density": (dstats["selected"] / dstats["possible"]) if dstats.get("possible") else None,
    }


def followup_ids(tokenizer, sample: Sample, history: list[tuple[str, str]], question: str, prefix: str
                 ) -> list[int]:
    """Token ids that continue a conversation after the previous answer: the end of the assistant turn and the
    next user turn (``question``) up to the answer ``prefix``. ``history``: ``(question, answer text)`` of the
    turns so far (the first question carries the context)."""
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer("\n\n" + question + "\n" + prefix, add_special_tokens=False)["input_ids"]
    msgs = []
    for i, (q, a) in enumerate(history):
        msgs.append({"role": "user", "content": (sample.context + "\n\n" + q) if i == 0 else q})
        msgs.append({"role": "assistant", "content": a})
    before = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True) + msgs[-1]["content"]
    after = tokenizer.apply_chat_template(msgs + [{"role": "user", "content": question}], tokenize=False,
                                          add_generation_prompt=True)
    if not after.startswith(before):
        raise ValueError("shared context: the chat template does not render earlier turns verbatim; cannot continue "
                         "the conversation in the cache")
    return tokenizer(after[len(before) :] + prefix, add_special_tokens=False)["input_ids"]


def run_turns(model, tokenizer, recipe: str, sample: Sample, max_new_tokens: int, ref: dict | None) -> dict:
    """A shared-context sample: the context is prefilled and compressed once, then every query runs either as
    the next turn of one conversation (``multi_turn``) or on a fresh copy of the compressed context
    (``multi_request``). Fidelity is teacher-forced along dense's answers (and, multi-turn, dense's history)."""
    from transformers import DynamicCache

    from ..hf import cache_kwarg_name

    kw = cache_kwarg_name(model)
    recipe = api.parse(recipe)
    if recipe.kv is not None and recipe.kv.query_aware:
        raise ValueError(f"{recipe}: a query-aware KV policy compresses after one question; a shared context is "
                         "compressed once for every query (use the question-agnostic policy)")
    queries = sample.queries()
    ctx, rest0 = encode(tokenizer, sample)
    eos = set(tokenizer.all_special_ids) if tokenizer is not None else set()
    one_by_one = recipe.decode is not None
    multi_turn = sample.mode == "multi_turn"
    with torch.no_grad(), api.apply(model, recipe) as session:
        cache = DynamicCache()
        _, prefill_s, peak, recall = _prefill(model, session, recipe, ctx, cache, kw)
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
                    logits = _forward(model, rest, work, kw)[0, -1]
                    gen, sec = _greedy(model, logits, work, kw, max_new_tokens, eos)
                    dec_s, steps = dec_s + sec, steps + max(len(gen) - 1, 0)
                    out.append((gen, None))
                else:
                    gen = answers_given[i]
                    out.append((gen, _teacher(model, work, kw, None, rest, gen, one_by_one)))
                if multi_turn and i + 1 < len(queries):
                    if gen and gen[-1] not in eos:  # complete the history in the cache with the last token
                        _forward(model, [gen[-1]], work, kw)
                    history.append((q, prefix + tokenizer.decode(gen, skip_special_tokens=True)))
            return out, dec_s, steps

        free, decode_s, steps = run(cache, snapshot, None)
        kv_bytes_end = cache_nbytes(cache)
        del cache
        gens = [g for g, _ in free]
        answers = ref["turn_answer_ids"] if ref is not None else gens
        forced, _, _ = run(copy.deepcopy(snapshot), snapshot, answers)
        del snapshot
        method_s = session.method_s
        dstats = session.decode_stats
    preds = [tokenizer.decode(g, skip_special_tokens=True) for g in gens]
    tf = torch.cat([lg for _, lg in forced])
    kl, top1 = (0.0, 1.0) if ref is None else fidelity(ref["ref_logits"], tf)
    return {
        "prediction": preds[0], "turn_predictions": preds, "n_tokens": len(ctx) + len(rest0),
        "kv_cache_bytes": kv_bytes, "kv_cache_bytes_end": kv_bytes_end, "peak_bytes": peak, "prefill_s": prefill_s,
        "decode_s": decode_s, "decode_tok_s": (steps / decode_s) if steps and decode_s > 0 else None,
        "method_s": method_s, "kl": kl, "top1_agree": top1, "answer_ids": gens[0], "turn_answer_ids": gens,
        "ref_logits": tf, "protocol": f"shared_context:{sample.mode}", "recall": recall,
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
    peers: set[str] = set()
    if cfg.peer == "kvpress":
        from .peer_kvpress import peer_method, run_press

        peers = {peer_method(m) for m in methods} - {None}
        methods += sorted(peers)
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
                    if m in peers:
                        if sample.turns or sample.meta.get("kind") == "perplexity":
                            bar.update(1)  # peer rows are for single-question tasks
                            continue
                        res = run_press(model, tokenizer, m, *encode(tokenizer, sample), task.max_new_tokens, ref)
                    else:
                        res = ref if m == "dense" else run_one(model, tokenizer, m, sample, task.max_new_tokens, ref)
                    if sample.turns:  # one score per query; the record's score is their mean
                        turn_scores = [task.score(pred, replace(sample, answers=ans, turns=[]))
                                       for pred, (_, _, ans) in zip(res["turn_predictions"], sample.queries())]
                        score = sum(turn_scores) / len(turn_scores)
                    else:
                        turn_scores, score = None, task.score(res["prediction"], sample)
                    extra = {"nll": res["nll"], "ppl": res["ppl"]} if "nll" in res else {}
                    rec = {
                        "task": tname, "method": m, "length": length, "sample": i,
                        "correct": task.correct(score), "score": score,
                        **{k: res[k] for k in ("kv_cache_bytes", "peak_bytes", "prefill_s", "decode_tok_s",
                                               "method_s", "kl", "top1_agree")},
                        "model": cfg.model, "seed": cfg.seed,
                        "decode_s": res["decode_s"], "n_tokens": res["n_tokens"],
                        "kv_cache_bytes_end": res["kv_cache_bytes_end"],
                        "prediction": res["prediction"], "answer": sample.answers[0] if sample.answers else None,
                        "protocol": res["protocol"], "recall": res["recall"],
                        "decode_density": res["decode_density"],
                        **({"turn_scores": turn_scores, "mode": sample.mode} if turn_scores is not None else {}),
                        **extra,
                        **({"peer": "kvpress"} if m in peers else {}),
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
