"""The ``longattn`` command: list, generate, bench, report, ops-bench (see DESIGN.md's contract)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .checks import read_text

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one clear line, exit 2
        print(f"longattn: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _ints(flag: str):
    def conv(s: str) -> list[int]:
        try:
            vals = [int(x) for x in _csv(s)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes comma-separated integers, got {s!r}") from None
        if not vals:
            raise argparse.ArgumentTypeError(f"{flag} needs at least one integer")
        return vals

    return conv


def _add_dist(p, help_text: str) -> None:
    """``--dist`` (the sequence-parallel modes, as ``distributed.model.MODES``) and ``--dist-backend``."""
    p.add_argument("--dist", choices=["ring", "zigzag", "ulysses"], help=help_text)
    p.add_argument("--dist-backend", default="torch", choices=["torch", "deepspeed"],
                   help="--dist ulysses: our all-to-all (torch) or DeepSpeed's DistributedAttention (needs deepspeed)")


def _build() -> argparse.ArgumentParser:
    p = _Parser(prog="longattn", description="Training-free long-context attention, measured side by side. "
                "Every subcommand exits with code 2 and one line on bad input; see docs/cli.md.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    ls = sub.add_parser("list", help="every registered method, task and backend")
    ls.add_argument("--kind", choices=["prefill", "kv", "decode", "calibrate", "task", "backend", "mixer"], help="only this kind")
    ls.add_argument("--markdown", action="store_true", help="print docs/methods.md (the method catalogue) instead")

    g = sub.add_parser("generate", help="generate with a recipe")
    g.add_argument("--model", default="smollm2-135m",
                   help="embedded model name (smollm2-135m, gemma3-270m) or a local Hugging Face model directory")
    g.add_argument("--recipe", default="dense", help="methods joined by +, e.g. vertical_slash+snapkv:ratio=0.5")
    g.add_argument("--prompt-file", required=True,
                   help="UTF-8 text file holding the prompt (with --context: the question asked of the saved context)")
    g.add_argument("--context", help="a saved compressed context (longattn compress --out CTX): answer from it "
                   "instead of prefilling a context again")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--extrapolate", action="store_true",
                   help="allow a prompt longer than the model's trained positions")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the model's dtype (methods run in it; default float32)")
    _add_dist(g, "prefill the prompt sequence parallel across the processes of `torchrun --nproc-per-node P -m "
              "longattn.cli generate ...` (gloo; dense attention; softcapped models refused) and decode from the split "
              "cache; rank 0 prints")

    c = sub.add_parser("compress", help="prefill and compress a context once and save it for later questions")
    c.add_argument("--model", default="smollm2-135m",
                   help="embedded model name (smollm2-135m, gemma3-270m) or a local Hugging Face model directory")
    c.add_argument("--recipe", required=True, help="the recipe that compresses (and later decodes) the context")
    c.add_argument("--context-file", required=True, help="UTF-8 text file holding the context")
    c.add_argument("--out", required=True, help="the saved context to write (.safetensors)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the model's dtype (default float32)")
    c.add_argument("--extrapolate", action="store_true",
                   help="allow a context longer than the model's trained positions")

    b = sub.add_parser("bench", help="tasks x lengths x methods on a real model")
    b.add_argument("--model", default="smollm2-135m",
                   help="embedded model name (smollm2-135m, gemma3-270m) or a local Hugging Face model directory")
    b.add_argument("--task", default="passkey", type=_csv,
                   help="comma-separated tasks with arguments, e.g. passkey,niah:keys=2 (longattn list --kind task)")
    b.add_argument("--lengths", default=[1024], type=_ints("--lengths"),
                   help="comma-separated context lengths in tokens (default 1024)")
    b.add_argument("--samples", default=5, type=int, help="samples per task and length (default 5)")
    b.add_argument("--methods", default=None, type=_csv,
                   help="comma-separated recipes (default dense,streaming_llm:ratio=0.5,snapkv:ratio=0.5)")
    b.add_argument("--json", dest="json_path", help="also write every record as one JSON list to this file")
    b.add_argument("--out", help="directory for results.jsonl, table.txt, the plots and report.html")
    b.add_argument("--resume", action="store_true",
                   help="continue the results in --out DIR: records already there (same key) are skipped")
    b.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out DIR/results.jsonl or --json file instead of refusing")
    b.add_argument("--config", help="a .toml or .json file with model, tasks, lengths, samples, methods, seed, "
                   "data, scorer (overrides the flags)")
    b.add_argument("--peer", choices=["kvpress"], help="add kvpress's rows beside ours (needs kvpress installed)")
    b.add_argument("--seed", default=0, type=int, help="sample generation seed (default 0)")
    b.add_argument("--data", help="--task custom: JSONL file, one sample per line")
    b.add_argument("--scorer", default="contains", choices=["contains", "exact", "rouge"],
                   help="--task custom: how predictions are scored")
    b.add_argument("--extrapolate", action="store_true",
                   help="allow lengths beyond the model's trained positions (refused otherwise)")
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the model's dtype (methods run in it; default float32)")
    b.add_argument("--decode-steps", default=0, type=int,
                   help="time at least N decode steps per sample (greedy past the answer; the answer is what is "
                   "scored): a passkey answer is ~7 tokens, too short a window for a decode ratio")
    b.add_argument("--decode-rounds", default=0, type=int,
                   help="single-question tasks: after every method ran a sample, R rounds of one decode step of each "
                   "from its own cache, the order rotating (paired against dense: the table's decode x is then "
                   "dense's median step over the method's, with the 10th-90th percentile of the per-round ratios)")
    _add_dist(b, "under `torchrun --nproc-per-node P -m longattn.cli bench ...`: every prompt prefilled sequence "
              "parallel across the ranks (dense attention, single-question tasks), a dist:MODE:nproc=P row beside dense "
              "in one process (rank 0 with every rank's threads); rank 0 writes")

    r = sub.add_parser("report", help="re-render the table, plots and report.html of a bench --out DIR")
    r.add_argument("dir", help="a directory written by bench --out")

    o = sub.add_parser("ops-bench", help="op-level speed vs dense SDPA")
    o.add_argument("--patterns", default=None, type=_csv, help="prefill pattern specs (default: every pattern)")
    o.add_argument("--lengths", default=None, type=_ints("--lengths"),
                   help="default 8192,32768 (--decode: 32768,131072)")
    o.add_argument("--dtypes", default=None, type=_csv, help="default float32,bfloat16 (--decode: float32)")
    o.add_argument("--heads", default=None, type=int, help="random inputs: query heads (default 8; --decode: 32)")
    o.add_argument("--kv-heads", default=None, type=int,
                   help="random inputs: kv heads (GQA); default = --heads (--decode: 8)")
    o.add_argument("--dim", default=None, type=int, help="random inputs: head dim (default 64; --decode: 128)")
    o.add_argument("--backends", default=["flex"], type=_csv, help="block-sparse backends to time (default flex)")
    o.add_argument("--block-size", default=None, type=int,
                   help="block size for patterns whose spec does not set one (default: their own, 64)")
    o.add_argument("--repeats", default=3, type=int, help="timed repetitions per measurement (default 3)")
    o.add_argument("--qk", default=None,
                   help="captured (q/k/v of --model's --layer) or random (default captured; --decode: random)")
    o.add_argument("--model", default="smollm2-135m", help="model whose q/k/v are captured")
    o.add_argument("--layer", default=14, type=int, help="layer whose q/k/v are captured")
    o.add_argument("--capture-max", default=32768, type=int, help="longest N with captured inputs")
    o.add_argument("--device", default="cpu", help="device of the inputs and kernels: cpu (default) or cuda[:i]")
    o.add_argument("--decode", action="store_true", help="time one decode step of decode-time selectors")
    o.add_argument("--selectors", type=_csv, help="--decode: selector specs (default: all, and split_k:splits=8)")
    o.add_argument("--budget", type=int, help="--decode: tokens per head and step for selectors (default 2048)")
    o.add_argument("--linear", action="store_true",
                   help="Lightning (chunked linear) attention vs naive linear vs causal softmax SDPA per length")
    o.add_argument("--cab", action="store_true",
                   help="the CAB grid: causal/non-causal x self/cross attention for every pattern that applies")
    o.add_argument("--json", dest="json_path", help="write the records as one JSON list to this file")
    o.add_argument("--overwrite", action="store_true", help="replace an existing --json file")

    pr = sub.add_parser("profile", help="head analysis: head scores, pattern search, attention sinks, heatmaps")
    pr.add_argument("what", choices=["search", "heads", "sinks", "heatmap", "data"],
                    help="search: per-head prefill pattern search (mixed profile); heads: head scores; sinks: "
                         "visible and hidden attention sinks (JSON + PNG); heatmap: one head's attention map (PNG); "
                         "data: rank the samples of --data by their dependence on far context")
    pr.add_argument("--model", default="smollm2-135m", help="embedded model name or local model directory")
    pr.add_argument("--out", required=True, help="the JSON profile to write")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    pr.add_argument("--method", default=None,
                    choices=["retrieval", "gates", "attention_influence", "cam", "amp", "act"],
                    help="heads: retrieval (training-free retrieval score), gates (DuoAttention's trained gates), "
                         "attention_influence (loss rise when a head is masked), cam (GATEAU's contextual "
                         "awareness), amp (AMP's projected-output norm), act (ACT's head filtering: the answer's "
                         "loss drop when ACT calibrates that head alone; for act:heads=FILE); default retrieval. "
                         "data: attention_influence (answer-loss rise with the --profile's top heads masked) or cam "
                         "(GATEAU's contextual awareness; the default)")
    pr.add_argument("--data", default=None, help="data: the JSONL samples (context, question, answers per line)")
    pr.add_argument("--profile", default=None,
                    help="data --method attention_influence: the head profile whose top heads are masked")
    pr.add_argument("--top", default=0.05, type=float,
                    help="data --method attention_influence: fraction of query heads masked (default 0.05)")
    pr.add_argument("--segments", default=8, type=int, help="cam: context segments (default 8)")
    pr.add_argument("--task", default="niah", help="heads --method act: the calibration task (default niah)")
    pr.add_argument("--beta", default=0.4, type=float,
                    help="heads --method act: the factor on a sink's attention (default 0.4)")
    pr.add_argument("--samples", default=None, type=int, help="prompts (heads: 8 passkey samples, search: 2)")
    pr.add_argument("--steps", default=60, type=int, help="gates: optimisation steps")
    pr.add_argument("--length", default=None, type=int, help="prompt tokens (heads: 1024, search: 4096)")
    pr.add_argument("--density", default=0.3, type=float, help="search: mean density budget over all heads")
    pr.add_argument("--candidates", default=None, type=_csv, help="search: candidate pattern specs")
    pr.add_argument("--layer", default=None, type=int, help="heatmap: the layer")
    pr.add_argument("--head", default=None, type=int, help="heatmap: the query head")
    pr.add_argument("--recipe", default=None, help="heatmap: a recipe whose prefill pattern is drawn over the map")
    pr.add_argument("--alpha", default=5.0, type=float,
                    help="sinks: a hidden sink gets at least alpha x the uniform share of attention; heads --method "
                         "act: ACT's sink threshold alpha/N (default 5)")
    pr.add_argument("--frequency", default=0.5, type=float,
                    help="sinks: ... from at least this fraction of the queries after it (default 0.5)")
    pr.add_argument("--png", default=None, help="sinks: the PNG to write beside the JSON (default: --out with .png)")

    tr = sub.add_parser("train", help="train a small model around a token mixer on a synthetic long-range task")
    tr.add_argument("--task", default="mqar", help="mqar (multi-query associative recall), selective_copy, listops (nested MAX/MIN/MED/SM, value at a final marker) or lm (bytes of the stdlib source, perplexity by position)")
    tr.add_argument("--mixer", required=True, help="mixer[:key=value...] (longattn list --kind mixer)")
    tr.add_argument("--seq", default=256, type=int, help="sequence length (default 256)")
    tr.add_argument("--steps", default=300, type=int, help="optimisation steps (default 300)")
    tr.add_argument("--dim", default=64, type=int, help="model width (default 64)")
    tr.add_argument("--layers", default=2, type=int, help="layers (default 2)")
    tr.add_argument("--heads", default=4, type=int, help="mixer heads (default 4)")
    tr.add_argument("--vocab", default=256, type=int, help="vocabulary size (default 256)")
    tr.add_argument("--batch", default=32, type=int, help="batch size (default 32)")
    tr.add_argument("--lr", default=1e-3, type=float, help="AdamW learning rate (default 1e-3)")
    tr.add_argument("--eval-every", default=50, type=int, help="steps between evaluations (default 50)")
    tr.add_argument("--seed", default=0, type=int, help="seed of the model and the data (default 0)")
    tr.add_argument("--pairs", default=None, type=int,
                    help="mqar: key-value pairs (default seq / 3, queries right after them; fewer: queries scattered)")
    tr.add_argument("--bidirectional", action="store_true", help="the mixer's bidirectional form")
    tr.add_argument("--out", required=True, help="directory for steps.jsonl, summary.json and curves.png")
    tr.add_argument("--overwrite", action="store_true", help="replace an existing --out directory's files")

    ft = sub.add_parser("finetune", help="extend a model's context: LoRA fine-tuning under S2-Attn / SF-Attn, "
                        "evaluated with full attention")
    ft.add_argument("--method", required=True, help="s2attn (LongLoRA) or sfattn (SinkLoRA: + attention sinks)")
    ft.add_argument("--length", required=True, type=int, help="target context length (training chunk length)")
    ft.add_argument("--lora-r", default=8, type=int, help="LoRA rank (default 8)")
    ft.add_argument("--rope", default="linear", help="RoPE stretch to --length: linear (position interpolation, "
                    "LongLoRA's; default) or yarn (YaRN: high frequencies kept)")
    ft.add_argument("--model", default="smollm2-135m", help="embedded model name or local model directory")
    ft.add_argument("--steps", default=20, type=int, help="optimisation steps, one chunk each (default 20)")
    ft.add_argument("--group", default=None, type=int, help="S2 group size, even (default: length / 4)")
    ft.add_argument("--sink", default=4, type=int, help="sfattn: sink tokens every query attends (default 4)")
    ft.add_argument("--lr", default=2e-4, type=float, help="AdamW learning rate (default 2e-4)")
    ft.add_argument("--seed", default=0, type=int, help="seed (default 0)")
    ft.add_argument("--out", required=True, help="directory for summary.json, steps.jsonl and the merged model/")
    ft.add_argument("--overwrite", action="store_true", help="replace an existing --out directory's run")

    d = sub.add_parser("dist-bench", help="sequence-parallel attention on local gloo processes vs one process")
    d.add_argument("--nproc", type=int, required=True, help="processes (ranks)")
    d.add_argument("--method", required=True,
                   choices=["ring", "zigzag", "allgather", "ulysses", "dist_decode", "lasp2", "ulysses_deepspeed"],
                   help="sequence-parallel method")
    d.add_argument("--seq", type=int, required=True, help="total sequence length (tokens)")
    d.add_argument("--heads", type=int, default=8, help="query heads (default 8)")
    d.add_argument("--kv-heads", type=int, default=2, help="kv heads (default 2)")
    d.add_argument("--dim", type=int, default=64, help="head dim (default 64)")
    d.add_argument("--repeats", type=int, default=3, help="timed repetitions (default 3)")
    d.add_argument("--threads", type=int, default=1, help="torch threads per process (and for the baseline)")
    d.add_argument("--kernel", default="flash", help="block kernel of the softmax methods: flash (CPU flash op) or eager")
    d.add_argument("--timeout", type=float, default=300.0, help="seconds before a silent rank fails the run")
    d.add_argument("--json", dest="json_path", help="write the records as one JSON list to this file")
    d.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    return p


def _cmd_list(a) -> int:
    from . import registry
    from .ops.dispatch import BACKENDS

    if a.markdown:
        from .docs import methods_markdown

        print(methods_markdown(), end="")
        return 0
    kinds = [a.kind] if a.kind else ["prefill", "kv", "decode", "calibrate", "task", "backend", "mixer"]
    for kind in kinds:
        if kind == "backend":
            for be in BACKENDS:
                print(f"{be:<20} backend  block-sparse attention backend")
            continue
        for e in registry.entries(kind):
            print(f"{e.name:<20} {e.kind:<8} {e.summary} | {e.paper}")
    return 0


def _prompt_ids(tok, context: str, question: str | None):
    """``(context ids, question ids)`` as the bench encodes a sample (chat template where the model has one); with
    no question, the whole prompt is the context."""
    from .bench.prompts import encode
    from .bench.tasks.base import Sample

    if question is None:
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": context}], add_generation_prompt=True,
                                          tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) else ids
        else:
            ids = tok(context)["input_ids"]
        return list(ids), []
    return encode(tok, Sample("cli", context, question, "", []))


def _check_positions(model, n: int, flag: str, extrapolate: bool, name: str) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and n > limit and not extrapolate:
        raise ValueError(f"{flag}: {n} tokens exceed the model's {limit} positions ({name}); add --extrapolate to run "
                         "past them anyway")


def _cmd_generate(a) -> int:
    import torch

    from . import api, models
    from .bench.decoding import forward, greedy_model

    if a.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    text = read_text(a.prompt_file, "--prompt-file")
    header = None
    if a.context:
        from .context import read_header

        header = read_header(a.context)  # a bad file fails before the model loads
    if a.dist:
        return _generate_dist(a, text)
    recipe = api.parse(a.recipe if a.recipe != "dense" or header is None else header["recipe"])
    model, tok = models.load(a.model, dtype=getattr(torch, a.dtype))
    eos = set(tok.all_special_ids)
    from .cache import cache_nbytes

    if header is not None:
        from .context import load_context

        cache, header = load_context(a.context, model, recipe)
        _, rest = _prompt_ids(tok, "x", text)
        _check_positions(model, header.get("n_tokens", 0) + len(rest) + a.max_new_tokens, "--prompt-file",
                         a.extrapolate, a.model)
        with torch.no_grad(), api.apply(model, recipe, tokenizer=tok) as s:
            s.set_compression(False)  # the context was compressed once; the question never is
            logits = forward(model, rest, cache, s.cache_kwarg, last=True)[0, -1]
            gen, _ = greedy_model(model, logits, cache, s.cache_kwarg, a.max_new_tokens, eos)
            nbytes = cache_nbytes(cache)
        n_prompt = header.get("n_tokens", 0) + len(rest)
    else:
        ids, _ = _prompt_ids(tok, text, None)
        _check_positions(model, len(ids) + a.max_new_tokens, "--prompt-file", a.extrapolate, a.model)
        x = torch.tensor([ids])
        with torch.no_grad(), api.apply(model, recipe, tokenizer=tok) as s:
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=a.max_new_tokens,
                                 do_sample=False)
            nbytes = cache_nbytes(s.cache) if s.cache is not None else 0
        gen, n_prompt = out[0, x.shape[1]:].tolist(), x.shape[1]
    print(tok.decode(gen, skip_special_tokens=True))
    print(f"[longattn] recipe={recipe} prompt_tokens={n_prompt} kv_cache_bytes={nbytes} "
          f"method_s={s.method_s:.3f}", file=sys.stderr)
    return 0


def _generate_dist(a, text: str) -> int:
    """``generate --dist MODE`` in one rank of ``torchrun``: the prompt's prefill split across the ranks."""
    import torch
    import torch.distributed as dist

    from . import models
    from .distributed.comm import shutdown
    from .distributed.model import check_model, local_lengths, sp_generate

    if a.context:
        raise ValueError("--dist: answering from a saved --context is not sequence parallel; drop one of them")
    if a.recipe != "dense":
        raise ValueError(f"--dist: the sequence-parallel prefill runs dense attention; got --recipe {a.recipe!r}")
    if a.dist_backend == "deepspeed" and a.dist != "ulysses":
        raise ValueError(f"--dist-backend deepspeed: only with --dist ulysses (got --dist {a.dist})")
    rank = _init_torchrun(f"--dist {a.dist}", "generate")
    nproc = dist.get_world_size()
    ok = False
    try:
        model, tok = models.load(a.model, dtype=getattr(torch, a.dtype))
        check_model(model, a.dist, nproc)
        ids, _ = _prompt_ids(tok, text, None)
        local_lengths(len(ids), a.dist, nproc)
        _check_positions(model, len(ids) + a.max_new_tokens, "--prompt-file", a.extrapolate, a.model)
        res = sp_generate(model, ids, a.dist, a.max_new_tokens, eos=set(tok.all_special_ids),
                          backend=a.dist_backend)
        ok = True
    finally:
        shutdown(ok)
    if rank == 0:
        print(tok.decode(res["tokens"], skip_special_tokens=True))
        per = ",".join(str(b) for b in res["cache_bytes_per_rank"])
        print(f"[longattn] dist={a.dist} ranks={nproc} prompt_tokens={len(ids)} local_tokens="
              f"{','.join(map(str, res['lengths']))} kv_cache_bytes_per_rank={per} prefill_s={res['prefill_s']:.3f}",
              file=sys.stderr)
    return 0


def _device(spec: str) -> str:
    """``--device``: cpu or an available cuda device, else one clear error."""
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device must be cpu or cuda[:i], got {spec!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: no CUDA device on this machine (use cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:i], got {spec!r}")
    return str(dev)


def _cmd_compress(a) -> int:
    import time

    import torch
    from transformers import DynamicCache

    from . import api, models
    from .bench.decoding import forward
    from .cache import cache_nbytes
    from .context import save_context
    from .outputs import check_output_file

    recipe = api.parse(a.recipe)
    if recipe.kv is not None and recipe.kv.query_aware:
        raise ValueError("--recipe: a query-aware policy compresses after one question; a saved context is "
                         "compressed once for every later question (use the question-agnostic policy)")
    check_output_file(a.out, "--out", overwrite=a.overwrite)
    text = read_text(a.context_file, "--context-file")
    model, tok = models.load(a.model, dtype=getattr(torch, a.dtype))
    ctx, _ = _prompt_ids(tok, text, "?")
    _check_positions(model, len(ctx), "--context-file", a.extrapolate, a.model)
    with torch.no_grad(), api.apply(model, recipe, tokenizer=tok) as s:
        cache = DynamicCache(config=model.config)
        t0 = time.perf_counter()
        forward(model, ctx, cache, s.cache_kwarg, last=True)
        prefill_s = time.perf_counter() - t0
        cache = s.cache
    save_context(a.out, cache, model, recipe, n_tokens=len(ctx), meta={"model_name": a.model,
                                                                        "prefill_s": prefill_s})
    print(f"wrote {a.out}: {len(ctx)} context tokens, {cache_nbytes(cache)} cache bytes, prefill {prefill_s:.2f} s",
          file=sys.stderr)
    return 0


def _load_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config: no such file {path!r}")
    text = read_text(path, "--config")
    try:
        if p.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # pragma: no cover - python 3.10
                import tomli as tomllib
            conf = tomllib.loads(text)
        elif p.suffix == ".json":
            conf = json.loads(text)
        else:
            raise ValueError(f"--config: expected a .toml or .json file, got {path!r}")
    except (ValueError, TypeError) as e:
        if str(e).startswith("--config"):
            raise
        raise ValueError(f"--config {path}: not valid {p.suffix[1:].upper()} ({e})") from None
    if not isinstance(conf, dict):
        raise ValueError(f"--config {path}: expected a table/object of settings")
    return conf


# --config key -> (BenchConfig field, kind): "list-str", "list-int", "int", "str"
_CONFIG_KEYS = {"model": ("model", "str"), "tasks": ("tasks", "list-str"), "lengths": ("lengths", "list-int"),
                "samples": ("samples", "int"), "methods": ("methods", "list-str"), "seed": ("seed", "int"),
                "data": ("data", "str"), "scorer": ("scorer", "str")}


def _config_value(key: str, v, kind: str):
    """A --config value as the flag would give it (lists may also be comma-separated strings, as on the command
    line); anything else is refused naming the key and the expected type."""
    if kind.startswith("list"):
        if isinstance(v, str):
            v = _csv(v)
        if not isinstance(v, list) or not v:
            raise ValueError(f"--config: {key} must be a list (or a comma-separated string), got {v!r}")
        if kind == "list-int" and not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise ValueError(f"--config: {key} must be a list of integers, got {v!r}")
        if kind == "list-str" and not all(isinstance(x, str) and x.strip() for x in v):
            raise ValueError(f"--config: {key} must be a list of non-empty strings, got {v!r}")
        return tuple(v)
    if kind == "int" and (isinstance(v, bool) or not isinstance(v, int)):
        raise ValueError(f"--config: {key} must be an integer, got {v!r}")
    if kind == "str" and not isinstance(v, str):
        raise ValueError(f"--config: {key} must be a string, got {v!r}")
    return v


def _cmd_bench(a) -> int:
    from .bench.report import bench_table
    from .bench.runner import DEFAULT_METHODS, BenchConfig, run

    cfg = BenchConfig(model=a.model, tasks=tuple(a.task), lengths=tuple(a.lengths), samples=a.samples,
                      methods=tuple(a.methods) if a.methods is not None else DEFAULT_METHODS, seed=a.seed,
                      json_path=a.json_path, out_dir=a.out, resume=a.resume, overwrite=a.overwrite,
                      extrapolate=a.extrapolate, data=a.data, scorer=a.scorer, peer=a.peer, dtype=a.dtype,
                      decode_steps=a.decode_steps, decode_rounds=a.decode_rounds)
    if a.config:
        conf = _load_config(a.config)
        for k, v in conf.items():
            if k not in _CONFIG_KEYS:
                raise ValueError(f"--config: unknown key {k!r}; allowed: {', '.join(sorted(_CONFIG_KEYS))}")
            field_, kind = _CONFIG_KEYS[k]
            setattr(cfg, field_, _config_value(k, v, kind))
    if a.scorer not in ("contains", "exact", "rouge"):  # pragma: no cover - argparse choices
        raise ValueError(f"--scorer must be one of contains, exact, rouge; got {a.scorer!r}")
    if a.dist:
        if a.methods is None and not a.config:
            cfg.methods = ("dense",)
        return _bench_dist(a, cfg)
    if a.dist_backend != "torch":
        raise ValueError("--dist-backend: only with --dist ulysses")
    records = run(cfg)
    if a.out:
        from .bench.report import render_dir

        print(render_dir(records, a.out))
    else:
        print(bench_table(records))
    return 0


def _bench_dist(a, cfg) -> int:
    """``bench --dist MODE`` in one rank of ``torchrun``; rank 0 prints the table (and writes the outputs)."""
    from .bench.dist_runner import run_dist
    from .bench.report import bench_table, render_dir
    from .distributed.comm import shutdown

    rank = _init_torchrun(f"--dist {a.dist}", "bench")
    ok = False
    try:
        records = run_dist(cfg, a.dist, a.dist_backend)
        ok = True
    except ValueError:
        if rank != 0:  # every rank stops with the same line: rank 0 says it
            return 2
        raise
    finally:
        shutdown(ok)
    if rank == 0:
        print(render_dir(records, a.out) if a.out else bench_table(records))
    return 0


def _init_torchrun(flag: str, cmd: str) -> int:
    """This process's rank in the gloo group of ``torchrun`` (initialised here); one clear line outside it."""
    import datetime
    import os

    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise ValueError(f"{flag}: run under torchrun (torchrun --nproc-per-node P -m longattn.cli {cmd} "
                         "...): WORLD_SIZE and RANK are not set")
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    return dist.get_rank()


def _cmd_report(a) -> int:
    from .bench.report import render_dir
    from .bench.runner import read_results

    path = Path(a.dir) / "results.jsonl"
    if not path.is_file():
        raise ValueError(f"report: no results.jsonl in {a.dir!r}")
    records = read_results(path, warn=lambda s: print(s, file=sys.stderr))
    if not records:
        raise ValueError(f"report: {path} holds no valid record (every line is empty or corrupt); nothing to report")
    print(render_dir(records, a.dir))
    print(f"wrote {a.dir}/table.txt, report.html and the plots", file=sys.stderr)
    return 0


def _cmd_ops_bench(a) -> int:
    _check_json(a)
    from .bench.ops import DEFAULT_PATTERNS, OpsBenchConfig, run_ops
    from .bench.report import ops_table
    from .checks import check_block_size
    from .ops.dispatch import BACKENDS

    if sum(map(bool, (a.cab, a.decode, a.linear))) > 1:
        raise ValueError("--cab, --decode and --linear: choose one")
    if a.cab:
        return _cab_bench(a)
    if a.decode:
        return _decode_bench(a)
    if a.linear:
        return _linear_bench(a)
    if a.selectors or a.budget is not None:
        raise ValueError("--selectors/--budget need --decode")
    for be in a.backends:
        if be not in BACKENDS:
            raise ValueError(f"--backends: unknown backend {be!r}; allowed: {', '.join(BACKENDS)}")
    if a.block_size is not None:
        check_block_size(a.block_size, "--block-size")
    cfg = OpsBenchConfig(patterns=tuple(a.patterns or DEFAULT_PATTERNS), lengths=tuple(a.lengths or (8192, 32768)),
                         dtypes=tuple(a.dtypes or ("float32", "bfloat16")), heads=_or(a.heads, 8),
                         kv_heads=_or(a.kv_heads, 0), dim=_or(a.dim, 64), backends=tuple(a.backends),
                         block_size=a.block_size, repeats=a.repeats, qk=a.qk or "captured", model=a.model,
                         layer=a.layer, capture_max=a.capture_max, device=_device(a.device))
    recs = run_ops(cfg)
    print(ops_table(recs))
    _write_json(a.json_path, recs)
    return 0


def _or(value, default):
    return default if value is None else value


def _check_json(a) -> None:
    """``--json FILE`` must be writable before the run starts (and not replace a file unasked)."""
    if getattr(a, "json_path", None):
        from .outputs import check_output_file

        check_output_file(a.json_path, "--json", overwrite=getattr(a, "overwrite", False))


def _write_json(path, recs) -> None:
    """The records of an ops / decode / linear / CAB / dist bench, each with the machine it ran on (CPU model,
    vector ISA, the ISA torch's kernels dispatch to, threads, versions), as bench records carry it."""
    if path:
        from .bench.records import environment
        from .outputs import write_atomic

        env = environment()
        write_atomic(path, json.dumps([{**env, **r} if isinstance(r, dict) else r for r in recs], indent=1))


def _cab_bench(a) -> int:
    from .bench.cab import CabConfig, cab_table, run_cab

    if a.selectors or a.budget is not None or a.block_size is not None:
        raise ValueError("--cab takes --patterns, --lengths, --heads, --kv-heads, --dim, --repeats")
    heads = _or(a.heads, 8)
    cfg = CabConfig(patterns=tuple(a.patterns or ()), lengths=tuple(a.lengths or CabConfig.lengths), heads=heads,
                    kv_heads=_or(a.kv_heads, 2 if a.heads is None else heads), dim=_or(a.dim, 64), repeats=a.repeats)
    recs = run_cab(cfg)
    print(cab_table(recs))
    _write_json(a.json_path, recs)
    return 0


def _linear_bench(a) -> int:
    from .bench.linear_ops import LinearBenchConfig, linear_table, run_linear_ops

    if a.patterns or a.selectors or a.budget is not None or a.block_size is not None:
        raise ValueError("--linear takes --lengths, --heads, --dim, --repeats (not --patterns/--selectors/--budget)")
    cfg = LinearBenchConfig(lengths=tuple(a.lengths or LinearBenchConfig.lengths), heads=_or(a.heads, 8),
                            dim=_or(a.dim, 64), repeats=a.repeats)
    recs = run_linear_ops(cfg)
    print(linear_table(recs))
    _write_json(a.json_path, recs)
    return 0


def _decode_bench(a) -> int:
    from .bench.decode_ops import DEFAULT_SELECTORS, DecodeBenchConfig, run_decode_ops
    from .bench.report import decode_table

    if a.patterns or a.block_size is not None:
        raise ValueError("--patterns/--block-size are for prefill patterns; with --decode use --selectors")
    heads = _or(a.heads, 32)
    cfg = DecodeBenchConfig(selectors=tuple(a.selectors or DEFAULT_SELECTORS),
                            lengths=tuple(a.lengths or (32768, 131072)), dtypes=tuple(a.dtypes or ("float32",)),
                            heads=heads, kv_heads=_or(a.kv_heads, 8 if a.heads is None else heads),
                            dim=_or(a.dim, 128), budget=_or(a.budget, 2048), repeats=a.repeats,
                            qk=a.qk or "random", model=a.model, layer=a.layer, capture_max=a.capture_max,
                            device=_device(a.device))
    if cfg.budget < 1:
        raise ValueError(f"--budget must be an int >= 1, got {cfg.budget}")
    recs = run_decode_ops(cfg)
    print(decode_table(recs))
    _write_json(a.json_path, recs)
    return 0


def _cmd_profile(a) -> int:
    from . import models
    from .outputs import check_output_file
    from .profile import retrieval_scores, write_profile

    check_output_file(a.out, "--out", overwrite=a.overwrite)
    if a.what == "data":
        return _profile_data(a)
    if a.method is None:
        a.method = "retrieval"
    if a.what == "search":
        return _profile_search(a)
    if a.what in ("sinks", "heatmap"):
        return _profile_view(a)
    a.length = a.length or 1024
    explicit_samples = a.samples
    a.samples = 8 if a.samples is None else a.samples
    if a.samples < 1 or a.length < 128:
        raise ValueError(f"--samples must be >= 1 and --length >= 128, got {a.samples}, {a.length}")
    if a.method == "act":  # named before the model loads
        from . import registry

        tasks = [n for n in registry.names("task")  # question-answer tasks with generated samples
                 if n != "custom" and getattr(registry.get(n, "task").cls, "runs_as", "qa") == "qa"]
        if a.task not in tasks:
            raise ValueError(f"--task must be one of {', '.join(tasks)}, got {a.task!r}")
        if not 0 <= a.beta <= 1 or a.alpha <= 0:
            raise ValueError(f"--beta must be in [0, 1] and --alpha > 0, got {a.beta}, {a.alpha}")
    model, tok = models.load(a.model)
    if a.method == "gates":
        from .profile.duo_train import train_gates

        if a.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {a.steps}")
        scores = train_gates(model, tok, steps=a.steps, length=a.length)
        write_profile(a.out, scores, "duo_gates", a.model)
    elif a.method in ("attention_influence", "cam", "amp"):
        from .profile import head_scores

        fn = {"attention_influence": head_scores.attention_influence, "cam": head_scores.cam_scores,
              "amp": head_scores.amp_scores}[a.method]
        samples = 2 if explicit_samples is None else explicit_samples  # one forward per head and sample: 2
        scores, per_q = fn(model, tok, samples=samples, length=a.length)
        write_profile(a.out, scores, a.method, a.model, query_head_scores=per_q)
    elif a.method == "act":
        from .profile import head_scores

        samples = 2 if explicit_samples is None else explicit_samples
        scores, per_q = head_scores.act_gains(model, tok, samples=samples, length=a.length, task=a.task,
                                              alpha=a.alpha, beta=a.beta)
        write_profile(a.out, scores, "act_gain", a.model, query_head_scores=per_q)
        good = sum(g > 0 for row in per_q for g in row)
        print(f"{good} of {sum(len(r) for r in per_q)} query heads lower the answers' loss when calibrated")
    else:
        scores = retrieval_scores(model, tok, samples=a.samples, length=a.length)
        write_profile(a.out, scores, "retrieval_score", a.model)
    print(f"wrote {a.out}: {len(scores)} layers x {len(scores[0])} kv heads")
    return 0


def _profile_data(a) -> int:
    import json

    from . import models
    from .bench.tasks.custom import load_jsonl
    from .outputs import write_atomic
    from .profile.data import METHODS, rank_data

    method = a.method or "cam"
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)} for profile data, got {method!r}")
    if a.data is None:
        raise ValueError("--data: profile data needs a JSONL file of samples (context, question, answers)")
    samples = load_jsonl(a.data)
    if not samples:
        raise ValueError(f"--data {a.data}: no samples")
    if method == "attention_influence":
        from .profiles import load_profile

        if a.profile is None:
            raise ValueError("--profile: profile data --method attention_influence masks the top heads of a head "
                             "profile (longattn profile heads --out FILE, or a built-in name)")
        if not 0 < a.top <= 1:
            raise ValueError(f"--top must be in (0, 1], got {a.top}")
        load_profile(a.profile)
    elif a.segments < 2:
        raise ValueError(f"--segments must be >= 2, got {a.segments}")
    model, tok = models.load(a.model)
    out = rank_data(model, tok, samples, method, profile=a.profile, top=a.top, segments=a.segments)
    out.update(model=a.model, data=a.data)
    write_atomic(a.out, json.dumps(out, indent=1))
    best = out["ranking"][0]
    print(f"wrote {a.out}: {len(samples)} samples ranked by {method}; first: #{best['index']} "
          f"({best['id']}, score {best['score']:.3f})")
    return 0


def _profile_view(a) -> int:
    import json
    from pathlib import Path

    from . import models
    from .outputs import check_output_file, write_atomic

    length = a.length or 1024
    if length < 64:
        raise ValueError(f"--length must be >= 64, got {length}")
    if a.what == "heatmap":
        from .profile.heatmap import attention_map, heatmap_png

        if a.layer is None or a.head is None:
            raise ValueError("heatmap: give --layer L and --head H")
        if not a.out.endswith(".png"):
            raise ValueError(f"--out: heatmap writes a PNG; give a .png path, got {a.out!r}")
        if a.recipe is not None:
            from .api import parse

            if parse(a.recipe).prefill is None:
                raise ValueError(f"--recipe {a.recipe!r} has no prefill pattern to draw")
        model, tok = models.load(a.model)
        m = attention_map(model, tok, a.layer, a.head, length=length, recipe=a.recipe)
        heatmap_png(m, a.out)
        extra = "" if m["recall"] is None else f"; {m['pattern']}: recall {m['recall']:.3f}, density {m['density']:.3f}"
        print(f"wrote {a.out}: layer {a.layer} head {a.head}, {m['length']} tokens{extra}")
        return 0
    from .profile.sinks import sink_png, sink_profile

    if a.alpha <= 1 or not 0 < a.frequency <= 1:
        raise ValueError(f"--alpha must be > 1 and --frequency in (0, 1], got {a.alpha}, {a.frequency}")
    png = a.png or str(Path(a.out).with_suffix(".png"))
    check_output_file(png, "--png", overwrite=a.overwrite)
    samples = 1 if a.samples is None else a.samples
    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    model, tok = models.load(a.model)
    prof = sink_profile(model, tok, length=length, samples=samples, alpha=a.alpha, frequency=a.frequency)
    prof["model"] = a.model
    write_atomic(a.out, json.dumps(prof, indent=1))
    sink_png(prof, png)
    sm = prof["summary"]
    print(f"wrote {a.out} and {png}: {sm['first_token_sink_heads']}/{sm['heads']} heads put >= half their attention "
          f"on the first token; {sm['hidden_sinks']} hidden sinks, most often {sm['top_hidden_tokens'][:5]}")
    return 0


def _profile_search(a) -> int:
    from . import models
    from .prefill.mixed import write_mixed
    from .profile.search import CANDIDATES, search_patterns

    length = a.length or 4096
    samples = 2 if a.samples is None else a.samples
    if not 0.0 < a.density <= 1.0:
        raise ValueError(f"--density must be in (0, 1], got {a.density}")
    cands = tuple(a.candidates) if a.candidates else CANDIDATES
    from .api import parse_method

    for c in cands:
        parse_method(c, "prefill")
    model, tok = models.load(a.model)
    res = search_patterns(model, tok, length=length, samples=samples, density=a.density, candidates=cands)
    write_mixed(a.out, res["layers"], block_size=64, model=a.model, length=length, samples=samples,
                target_density=a.density, chosen=res["chosen"], uniform=res["uniform"])
    ch, un = res["chosen"], res["uniform"]
    print(f"wrote {a.out}: {len(res['layers'])} layers x {len(res['layers'][0])} heads")
    print(f"per-head search : recall {ch['recall']:.3f} at mean density {ch['density']:.3f}")
    print(f"best uniform    : recall {un['recall']:.3f} at mean density {un['density']:.3f} ({un['pattern']})")
    print(f"use it with: --methods mixed:profile={a.out}")
    return 0


def _run_dir(path: str, names: tuple[str, ...], overwrite: bool):
    """The ``--out`` directory of a training run: refused when it already holds one of ``names`` (a run) unless
    ``overwrite``; checked writable (created)."""
    from pathlib import Path

    from .outputs import check_output_dir

    done = [n for n in names if (Path(path) / n).exists()]
    if done and not overwrite:
        raise ValueError(f"--out: {path} already holds a run ({', '.join(done)}); give --overwrite to replace it "
                         "or another --out")
    return check_output_dir(path, "--out")


def _cmd_train(a) -> int:
    from .train import TASKS, TrainConfig, train

    if a.task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {a.task!r}")
    out = _run_dir(a.out, ("steps.jsonl", "summary.json", "curves.png"), a.overwrite)
    cfg = TrainConfig(task=a.task, mixer=a.mixer, seq=a.seq, steps=a.steps, dim=a.dim, layers=a.layers,
                      heads=a.heads, vocab=a.vocab, batch=a.batch, lr=a.lr, eval_every=a.eval_every, seed=a.seed,
                      causal=False if a.bidirectional else None, pairs=a.pairs)
    s = train(cfg, out)
    print(f"{a.mixer} on {a.task} (seq {a.seq}, {'causal' if s['causal'] else 'bidirectional'}): accuracy "
          f"{s['final_acc']:.3f} (best {s['best_acc']:.3f}), {s['s_per_step'] * 1e3:.1f} ms/step, "
          f"{s['params']} parameters; wrote {out}")
    return 0


def _cmd_finetune(a) -> int:
    from .checks import check_choice
    from .finetune import METHODS, ROPE_SCALINGS, FinetuneConfig, finetune

    check_choice(a.method, "--method", METHODS)  # before --out is created; finetune() checks them again for callers
    check_choice(a.rope, "--rope", ROPE_SCALINGS)
    out = _run_dir(a.out, ("steps.jsonl", "summary.json", "model"), a.overwrite)
    cfg = FinetuneConfig(method=a.method, model=a.model, length=a.length, lora_r=a.lora_r, group=a.group,
                         sink=a.sink, steps=a.steps, lr=a.lr, seed=a.seed, rope=a.rope)
    s = finetune(cfg, out)
    b, f = s["ppl_before"][-1]["ppl"], s["ppl_after"][-1]["ppl"]
    print(f"{a.method} L={a.length}: loss {s['first_loss']:.3f} -> {s['last_loss']:.3f} in {s['train_s']:.0f} s; "
          f"perplexity of the last positions {b:.2f} -> {f:.2f} (full attention); wrote {out}\n"
          f"passkey by length: {s['evaluate']}")
    return 0


def _cmd_dist_bench(a) -> int:
    _check_json(a)
    from .distributed.bench import DistBenchConfig, dist_table, run_dist_bench

    if a.timeout <= 0:
        raise ValueError(f"--timeout must be > 0, got {a.timeout}")
    cfg = DistBenchConfig(method=a.method, nproc=a.nproc, seq=a.seq, heads=a.heads, kv_heads=a.kv_heads, dim=a.dim,
                          repeats=a.repeats, threads=a.threads, kernel=a.kernel, timeout_s=a.timeout)
    recs = run_dist_bench(cfg)
    print(dist_table(recs))
    _write_json(a.json_path, recs)
    return 0


def main(argv: list[str] | None = None) -> int:
    a = _build().parse_args(argv)
    handlers = {"list": _cmd_list, "generate": _cmd_generate, "compress": _cmd_compress, "bench": _cmd_bench,
                "report": _cmd_report,
                "ops-bench": _cmd_ops_bench, "profile": _cmd_profile, "dist-bench": _cmd_dist_bench,
                "train": _cmd_train, "finetune": _cmd_finetune}
    try:
        return handlers[a.cmd](a)
    except ValueError as e:
        print(f"longattn: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
