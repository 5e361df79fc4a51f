"""``longattn profile data``: rank the samples of a JSONL file by how much they depend on far context.

The two papers use their head scores to select training data:

* ``attention_influence`` (AttentionInfluence, Hua et al., 2025, https://arxiv.org/abs/2505.07293): find the
  important heads on a retrieval proxy (a head profile: ``query_head_scores`` or per-kv-head ``scores`` from
  ``profile heads``), mask the ``top`` fraction of query heads (their attention output set to zero) and score each
  sample by the relative rise of its gold answer's loss, ``(masked - base) / base``: a sample that needs those
  heads to be answered ranks high.
* ``cam`` (GATEAU's Contextual Awareness Measurement, Si et al., 2024, https://arxiv.org/abs/2410.15633): the
  difficulty of understanding the long input, ``(1 - CAM) / 2`` with CAM the mean over heads of the Spearman
  correlation between the attention the answer's queries put on each context segment and the segment's
  importance (``head_scores.cam_one``): a sample whose attention misses the segments that matter ranks high.

Departures: the loss is the gold answer's (the first of ``answers``), not every token's (AttentionInfluence ranks
pretraining text); GATEAU's other half (HMG, two homologous models with different context windows) needs a second
model and is not computed. Samples are the bench's ``custom`` JSONL (``context``, ``question``, ``answers``).
"""

from __future__ import annotations

import sys

import torch

__all__ = ["rank_data", "METHODS", "masked_heads"]

METHODS = ("attention_influence", "cam")


def masked_heads(profile: str, num_layers: int, num_heads: int, num_kv_heads: int, top: float
                 ) -> list[tuple[int, int]]:
    """The ``top`` fraction (at least one) of query heads with the highest score in a head profile
    (``query_head_scores`` where present, else each kv head's score given to its query heads)."""
    from ..profiles import load_profile

    p = load_profile(profile)  # validated (a file or a built-in name)
    p.check(num_layers, num_kv_heads, "--profile")
    g = num_heads // num_kv_heads
    per_q = [[p.scores[li][h // g] for h in range(num_heads)] for li in range(num_layers)]
    if p.query_scores is not None and all(len(r) == num_heads for r in p.query_scores):
        per_q = [list(r) for r in p.query_scores]
    order = sorted(((per_q[li][h], li, h) for li in range(num_layers) for h in range(num_heads)), reverse=True)
    n = max(1, round(top * num_layers * num_heads))
    return sorted((li, h) for _, li, h in order[:n])


def rank_data(model, tokenizer, samples, method: str, *, profile: str | None = None, top: float = 0.05,
              segments: int = 8, progress: bool = True) -> dict:
    """``{"method", "heads" (masked, attention_influence), "ranking": [{rank, index, id, score, ...}]}``, the
    ranking by score, highest (most dependent on far context) first."""
    from tqdm.auto import tqdm

    from .. import api
    from ..hf import kv_heads
    from .head_scores import _answer_loss, _modules, cam_one, qa_ids, silencer

    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)} for profile data, got {method!r}")
    cfg = model.config
    L, hq, hk = cfg.num_hidden_layers, cfg.num_attention_heads, kv_heads(cfg)
    heads: list[tuple[int, int]] = []
    if method == "attention_influence":
        if profile is None:
            raise ValueError("--profile: attention_influence needs the important heads: a head profile from "
                             "`longattn profile heads --method attention_influence` (or retrieval), or a built-in name")
        if not 0 < top <= 1:
            raise ValueError(f"--top must be in (0, 1], got {top}")
        heads = masked_heads(profile, L, hq, hk, top)
    elif segments < 2:
        raise ValueError(f"--segments must be >= 2, got {segments}")
    by_layer: dict[int, list[int]] = {}
    for li, h in heads:
        by_layer.setdefault(li, []).append(h)
    masked = silencer(by_layer)

    mods = _modules(model)
    rows = []
    for i, s in enumerate(tqdm(samples, desc=f"profile data ({method})", disable=not progress, file=sys.stderr)):
        ctx, rest, ans = qa_ids(tokenizer, s)
        with torch.no_grad():
            base = _answer_loss(model, ctx, rest, ans)
        row = {"index": i, "id": s.id, "n_tokens": len(ctx) + len(rest), "base_loss": base}
        if method == "attention_influence":
            with torch.no_grad(), api.apply(model, "dense") as sess, sess.override_attention(masked):
                m = _answer_loss(model, ctx, rest, ans)
            row.update(masked_loss=m, score=(m - base) / max(base, 1e-6))
        else:
            cam = float(cam_one(model, ctx, rest, ans, segments, mods).mean())
            row.update(cam=cam, score=(1 - cam) / 2)
        rows.append(row)
    rows.sort(key=lambda r: -r["score"])
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    return {"method": method, "heads": [list(x) for x in heads], "ranking": rows}
