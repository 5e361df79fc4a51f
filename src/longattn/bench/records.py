"""Bench records: one function builds them, one key identifies them, one file holds them safely.

- ``make_record`` builds every record (our rows and the kvpress peer rows) from a protocol's result: the JSON
  contract's fields plus what a reader needs to trust it later (run id, commit, resolved method settings,
  versions, machine, a hash of the context text).
- ``record_key`` is everything that defines a record: the task and its arguments, the target length, the sample,
  the method (canonical spec), the model and its dtype, the seed and the protocol. ``--resume`` skips exactly those.
- ``ResultsFile`` owns ``DIR/results.jsonl``: an exclusive lock (a second concurrent run is refused), an
  existing file is never deleted without ``--overwrite``, and a torn last line (a crash mid-write) is moved
  aside to ``results.jsonl.torn`` before appending.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import subprocess
import time
import uuid
from functools import lru_cache
from pathlib import Path

__all__ = ["RECORD_FIELDS", "REQUIRED", "ResultsFile", "environment", "make_record", "method_settings",
           "read_results", "record_key", "recipe_key", "validate_record"]

RECORD_FIELDS = (
    "task", "method", "length", "sample", "correct", "score", "kv_cache_bytes", "peak_bytes", "prefill_s",
    "decode_tok_s", "method_s", "kl", "top1_agree", "model", "seed",
)
_NUM = (int, float)
# field -> allowed types (None allowed where listed); what `report` needs to draw a record
REQUIRED = {"task": (str,), "method": (str,), "length": (int,), "sample": (int,), "score": _NUM + (type(None),),
            "kv_cache_bytes": (int, type(None)), "prefill_s": _NUM + (type(None),),
            "decode_tok_s": _NUM + (type(None),), "kl": _NUM + (type(None),), "top1_agree": _NUM + (type(None),)}


def validate_record(r) -> None:
    """Raise ValueError naming the first missing or mistyped field of a record read from disk."""
    if not isinstance(r, dict):
        raise ValueError("a record must be a JSON object")
    for k, types in REQUIRED.items():
        if k not in r:
            raise ValueError(f"missing field {k!r}")
        if isinstance(r[k], bool) or not isinstance(r[k], types):
            raise ValueError(f"field {k!r} must be {'/'.join(t.__name__ for t in types)}, got {type(r[k]).__name__}")


# ---- identity ---------------------------------------------------------------------------------------------
def method_settings(recipe) -> dict:
    """The resolved settings of each filled slot of a recipe (defaults filled in): ``{slot: {name, ...}}``."""
    out = {}
    for slot in ("prefill", "kv", "decode", "calibrate"):
        m = getattr(recipe, slot, None)
        if m is not None:
            out[slot] = {"name": m.name, **{f.name: getattr(m, f.name) for f in dataclasses.fields(m) if f.init}}
    return out


def recipe_key(recipe) -> str:
    """A canonical spelling of a recipe (slot order, defaults dropped): two spellings of one recipe share it."""
    from ..api import _spec_of

    parts = [_spec_of(m) for m in (recipe.prefill, recipe.kv, recipe.decode, getattr(recipe, "calibrate", None))
             if m is not None]
    return "+".join(parts) or "dense"


def record_key(r: dict) -> tuple:
    """What defines a record. Records written before keys existed fall back to their visible fields."""
    k = r.get("key")
    if isinstance(k, dict):
        k = {"dtype": "float32", **k}  # keys written before the dtype was part of them
        return tuple(sorted((a, json.dumps(b, sort_keys=True)) for a, b in k.items()))
    return ("legacy", r["task"], r["method"], int(r["length"]), int(r["sample"]), r.get("model"), r.get("seed"))


@lru_cache(maxsize=1)
def _commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if out.returncode != 0:
            raise OSError
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from .. import __version__

        return f"v{__version__}"


@lru_cache(maxsize=1)
def _cpu() -> tuple[str, str]:
    """``(cpu model, vector ISA)``: ISA is the best of AMX, AVX-512, AVX2 the CPU flags list (or torch's)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
            if name and flags:
                break
    except OSError:
        pass
    isa = [x for x, f in (("AMX", "amx_tile"), ("AVX512", "avx512f"), ("AVX2", "avx2")) if f in flags]
    if not isa:
        try:
            import torch

            isa = [torch.backends.cpu.get_cpu_capability()]
        except Exception:  # noqa: BLE001 - best effort
            isa = ["unknown"]
    return name, "+".join(isa)


def environment() -> dict:
    """Versions and machine of this process, recorded with every record."""
    import torch
    import transformers

    cpu, isa = _cpu()
    try:  # what torch's kernels dispatch to (ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU emulates an AVX2 one)
        kernels = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - best effort
        kernels = "unknown"
    return {"commit": _commit(), "cpu": cpu, "isa": isa, "kernel_isa": kernels, "threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__}}


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def make_record(*, task: str, method: str, recipe, length: int, sample_obj, res: dict, task_obj, key: dict,
                run_id: str, env: dict, peer: str | None = None) -> dict:
    """One record of the JSON contract (see docs/cli.md) from a protocol's result ``res``; ``key`` is what
    defines it (``record_key``)."""
    from dataclasses import replace

    if sample_obj.turns:  # one score per query; the record's score is their mean
        turn_scores = [task_obj.score(pred, replace(sample_obj, answers=ans, turns=[]))
                       for pred, (_, _, ans) in zip(res["turn_predictions"], sample_obj.queries())]
        score = sum(turn_scores) / len(turn_scores)
    else:
        turn_scores, score = None, task_obj.score(res["prediction"], sample_obj)
    rec = {
        "task": task, "method": method, "length": length, "sample": key["sample"],
        "correct": task_obj.correct(score), "score": score,
        **{k: res[k] for k in ("kv_cache_bytes", "peak_bytes", "prefill_s", "decode_tok_s", "method_s", "kl",
                               "top1_agree")},
        "model": key["model"], "seed": key["seed"], "dtype": key.get("dtype", "float32"),
        "target_length": key["length"], "decode_s": res["decode_s"], "n_tokens": res["n_tokens"],
        "kv_cache_bytes_end": res["kv_cache_bytes_end"], "prediction": res["prediction"],
        "answer": sample_obj.answers[0] if sample_obj.answers else None,
        "protocol": res["protocol"], "recall": res["recall"], "decode_density": res["decode_density"],
        "plain_bytes": res.get("plain_bytes"), "plain_full_bytes": res.get("plain_full_bytes"),
        "attn_prefill_s": res.get("attn_prefill_s"), "attn_decode_s": res.get("attn_decode_s"),
        "select_decode_s": res.get("select_decode_s"), "compile_s": res.get("compile_s"),
        "decode_steps": res.get("decode_steps"),
        "prefill_density": res.get("prefill_density"),
        **{k: res.get(k) for k in ("answer_kept", "answer_kept_rows", "needle_kept", "needle_kept_rows")},
        "settings": {} if peer else method_settings(recipe), "sample_id": sample_obj.id,
        "context_sha": hashlib.sha256(sample_obj.context.encode()).hexdigest()[:16],
        "run_id": run_id, **env, "key": key,
    }
    if turn_scores is not None:
        rec.update(turn_scores=turn_scores, mode=sample_obj.mode)
    if "nll" in res:
        rec.update(nll=res["nll"], ppl=res["ppl"])
    if peer:
        rec["peer"] = peer
    return rec


# ---- the results file ---------------------------------------------------------------------------------------
def read_results(path: Path, warn=print) -> list[dict]:
    """Read results.jsonl; corrupt or malformed lines are reported (line number, why) and skipped."""
    out = []
    path = Path(path)
    if not path.exists():
        return out
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            validate_record(r)
            record_key(r)
        except (ValueError, KeyError, TypeError) as e:
            warn(f"{path}:{i}: skipping corrupt record ({e})")
            continue
        out.append(r)
    return out


class ResultsFile:
    """``DIR/results.jsonl`` held by one run: locked, never silently replaced, torn tail repaired.

    ``resume``: keep the records there (their keys are skipped); ``overwrite``: start it anew; neither: an
    existing non-empty file is refused. A second run on the same directory is refused while this one holds the
    lock. Use as a context manager; ``append(record)`` writes and flushes one line."""

    def __init__(self, out_dir, *, resume: bool = False, overwrite: bool = False, warn=print) -> None:
        self.dir = Path(out_dir)
        self.path = self.dir / "results.jsonl"
        self.resume, self.overwrite, self.warn = resume, overwrite, warn
        self._lock = None
        self._f = None
        self.done: dict[tuple, dict] = {}

    def __enter__(self) -> ResultsFile:
        from ..outputs import check_output_dir

        check_output_dir(self.dir, "--out")
        if self.path.is_dir():
            raise ValueError(f"--out: {str(self.path)!r} is a directory")
        lock_path = self.dir / "results.jsonl.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ValueError(f"--out: another longattn bench (pid {other}) is writing {self.path}; wait for it or "
                             "choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock = fd
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def _open(self) -> None:
        exists = self.path.exists() and self.path.stat().st_size > 0
        if exists and not (self.resume or self.overwrite):
            n = sum(1 for line in self.path.read_text(errors="replace").splitlines() if line.strip())
            raise ValueError(f"--out: {self.path} already holds {n} records; add --resume to continue that run or "
                             "--overwrite to replace it")
        if exists and self.overwrite and not self.resume:
            self.path.write_text("")
        elif exists:
            self._repair_tail()
            for r in read_results(self.path, warn=self.warn):
                self.done[record_key(r)] = r
        self._f = self.path.open("a")

    def _repair_tail(self) -> None:
        """A last line without its newline was torn by a crash mid-write: move it aside (to
        ``results.jsonl.torn``) so that the next record starts on a line of its own. Complete lines that do not
        parse are corrupt, not torn: they stay, and reading reports and skips them."""
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        aside = self.path.with_name("results.jsonl.torn")
        with aside.open("ab") as f:
            f.write(data[cut:] + b"\n")
        with self.path.open("r+b") as f:
            f.truncate(cut)
        self.warn(f"{self.path}: the last line was torn (a crash mid-write); kept aside in {aside}")

    def append(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            os.close(self._lock)
            self._lock = None

    def __exit__(self, *exc) -> None:
        self.close()

