"""``longattn train``: a small model (2-4 layers) around any mixer, trained on synthetic long-range tasks.

Tasks (seeded generators, fresh batches every step, a fixed evaluation set):
* ``mqar`` — multi-query associative recall (Zoology, Arora et al., 2023, https://arxiv.org/abs/2312.04927):
  ``pairs`` key-value pairs, then the keys again in a shuffled order; at each queried key the model must output
  its value (keys and values from disjoint halves of the vocabulary). With the default ``pairs = seq // 3`` the
  queries follow the pairs at once (the densest form); with fewer pairs, as in Zoology's sweeps (e.g. 4 pairs at
  64 tokens up to 64 at 512), the queries sit at random positions of the rest of the sequence, between blanks
  (token 0). The values are not in the query part, so causal and bidirectional mixers train on the same inputs.
* ``selective_copy`` — the ``tokens`` data tokens scattered among blanks, then as many markers; at the markers the
  model outputs the data tokens in order (Mamba's selective copying, Gu & Dao, 2023,
  https://arxiv.org/abs/2312.00752).
* ``listops`` — a nested expression of ``MAX``, ``MIN``, ``MED`` (median, truncated) and ``SM`` (sum modulo 10) over
  digits, its value (a digit) asked at a final marker (ListOps, Nangia & Bowman, 2018,
  https://arxiv.org/abs/1804.06028, as in the Long Range Arena, Tay et al., 2021); blanks before the expression
  fill the sequence, so the marker is always last. Chance is 0.1.
* ``lm`` — a byte-level language model on this interpreter's standard-library source (``vocab`` >= 256): random
  windows of ``seq`` bytes from the first 90% of the text, evaluated on windows from the last 10%; every next byte
  is a target. The summary adds the evaluation perplexity by position (``ppl_by_position``: 8 buckets), which says
  whether a mixer uses the context far behind a byte. Causal mixers only.

A mixer with an auxiliary training loss (LongVQ's commitment loss) sets ``aux_loss`` in its forward; the trainer
adds it to the task loss (the step log's ``loss`` is the task loss, ``aux`` the sum of the auxiliary ones).

Loss and accuracy are on the target positions only. Each run writes ``steps.jsonl`` (one line per step: loss,
and accuracy where evaluated), ``summary.json`` (final and best accuracy, seconds and peak memory per step, the
settings) and ``curves.png``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["TrainConfig", "TinyModel", "make_batch", "train", "TASKS"]

TASKS = ("mqar", "selective_copy", "listops", "lm")


@dataclass
class TrainConfig:
    task: str = "mqar"
    mixer: str = "softmax"
    seq: int = 256
    steps: int = 300
    dim: int = 64
    layers: int = 2
    heads: int = 4
    vocab: int = 256
    batch: int = 32
    lr: float = 1e-3
    eval_every: int = 50
    eval_batches: int = 4
    seed: int = 0
    causal: bool | None = None  # None: the mixer's first form (causal where it has one)
    pairs: int | None = None  # mqar: key-value pairs (None: seq // 3, queries right after the pairs)


def _lm_bytes() -> torch.Tensor:
    from .bench.tasks.niah import stdlib_text

    global _LM
    if _LM is None:
        _LM = torch.frombuffer(bytearray(stdlib_text().encode("utf-8")), dtype=torch.uint8).long()
    return _LM


_LM = None


def make_batch(task: str, batch: int, seq: int, vocab: int, g: torch.Generator, pairs: int | None = None,
               held_out: bool = False):
    """``(inputs [b, seq] long, targets [b, seq] long, -100 where nothing is asked)``; ``held_out``: the lm task's
    evaluation windows (the last 10% of the text)."""
    x = torch.zeros(batch, seq, dtype=torch.long)
    y = torch.full((batch, seq), -100, dtype=torch.long)
    if task == "mqar":
        half = vocab // 2
        dense = pairs is None
        pairs = seq // 3 if dense else pairs
        if pairs < 1 or 3 * pairs > seq or pairs > half - 1:
            raise ValueError(f"--pairs {pairs} / --seq {seq}: mqar needs 1 <= pairs <= seq / 3 and pairs < vocab / 2 "
                             f"({half})")
        for b in range(batch):
            keys = torch.randperm(half - 1, generator=g)[:pairs] + 1
            vals = torch.randint(half, vocab, (pairs,), generator=g)
            x[b, 0 : 2 * pairs : 2], x[b, 1 : 2 * pairs : 2] = keys, vals
            order = torch.randperm(pairs, generator=g)
            if dense:
                at = torch.arange(2 * pairs, 3 * pairs)
            else:  # the queries at random positions of the rest, blanks (0) between them
                at = torch.randperm(seq - 2 * pairs, generator=g)[:pairs].sort().values + 2 * pairs
            x[b, at] = keys[order]
            y[b, at] = vals[order]
    elif task == "selective_copy":
        n_tok = max(1, seq // 8)
        blank, marker = 1, 2
        if seq < 2 * n_tok + 1:
            raise ValueError(f"--seq {seq}: selective_copy needs seq >= 3")
        for b in range(batch):
            x[b, : seq - n_tok] = blank
            pos = torch.randperm(seq - n_tok, generator=g)[:n_tok].sort().values
            data = torch.randint(3, vocab, (n_tok,), generator=g)
            x[b, pos] = data
            x[b, seq - n_tok :] = marker
            y[b, seq - n_tok :] = data
    elif task == "lm":
        if vocab < 256:
            raise ValueError(f"--vocab {vocab}: the lm task is byte-level and needs vocab >= 256")
        text = _lm_bytes()
        cut = int(0.9 * text.numel())
        lo, hi = (cut, text.numel() - seq - 1) if held_out else (0, cut - seq - 1)
        if hi <= lo:
            raise ValueError(f"--seq {seq}: longer than the lm text's {'evaluation' if held_out else 'training'} part")
        starts = torch.randint(lo, hi, (batch,), generator=g)
        win = torch.stack([text[s0 : s0 + seq + 1] for s0 in starts.tolist()])
        x, y = win[:, :-1].clone(), win[:, 1:].clone()
    elif task == "listops":
        if seq < 4 or vocab < LISTOPS_VOCAB:
            raise ValueError(f"--seq {seq} / --vocab {vocab}: listops needs seq >= 4 and vocab >= {LISTOPS_VOCAB}")
        for b in range(batch):
            toks, val = listops_expression(seq - 1, g)
            x[b, : seq - 1 - len(toks)] = 1  # blanks
            x[b, seq - 1 - len(toks) : seq - 1] = torch.tensor(toks)
            x[b, seq - 1] = LISTOPS_MARK
            y[b, seq - 1] = LISTOPS_DIGIT0 + val
    else:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    return x, y


#: ListOps tokens: 1 blank, digits 3..12, operators 13..16 ("[MAX" "[MIN" "[MED" "[SM"), 17 "]", 18 the marker
LISTOPS_DIGIT0, LISTOPS_OPS, LISTOPS_CLOSE, LISTOPS_MARK, LISTOPS_VOCAB = 3, ("MAX", "MIN", "MED", "SM"), 17, 18, 19


def listops_value(op: str, args: list[int]) -> int:
    """The value of one ListOps operator on its arguments (digits)."""
    if op == "MAX":
        return max(args)
    if op == "MIN":
        return min(args)
    if op == "MED":  # the median, truncated to an integer (the Long Range Arena generator's int(np.median))
        s = sorted(args)
        m = len(s) // 2
        return s[m] if len(s) % 2 else int((s[m - 1] + s[m]) / 2)
    if op == "SM":
        return sum(args) % 10
    raise ValueError(f"unknown ListOps operator {op!r}")


def listops_expression(limit: int, g: torch.Generator, max_depth: int = 10, max_args: int = 5):
    """A random ListOps expression of at most ``limit`` tokens: ``(tokens, value)``. An operator takes 2 to
    ``max_args`` arguments that share out the tokens left (an argument with fewer than 4 tokens to spend, at depth
    ``max_depth``, or by a 1-in-4 chance below the root, is a digit), so expressions are nested and long."""

    def rand(n):
        return int(torch.randint(n, (1,), generator=g))

    def gen(budget, depth):
        if budget < 4 or depth == max_depth or (depth > 0 and rand(4) == 0):
            d = rand(10)
            return [LISTOPS_DIGIT0 + d], d
        op = rand(len(LISTOPS_OPS))
        n_args = min(2 + rand(max_args - 1), budget - 2)  # room for the operator, the "]" and a digit each
        toks, vals = [LISTOPS_DIGIT0 + 10 + op], []
        for a in range(n_args):
            left = budget - len(toks) - 1 - (n_args - a - 1)  # keep one token per later argument and the "]"
            t, v = gen(max(left // (n_args - a), 1) if a < n_args - 1 else left, depth + 1)
            toks += t
            vals.append(v)
        return toks + [LISTOPS_CLOSE], listops_value(LISTOPS_OPS[op], vals)

    return gen(limit, 0)


class TinyModel(nn.Module):
    """Embedding, ``layers`` x (norm, mixer, residual, norm, MLP, residual), norm, head. ``make_mixer(i, layers)``
    builds layer ``i``'s mixer."""

    def __init__(self, vocab: int, dim: int, layers: int, make_mixer) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList()
        for i in range(layers):
            self.blocks.append(nn.ModuleDict({
                "n1": nn.LayerNorm(dim), "mix": make_mixer(i, layers), "n2": nn.LayerNorm(dim),
                "mlp": nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))}))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x, mask=None):
        h = self.emb(x)
        for blk in self.blocks:
            h = h + blk["mix"](blk["n1"](h), mask)
            h = h + blk["mlp"](blk["n2"](h))
        return self.head(self.norm(h))

    def aux_loss(self):
        """The sum of the mixers' auxiliary losses of the last forward (0 when none has one)."""
        return sum((blk["mix"].aux_loss for blk in self.blocks if torch.is_tensor(getattr(blk["mix"], "aux_loss", None))),
                   0.0)


# constructor arguments a mixer may take to know its depth (TransNormerLLM's decay schedule): the trainer's
DEPTH_ARGS = ("layer_idx", "num_layers")


def mixer_settings(cls) -> dict:
    """A mixer's own settings: ``{name: (type, default)}`` from its constructor (``dim``, ``heads``, ``causal``
    are the trainer's)."""
    import inspect
    import typing

    hints = typing.get_type_hints(cls.__init__)
    return {n: (hints.get(n, str), p.default) for n, p in inspect.signature(cls.__init__).parameters.items()
            if n not in ("self", "dim", "heads", "causal") + DEPTH_ARGS}


def parse_mixer(spec: str):
    """``"titans:chunk=8"`` -> ``(Titans, {"chunk": 8})``; unknown names and arguments refused by name."""
    from . import registry
    from .api import _convert

    name, *kvs = spec.strip().split(":")
    if name not in registry.names("mixer"):
        raise ValueError(f"--mixer must be one of {', '.join(registry.names('mixer'))}, got {name!r}")
    cls = registry.get(name, "mixer").cls
    allowed = mixer_settings(cls)
    kw = {}
    for item in kvs:
        k, sep, v = (x.strip() for x in item.partition("="))
        if not sep or k not in allowed:
            raise ValueError(f"--mixer {name}: unknown argument {item!r}; allowed: {', '.join(allowed) or '(none)'}")
        kw[k] = _convert(v, allowed[k][0], k, name)
    return cls, kw


def _mixer_factory(spec: str, dim: int, heads: int, causal: bool | None):
    cls, kw = parse_mixer(spec)
    name = cls.name
    form = cls.supports_causal[0] if causal is None else causal
    if form not in cls.supports_causal:
        raise ValueError(f"--mixer {name}: {'causal' if form else 'bidirectional'} is not a form of this mixer")
    import inspect

    takes_depth = set(DEPTH_ARGS) <= set(inspect.signature(cls.__init__).parameters)

    def make(i: int, layers: int):
        depth = {"layer_idx": i, "num_layers": layers} if takes_depth else {}
        return cls(dim, heads=heads, causal=form, **kw, **depth)

    return make, form


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train(cfg: TrainConfig, out: str | Path | None = None, progress: bool = True, log=print) -> dict:
    """Train and evaluate; returns the summary (written to ``out`` with the step log and the curves)."""
    from tqdm.auto import tqdm

    from .checks import check_int

    for name in ("seq", "steps", "dim", "layers", "heads", "vocab", "batch", "eval_every", "eval_batches"):
        check_int(getattr(cfg, name), f"--{name.replace('_', '-')}", 1)
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")
    torch.manual_seed(cfg.seed)
    make, causal = _mixer_factory(cfg.mixer, cfg.dim, cfg.heads, cfg.causal)
    model = TinyModel(cfg.vocab, cfg.dim, cfg.layers, make)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(cfg.seed)
    g_eval = torch.Generator().manual_seed(cfg.seed + 10_000)
    if cfg.task == "lm" and not causal:
        raise ValueError("--task lm: a language model needs a causal mixer (a bidirectional one sees the next byte)")
    evals = [make_batch(cfg.task, cfg.batch, cfg.seq, cfg.vocab, g_eval, cfg.pairs, held_out=True)
             for _ in range(cfg.eval_batches)]
    lossf = nn.CrossEntropyLoss(ignore_index=-100)
    steps, best, spent = [], 0.0, 0.0
    outdir = Path(out) if out is not None else None
    logf = (outdir / "steps.jsonl").open("w") if outdir is not None else None
    bar = tqdm(range(1, cfg.steps + 1), desc=f"train {cfg.mixer} {cfg.task} N={cfg.seq}", disable=not progress)
    try:
        for step in bar:
            model.train()
            x, y = make_batch(cfg.task, cfg.batch, cfg.seq, cfg.vocab, g, cfg.pairs)
            t0 = time.perf_counter()
            loss = lossf(model(x).reshape(-1, cfg.vocab), y.reshape(-1))
            aux = model.aux_loss()
            opt.zero_grad()
            (loss + aux).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            spent += time.perf_counter() - t0
            rec = {"step": step, "loss": loss.item()}
            if torch.is_tensor(aux):
                rec["aux"] = aux.item()
            if step % cfg.eval_every == 0 or step == cfg.steps:
                rec["acc"] = evaluate(model, evals)
                best = max(best, rec["acc"])
                bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.3f}")
            steps.append(rec)
            if logf is not None:
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
    finally:
        if logf is not None:
            logf.close()
    summary = {**asdict(cfg), "causal": causal, "final_acc": steps[-1]["acc"], "best_acc": best,
               "final_loss": steps[-1]["loss"], "s_per_step": spent / cfg.steps, "peak_rss_bytes": _peak_rss(),
               "params": sum(p.numel() for p in model.parameters())}
    if cfg.task == "lm":
        summary["ppl_by_position"] = ppl_by_position(model, evals)
    if outdir is not None:
        (outdir / "summary.json").write_text(json.dumps(summary, indent=1))
        curves_png(steps, outdir / "curves.png", f"{cfg.mixer} on {cfg.task}, seq {cfg.seq}")
    return summary


@torch.no_grad()
def evaluate(model, batches) -> float:
    model.eval()
    right = total = 0
    for x, y in batches:
        pred = model(x).argmax(-1)
        ok = y != -100
        right += int((pred[ok] == y[ok]).sum())
        total += int(ok.sum())
    return right / max(total, 1)


@torch.no_grad()
def ppl_by_position(model, batches, buckets: int = 8) -> list[dict]:
    """Evaluation perplexity per position bucket: ``[{"from", "to", "ppl"}]`` (positions 1-based)."""
    model.eval()
    nll = []
    for x, y in batches:
        logits = model(x)
        nll.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), y, reduction="none"))
    return bucket_perplexity(torch.cat(nll).mean(0), buckets)


def bucket_perplexity(nll: torch.Tensor, buckets: int = 8) -> list[dict]:
    """``nll [n]`` per position -> ``[{"from", "to", "ppl"}]``: the perplexity of ``buckets`` equal position ranges
    (1-based, inclusive)."""
    n = nll.numel()
    edges = torch.linspace(0, n, buckets + 1).long().tolist()
    return [{"from": a + 1, "to": b, "ppl": math.exp(float(nll[a:b].mean()))} for a, b in zip(edges[:-1], edges[1:])
            if b > a]


def curves_png(steps: list[dict], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], label="train loss", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ev = [s for s in steps if "acc" in s]
    ax2.plot([s["step"] for s in ev], [s["acc"] for s in ev], "o-", color="C1", label="eval accuracy")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
