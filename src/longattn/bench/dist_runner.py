"""``longattn bench --dist MODE`` under ``torchrun``: every sample's prompt prefilled sequence parallel across
the ranks, beside dense in one process, in the same run.

Per sample, two records:

- ``dense``: the bench's own dense row (``protocols.run_sample``), run on rank 0 alone with the threads of
  every rank (the other ranks wait), so that it has the machine the ranks share;
- ``dist:MODE:nproc=P`` (``:backend=deepspeed`` for DeepSpeed's Ulysses): ``distributed.model.sp_generate``
  on every rank, the whole prompt (context, question and answer prefix) prefilled split across the ranks and
  the answer decoded greedily from the split cache. ``kv_cache_bytes`` is the largest rank's cache (``dist``
  holds every rank's), ``prefill_s`` the slowest rank's, ``peak_bytes`` the largest rank's peak. Fidelity
  (KL, top-1) is measured against dense's teacher-forced logits over the positions where the two answers have
  not yet diverged (up to and including the first different token: there the logits are the same function of
  the same tokens), so no second prefill is needed; ``dist.fidelity_tokens`` says how many.

Only single-question tasks (the ``qa`` protocol) and dense attention run this way. Rank 0 owns the outputs
(``--json``, ``--out``, the progress bar); a refusal on rank 0 (an existing results file, say) is shared with
every rank, so that all of them stop with the same one line.
"""

from __future__ import annotations

import contextlib
import sys

import torch

from .. import api, registry
from .metrics import PeakMemory, fidelity
from .prompts import encode
from .protocols import _plain, run_sample
from .records import ResultsFile, environment, make_record, new_run_id, recipe_key, record_key
from .report import against_dense
from .runner import BenchConfig, _check_lengths, _identity, _keep, _plan, _task_key, _write_json

__all__ = ["dist_method", "run_dist"]


def dist_method(mode: str, nproc: int, backend: str = "torch") -> str:
    """The method name of a sequence-parallel row: ``dist:zigzag:nproc=2`` (``:backend=deepspeed``)."""
    return f"dist:{mode}:nproc={nproc}" + ("" if backend == "torch" else f":backend={backend}")


def _share(value, group):
    """Rank 0's ``value`` on every rank."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _agree(fn, rank: int, group):
    """Run ``fn`` on rank 0; its result, or the message of its ValueError, on every rank (raised there too)."""
    out, err = None, None
    if rank == 0:
        try:
            out = fn()
        except ValueError as e:
            err = str(e)
    err = _share(err, group)
    if err is not None:
        raise ValueError(err)
    return out


def _gather(value, group) -> list:
    import torch.distributed as dist

    box = [None] * dist.get_world_size(group)
    dist.all_gather_object(box, value, group=group)
    return box


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check(cfg: BenchConfig, mode: str, backend: str) -> None:
    from ..distributed.model import MODES

    if mode not in MODES:
        raise ValueError(f"--dist must be one of {', '.join(MODES)}, got {mode!r}")
    if backend not in ("torch", "deepspeed"):
        raise ValueError(f"--dist-backend must be torch or deepspeed, got {backend!r}")
    if backend == "deepspeed" and mode != "ulysses":
        raise ValueError(f"--dist-backend deepspeed: only with --dist ulysses (got --dist {mode})")
    if cfg.peer is not None:
        raise ValueError("--dist: --peer kvpress runs in one process; drop one of them")
    if cfg.decode_steps or cfg.decode_rounds:
        raise ValueError("--dist: --decode-steps and --decode-rounds are for the one-process bench (a dist row "
                         "decodes its answer)")
    others = [m for m in dict.fromkeys(cfg.methods) if recipe_key(api.parse(m)) != "dense"]
    if others:
        raise ValueError(f"--dist: the sequence-parallel prefill runs dense attention; --methods must be dense "
                         f"(got {', '.join(others)})")
    for t in cfg.tasks:
        cls = registry.get(t.split(":")[0].strip(), "task").cls
        if cls.runs_as != "qa":
            qa = sorted(n for n in registry.names("task") if registry.get(n, "task").cls.runs_as == "qa")
            raise ValueError(f"--dist: task {t!r} runs the {cls.runs_as} protocol; sequence parallel runs "
                             f"single-question tasks: {', '.join(qa)}")


def run_dist(cfg: BenchConfig, mode: str, backend: str = "torch", group=None, model=None, tokenizer=None,
             log=None) -> list[dict]:
    """The sweep on every rank of ``group`` (every rank calls it with the same arguments); returns the records
    on rank 0 (written to ``--json`` / ``--out`` there) and ``[]`` elsewhere."""
    from tqdm.auto import tqdm

    from .. import models
    from ..distributed.comm import world
    from ..distributed.model import check_model, local_lengths, sp_generate

    log = log or (lambda s: print(s, file=sys.stderr))
    rank, nproc = world(group)
    cfg.validate()
    _check(cfg, mode, backend)
    _agree(cfg.check_outputs, rank, group)
    plan, limit = _plan(cfg, model)
    results = None
    if rank == 0 and cfg.out_dir:
        results = ResultsFile(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite, warn=log)

    def open_results():
        if results is not None:
            results.__enter__()

    _agree(open_results, rank, group)
    name = dist_method(mode, nproc, backend)
    dense = api.parse("dense")
    records: list[dict] = []
    try:
        if model is None:
            model, tokenizer = models.load(cfg.model, dtype=getattr(torch, cfg.dtype))
        check_model(model, mode, nproc)
        _check_lengths(cfg, plan, tokenizer, limit)
        with torch.no_grad():
            model(input_ids=torch.ones(1, 64, dtype=torch.long, device=model.device))
        done = _share(set(results.done) if results is not None else set(), group)
        kept = results.done if results is not None else {}
        env, run_id = environment(), new_run_id()
        with _threads(torch.get_num_threads() * nproc):
            env_dense = environment()
        total = sum(n for *_, n in plan) * 2
        bar = tqdm(total=total, desc=f"bench --dist {mode}", unit="run", disable=not cfg.progress or rank != 0,
                   file=sys.stderr)
        eos = set(tokenizer.all_special_ids)
        import torch.distributed as dist

        try:
            for tname, task, length, n_samples in plan:
                tkey = _task_key(task)
                for i in range(n_samples):
                    ident = _identity("dense", dense, False, task, tkey, length, i, cfg)
                    ident_d = {**ident, "method": name, "protocol": f"{task.runs_as}/sequence_parallel"}
                    keys = [_key(ident), _key(ident_d)]
                    if rank == 0:
                        records += [kept[k] for k in keys if k in done]
                    if all(k in done for k in keys):
                        bar.update(2)
                        continue
                    bar.update(sum(k in done for k in keys))
                    sample = task.make(tokenizer, length, i, cfg.seed)
                    if task.protocol(sample) != "qa":
                        raise ValueError(f"--dist: sample {i} of {tname} runs the {task.protocol(sample)} "
                                         "protocol; sequence parallel runs single-question samples only")
                    ctx, rest = encode(tokenizer, sample)
                    ids = ctx + rest
                    local_lengths(len(ids), mode, nproc)
                    if len(set(_gather(hash(tuple(ids)), group))) != 1:
                        raise RuntimeError(f"--dist: the ranks built different prompts for sample {i} of {tname}")
                    bar.set_postfix_str(f"{tname} {length} #{i} dense")
                    ref = None
                    if rank == 0:
                        with _threads(torch.get_num_threads() * nproc):
                            ref = run_sample(model, tokenizer, "dense", task, sample, None)
                    dist.barrier(group=group)
                    bar.set_postfix_str(f"{tname} {length} #{i} {name}")
                    if rank == 0 and keys[0] not in done:
                        rec = make_record(task=tname, method="dense", recipe=dense,
                                          length=length if task.uses_length else ref["n_tokens"], sample_obj=sample,
                                          res=ref, task_obj=task, key=ident, run_id=run_id, env=env_dense)
                        rec.update(against_dense(rec, ref))
                        _keep(rec, records, results, bar)
                    if keys[1] in done:
                        continue
                    with PeakMemory(model.device) as pm:
                        out = sp_generate(model, ids, mode, task.max_new_tokens, eos=eos, group=group,
                                          backend=backend, keep_logits=rank == 0)
                    per = _gather({"prefill_s": out["prefill_s"], "peak": pm.peak_bytes}, group)
                    if rank == 0:
                        _keep(_dist_record(out, per, ref, tname, task, sample, length, ident_d, name, mode, backend,
                                           model, tokenizer, run_id, env), records, results, bar)
        finally:
            bar.close()
    finally:
        if results is not None:
            results.close()
    if rank == 0:
        _write_json(cfg, records)
    # every rank finishes together: a rank that tears its process group down while rank 0 is still writing its
    # last record can abort in gloo's threads (seen as SIGABRT, "terminate called without an active exception")
    dist.barrier(group=group)
    return records if rank == 0 else []


def _key(ident: dict) -> tuple:
    return record_key({"key": ident})


def _dist_record(out, per, ref, tname, task, sample, length, ident, name, mode, backend, model, tokenizer, run_id,
                 env) -> dict:
    """The ``dist:...`` record of one sample (rank 0), fidelity over the answer's undiverged positions."""
    tokens, dense_ids = out["tokens"], ref["answer_ids"]
    same = 0
    while same < min(len(tokens), len(dense_ids)) and tokens[same] == dense_ids[same]:
        same += 1
    n_fid = min(same + 1, len(tokens), len(dense_ids))
    kl, top1 = fidelity(ref["ref_logits"][:n_fid].float(), out["logits"][:n_fid].float()) if n_fid else (None, None)
    steps = max(len(tokens) - 1, 0)
    res = {
        "prediction": tokenizer.decode(tokens, skip_special_tokens=True),
        "n_tokens": sum(out["lengths"]),
        "kv_cache_bytes": max(out["prefill_cache_bytes_per_rank"]),
        "kv_cache_bytes_end": max(out["cache_bytes_per_rank"]),
        "peak_bytes": max((p["peak"] for p in per if p["peak"] is not None), default=None),
        "prefill_s": max(p["prefill_s"] for p in per),
        "decode_s": out["decode_s"],
        "decode_tok_s": (steps / out["decode_s"]) if steps and out["decode_s"] > 0 else None,
        "kl": kl, "top1_agree": top1, "protocol": "sequence_parallel", "recall": None, "method_s": None,
        "decode_density": None, **_plain(model, sum(out["lengths"])),
    }
    rec = make_record(task=tname, method=name, recipe=api.parse("dense"),
                      length=length if task.uses_length else res["n_tokens"], sample_obj=sample, res=res,
                      task_obj=task, key=ident, run_id=run_id, env=env)
    rec["settings"] = {"dist": {"mode": mode, "nproc": out["nproc"], "backend": backend}}
    rec["dist"] = {"mode": mode, "nproc": out["nproc"], "backend": backend, "lengths": out["lengths"],
                   "kv_cache_bytes_per_rank": out["prefill_cache_bytes_per_rank"],
                   "kv_cache_bytes_end_per_rank": out["cache_bytes_per_rank"],
                   "prefill_s_per_rank": [p["prefill_s"] for p in per],
                   "peak_bytes_per_rank": [p["peak"] for p in per], "fidelity_tokens": n_fid,
                   "same_answer": tokens == dense_ids}
    rec.update(against_dense(rec, ref))  # a dist record gets no Amdahl bound
    return rec
