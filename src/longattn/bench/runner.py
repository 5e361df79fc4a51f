"""``longattn bench``: run tasks x lengths x samples x methods on one model, in one process.

Each sample runs under the protocol its task declares (``protocols.py``; kvpress's pipeline by default: the
context is prefilled and compressed question-agnostically, then the question and answer prefix are fed and the
answer is decoded greedily). Dense runs first on every sample: it is the reference of every method's fidelity.
Every output path is checked before any work; ``--out DIR`` writes ``DIR/results.jsonl`` through
``records.ResultsFile`` (locked, never replaced without ``--overwrite``, resumable by record key).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import api, registry
from ..api import _spec_of
from .prompts import encode, followup_ids
from .protocols import run_sample
from .records import ResultsFile, environment, make_record, new_run_id, read_results, recipe_key, record_key
from .report import against_dense

__all__ = ["BenchConfig", "run", "encode", "followup_ids", "make_task", "read_results", "record_key",
           "DEFAULT_METHODS"]

DEFAULT_METHODS = ("dense", "streaming_llm:ratio=0.5", "snapkv:ratio=0.5")


def _is_custom(spec: str) -> bool:
    return spec.split(":")[0].strip() == "custom"


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
    overwrite: bool = False  # replace an existing --json file / --out results.jsonl
    extrapolate: bool = False  # allow lengths beyond the model's trained positions
    dtype: str = "float32"  # the model's dtype: float32, bfloat16, float16
    progress: bool = True
    data: str | None = None  # --task custom: the JSONL file
    scorer: str = "contains"  # --task custom: contains | exact | rouge
    peer: str | None = None  # "kvpress": kvpress rows beside the methods that have an equivalent press
    decode_steps: int = 0  # qa tasks: time at least this many decode steps (greedy past the answer)
    decode_rounds: int = 0  # qa tasks: interleaved decode rounds per sample, paired against dense (``interleave``)
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if not self.tasks:
            raise ValueError("--task: give at least one task; allowed: " + ", ".join(registry.names("task")))
        for t in self.tasks:
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"--task: expected task names like passkey or niah:keys=2, got {t!r}")
            registry.get(t.split(":")[0].strip(), "task")
        if self.data and not any(_is_custom(t) for t in self.tasks):
            raise ValueError("--data is read by --task custom only")
        if (not isinstance(self.lengths, (tuple, list)) or not self.lengths
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 64 for n in self.lengths)):
            raise ValueError(f"--lengths: token counts must be integers >= 64, got {self.lengths!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"--samples must be an integer >= 1, got {self.samples!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"--seed must be an integer, got {self.seed!r}")
        if not isinstance(self.methods, (tuple, list)) or not self.methods:
            raise ValueError("--methods: give at least one recipe (e.g. dense,snapkv:ratio=0.5)")
        for m in self.methods:
            if not isinstance(m, str):
                raise ValueError(f"--methods: each recipe is a string like snapkv:ratio=0.5, got {m!r}")
            api.parse(m)
        if self.resume and not self.out_dir:
            raise ValueError("--resume needs --out DIR (it skips the records already in DIR/results.jsonl)")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be one of float32, bfloat16, float16; got {self.dtype!r}")
        if isinstance(self.decode_steps, bool) or not isinstance(self.decode_steps, int) or self.decode_steps < 0:
            raise ValueError(f"--decode-steps must be an integer >= 0, got {self.decode_steps!r}")
        if isinstance(self.decode_rounds, bool) or not isinstance(self.decode_rounds, int) or self.decode_rounds < 0:
            raise ValueError(f"--decode-rounds must be an integer >= 0, got {self.decode_rounds!r}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite: choose one (continue the results, or replace them)")
        if self.peer is not None:
            from .peer_kvpress import peer_method, presses, require_kvpress

            if self.peer != "kvpress":
                raise ValueError(f"--peer must be kvpress, got {self.peer!r}")
            require_kvpress()
            if not any(peer_method(m) for m in self.methods):
                raise ValueError("--peer kvpress: none of --methods is a KV policy with a kvpress equivalent "
                                 f"({', '.join(presses())}, with ratio > 0)")

    def check_outputs(self) -> None:
        """Every output path, before any work (``--json`` is written at the end: a bad path must fail now)."""
        from ..outputs import check_output_dir, check_output_file

        if self.json_path:
            check_output_file(self.json_path, "--json", overwrite=self.overwrite)
        if self.out_dir:
            check_output_dir(self.out_dir, "--out")


def make_task(spec: str, cfg: BenchConfig):
    """A task from ``name[:key=value...]`` (``niah:haystack=filler:keys=4``); ``custom`` also reads ``--data``
    and ``--scorer`` (arguments in the spec win over ``--scorer``)."""
    if _is_custom(spec):
        cls, kwargs = api.method_kwargs(spec, "task")
        return cls(**{"data": cfg.data or "", "scorer": cfg.scorer, **kwargs})
    return api.parse_method(spec, "task")


def _task_key(task) -> str:
    """A task and its resolved arguments; a custom task also by the content of its data file."""
    key = _spec_of(task)
    data = getattr(task, "data", "")
    if data:
        import hashlib

        key += ":data_sha=" + hashlib.sha256(Path(data).read_bytes()).hexdigest()[:16]
    return key


def _check_lengths(cfg: BenchConfig, plan, tokenizer, model_limit: int | None) -> None:
    """Lengths beyond the model's trained positions are refused (``--extrapolate`` allows them)."""
    if model_limit is None or cfg.extrapolate:
        return
    for _, task, length, n in plan:
        if task.uses_length and length > model_limit:
            raise ValueError(f"--lengths: {length} tokens exceeds the model's {model_limit} positions "
                             f"({cfg.model}); add --extrapolate to run past them anyway")
        if not task.uses_length and tokenizer is not None:
            for i in range(n):
                s = task.make(tokenizer, 0, i, cfg.seed)
                ctx, rest = encode(tokenizer, s)
                if len(ctx) + len(rest) > model_limit:
                    raise ValueError(f"--data: sample {i + 1} ({s.id}) has {len(ctx) + len(rest)} tokens, more than "
                                     f"the model's {model_limit} positions ({cfg.model}); add --extrapolate to run it")


def _plan(cfg: BenchConfig, model=None):
    """``(plan, limit)``: ``(task name, task, length, samples)`` for every task and length, and the model's
    trained positions (lengths past them refused here, before any weights load)."""
    from .. import models

    tasks = [(t, make_task(t, cfg)) for t in cfg.tasks]
    plan = [(tname, task, length, min(cfg.samples, task.count() or cfg.samples))
            for tname, task in tasks for length in (cfg.lengths if task.uses_length else (0,))]
    limit = models.max_positions(cfg.model) if model is None else getattr(model.config, "max_position_embeddings",
                                                                            None)
    _check_lengths(cfg, plan, None, limit)
    return plan, limit


def run(cfg: BenchConfig, model=None, tokenizer=None, log=None) -> list[dict]:
    """Run the sweep; returns the records (also written to ``--json`` / ``--out``)."""
    from tqdm.auto import tqdm

    from .. import models

    log = log or (lambda s: print(s, file=sys.stderr))
    cfg.validate()
    cfg.check_outputs()
    plan, limit = _plan(cfg, model)  # before loading the model: bad data and lengths fail fast
    methods = list(dict.fromkeys(cfg.methods))
    recipes = {m: api.parse(m) for m in methods}
    results = ResultsFile(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite, warn=log) if cfg.out_dir else None
    records: list[dict] = []
    with results if results is not None else _Nothing():
        if model is None:
            model, tokenizer = models.load(cfg.model, dtype=getattr(torch, cfg.dtype))
        _check_lengths(cfg, plan, tokenizer, limit)  # custom samples: their token counts
        with torch.no_grad():  # warm-up, so the first record does not pay for first-touch allocations
            model(input_ids=torch.ones(1, 64, dtype=torch.long, device=model.device))
        peers: dict[str, str] = {}
        if cfg.peer == "kvpress":
            from .peer_kvpress import peer_method

            peers = {p: m for m in methods if (p := peer_method(m)) is not None}
            methods += sorted(peers)
        done = results.done if results is not None else {}
        failed: dict[str, str] = {}  # peer methods that raised: skipped for the rest of the run, said once
        env, run_id = environment(), new_run_id()
        total = sum(n for *_, n in plan) * len(methods)
        bar = tqdm(total=total, desc="bench", unit="run", disable=not cfg.progress, file=sys.stderr)
        try:
            no_rounds = sorted({tname for tname, task, *_ in plan if task.runs_as != "qa"}) if cfg.decode_rounds else []
            if no_rounds:  # said once, not skipped silently
                log(f"--decode-rounds: tasks that are not single-question (qa), their rows have no decode rounds: "
                    f"{', '.join(no_rounds)}")
            for tname, task, length, n_samples in plan:
                tkey = _task_key(task)
                for i in range(n_samples):
                    ident = {m: _identity(m, recipes.get(m) or recipes[peers[m]], m in peers, task, tkey, length,
                                          i, cfg) for m in methods}
                    keys = {m: record_key({"key": ident[m]}) for m in methods}
                    todo = [m for m in methods if keys[m] not in done]
                    for m in methods:
                        if keys[m] in done:
                            records.append(done[keys[m]])
                            bar.update(1)
                    if not todo:
                        continue
                    sample = task.make(tokenizer, length, i, cfg.seed)
                    # --decode-rounds: every method's cache is kept after its run, for the paired rounds below
                    rounds = cfg.decode_rounds if task.protocol(sample) == "qa" else 0
                    states: dict[str, dict] = {}
                    pending: list[dict] = []  # this sample's records, written once the rounds have timed them

                    def held(m, states=states, rounds=rounds):
                        return states.setdefault(m, {}) if rounds else None

                    # dense is the reference of every method's fidelity: it always runs first
                    bar.set_postfix_str(f"{tname} {length} #{i} dense")
                    ref = run_sample(model, tokenizer, "dense", task, sample, None, cfg.decode_steps, keep=held("dense"))
                    for m in todo:
                        bar.set_postfix_str(f"{tname} {length} #{i} {m}")
                        if m in peers:
                            if task.protocol(sample) != "qa" or m in failed:
                                bar.update(1)  # peer rows are for single-question tasks (and presses that run)
                                continue
                            from .peer_kvpress import run_press

                            try:
                                res = run_press(model, tokenizer, m, *encode(tokenizer, sample), task.max_new_tokens,
                                                ref, cfg.decode_steps)
                            except Exception as e:  # noqa: BLE001 - a peer's own failure must not end our run
                                failed[m] = f"{type(e).__name__}: {e}"
                                log(f"{m} failed on {cfg.model} ({failed[m][:200]}); no {m} rows in this run")
                                bar.update(1)
                                continue
                        else:
                            res = ref if m == "dense" else run_sample(model, tokenizer, m, task, sample, ref,
                                                                      cfg.decode_steps, keep=held(m))
                        rec = make_record(
                            task=tname, method=m, recipe=recipes.get(m) or recipes[peers[m]],
                            length=length if task.uses_length else res["n_tokens"], sample_obj=sample, res=res,
                            task_obj=task, key=ident[m], run_id=run_id, env=env, peer="kvpress" if m in peers else None)
                        rec.update(against_dense(rec, ref))
                        if rounds:
                            pending.append(rec)
                        else:
                            _keep(rec, records, results, bar)
                    if rounds:
                        _time_rounds(model, tokenizer, states, rounds, pending,
                                     lambda r, pre=f"{tname} {length} #{i}", n=rounds: bar.set_postfix_str(
                                         f"{pre} decode round {r}/{n}"))
                        states.clear()
                        for rec in pending:
                            _keep(rec, records, results, bar)
        finally:
            bar.close()
    _write_json(cfg, records)
    return records


def _time_rounds(model, tokenizer, states: dict, rounds: int, recs: list[dict], say) -> None:
    """``--decode-rounds``: ``rounds`` interleaved rounds of one decode step of every method of one sample from
    the cache its run left (``states``: ``{method: {"recipe", "cache", "tok"}}``, dense first), paired against
    dense (``interleave``); the records of the sample's methods (``recs``, not the peers') get
    ``decode_rounds``, ``decode_step_ms`` (median), ``decode_x_rounds`` (dense's median step over the method's),
    ``decode_x_p10`` / ``decode_x_p90`` (of the per-round ratios) and ``decode_attention_share_rounds`` (dense's
    attention share of a step in the rounds)."""
    from .interleave import step_rounds, summarize

    class _Say:
        n = 0

        def update(self, k):
            self.n += k
            say(self.n)

    raw = step_rounds(model, states, rounds, tokenizer=tokenizer, bar=_Say(), compress=False)  # as run_qa's decode
    share, out = summarize(raw, "dense")
    for rec in recs:
        o = out.get(rec["method"]) if not rec.get("peer") else None
        if o is not None:
            rec.update(decode_rounds=rounds, decode_step_ms=o["ms_per_step"], decode_x_rounds=o["decode_x"],
                       decode_x_p10=o["x_p10"], decode_x_p90=o["x_p90"], decode_attention_share_rounds=share)


def _keep(rec: dict, records: list[dict], results, bar) -> None:
    """A finished record: into the returned list, onto ``--out``'s results file (flushed), one step of the bar."""
    records.append(rec)
    if results is not None:
        results.append(rec)
    bar.update(1)


def _write_json(cfg: BenchConfig, records: list[dict]) -> None:
    """``--json FILE``: every record of the run as one JSON list, written atomically at the end."""
    if cfg.json_path:
        from ..outputs import write_atomic

        write_atomic(cfg.json_path, json.dumps(records, indent=1))


def _identity(method: str, recipe, is_peer: bool, task, task_key: str, length: int, sample: int, cfg) -> dict:
    """Everything that defines a record: task and arguments, target length, sample, method, model, seed,
    protocol."""
    qa = recipe.kv is not None and recipe.kv.query_aware and not is_peer
    out = {"task": task_key, "method": method if is_peer else recipe_key(recipe), "length": length,
           "sample": sample, "model": cfg.model, "dtype": cfg.dtype, "seed": cfg.seed,
           "protocol": f"{task.runs_as}/{'query_aware' if qa else 'question_agnostic'}"}
    if cfg.decode_steps:  # part of the identity only when set (records written before it keep their keys)
        out["decode_steps"] = cfg.decode_steps
    if cfg.decode_rounds and not is_peer and task.runs_as == "qa":
        out["decode_rounds"] = cfg.decode_rounds
    return out


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
