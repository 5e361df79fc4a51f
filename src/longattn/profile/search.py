"""Per-head prefill pattern search (MInference's offline kernel-aware search; MoA's profiling and budget fit).

For every layer and query head, each candidate pattern is evaluated on real q/k captured from the model on
library-made calibration prompts (stdlib-source haystack with a needle and a question): its recall (dense
softmax mass kept, ``attention_recall``) and its exact density (fraction of causal pairs it computes). The
assignment maximises the total recall subject to the *mean* density over all heads being at most ``density``
(a multiple-choice knapsack, solved by a Lagrangian sweep: each head takes argmax(recall - lambda * density),
lambda bisected until the budget holds). The best single uniform candidate under the same budget is reported
beside it.

References: MInference 1.0 (https://arxiv.org/abs/2407.02490) searches per head among its three pattern kinds
and budgets by recall; MoA (https://arxiv.org/abs/2406.14909) fits heterogeneous per-head spans to a density
budget. Departure: both search on longer calibration data with a GPU; the default here is 2 prompts of 4096
tokens on a CPU.
"""

from __future__ import annotations

import sys

import torch

from ..recall import attention_recall, sample_rows

__all__ = ["CANDIDATES", "search_patterns", "fit_budget"]

CANDIDATES = tuple(
    [f"sink_window:sink=64:window={w}" for w in (128, 256, 512, 1024, 2048)]
    + [f"vertical_slash:vertical={v}:slash={s}" for v, s in
       ((64, 64), (128, 128), (256, 256), (512, 512), (1024, 1024), (128, 1024), (1024, 128))]
    + [f"block_topk:topk={k}" for k in (4, 8, 16, 32)]
)


def fit_budget(recall: torch.Tensor, density: torch.Tensor, target: float) -> torch.Tensor:
    """``recall, density [heads, candidates]`` -> chosen candidate per head (long ``[heads]``) maximising the
    summed recall with mean density <= ``target`` (Lagrangian; falls back to the sparsest choice per head)."""
    def pick(lam: float) -> torch.Tensor:
        return (recall - lam * density).argmax(-1)

    def mean_density(choice: torch.Tensor) -> float:
        return float(density.gather(-1, choice[:, None]).mean())

    if mean_density(pick(0.0)) <= target:
        return pick(0.0)
    lo, hi = 0.0, 1.0
    while mean_density(pick(hi)) > target and hi < 1e6:
        hi *= 2
    if mean_density(pick(hi)) > target:
        return density.argmin(-1)
    for _ in range(60):
        mid = (lo + hi) / 2
        if mean_density(pick(mid)) <= target:
            hi = mid
        else:
            lo = mid
    return pick(hi)


def search_patterns(model, tokenizer, *, length: int = 4096, samples: int = 2, density: float = 0.3,
                    candidates=CANDIDATES, block_size: int = 64, rows: int = 256, progress: bool = True) -> dict:
    """Search the per-head assignment; returns ``{"layers": [[spec per head] per layer], "chosen": {...},
    "uniform": {...}}`` with mean recall and density of the chosen assignment and of the best uniform pattern."""
    from dataclasses import replace

    from tqdm.auto import tqdm

    from ..api import parse_method
    from .capture import calibration_ids, capture_qkv

    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if samples < 1 or length < 256:
        raise ValueError(f"samples must be >= 1 and length >= 256, got {samples}, {length}")
    pats = []
    for c in candidates:
        p = parse_method(c, "prefill")
        pats.append(replace(p, block_size=block_size) if "block_size=" not in c else p)
    L = model.config.num_hidden_layers
    H = model.config.num_attention_heads
    C = len(pats)
    rec = torch.zeros(L, H, C, dtype=torch.float64)
    den = torch.zeros(L, H, C, dtype=torch.float64)
    bar = tqdm(total=samples * L, desc="profile search", disable=not progress, file=sys.stderr)
    for s in range(samples):
        ids = calibration_ids(tokenizer, length, seed=s, index=s)
        got = capture_qkv(model, ids, range(L))
        r = sample_rows(len(ids), rows)
        for layer in range(L):
            q, k, _ = got.pop(layer)
            for c, p in enumerate(pats):
                lay = p.layout(q, k)
                rec[layer, :, c] += attention_recall(lay, q, k, rows=r)[0].double()
                d = torch.as_tensor(lay.density(exact=True, per_head=True, rows=r))
                den[layer, :, c] += d.reshape(d.shape[0], -1)[0].expand(H).double()
            bar.update(1)
    bar.close()
    rec /= samples
    den /= samples
    choice = fit_budget(rec.view(L * H, C), den.view(L * H, C), density).view(L, H)
    chosen_rec = rec.gather(-1, choice[..., None])[..., 0]
    chosen_den = den.gather(-1, choice[..., None])[..., 0]
    uni_rec, uni_den = rec.mean((0, 1)), den.mean((0, 1))
    ok = uni_den <= density
    best = int(torch.where(ok, uni_rec, torch.full_like(uni_rec, -1.0)).argmax()) if bool(ok.any()) \
        else int(uni_den.argmin())
    return {
        "layers": [[candidates[int(c)] for c in row] for row in choice],
        "chosen": {"recall": float(chosen_rec.mean()), "density": float(chosen_den.mean())},
        "uniform": {"pattern": candidates[best], "recall": float(uni_rec[best]), "density": float(uni_den[best])},
        "candidates": {c: {"recall": float(uni_rec[i]), "density": float(uni_den[i])}
                       for i, c in enumerate(candidates)},
        "length": length, "samples": samples, "target_density": density,
    }
