"""Head profiles: which kv heads retrieve from far away (DuoAttention retrieval heads, Retrieval Head).

``retrieval_scores``: training-free. On synthetic passkey samples made by the library, the model reads the
context, the question and the gold answer in one dense forward; for every query that predicts a digit of the
pass key, the score of a kv head is the attention mass its query heads put on the pass key's tokens in the
context (the copy source), averaged over samples. Reference: "Retrieval Head Mechanistically Explains
Long-Context Factuality" (Wu et al., 2024, https://arxiv.org/abs/2404.15574) scores copy-paste attention the
same way; DuoAttention (https://arxiv.org/abs/2410.10819) uses it as its training-free baseline.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from ..hf import kv_heads

__all__ = ["retrieval_scores", "write_profile"]


def _find(seq: list[int], sub: list[int]) -> list[int]:
    """Start indices of ``sub`` in ``seq``."""
    m = len(sub)
    return [i for i in range(len(seq) - m + 1) if seq[i : i + m] == sub]


def retrieval_scores(model, tokenizer, samples: int = 8, length: int = 1024, seed: int = 1234,
                     progress: bool = True) -> list[list[float]]:
    """``[layer][kv head]`` mean attention mass on the copied needle tokens."""
    from tqdm.auto import tqdm

    from .. import api
    from ..bench.prompts import encode
    from ..bench.tasks.passkey import Passkey

    cfg = model.config
    L, H = cfg.num_hidden_layers, kv_heads(cfg)
    acc = torch.zeros(L, H, dtype=torch.float64)
    count = 0
    task = Passkey()
    for i in tqdm(range(samples), desc="profile heads", disable=not progress, file=sys.stderr):
        s = task.make(tokenizer, length, i, seed)
        ctx, rest = encode(tokenizer, s)
        ans = tokenizer(" " + s.answers[0], add_special_tokens=False)["input_ids"]
        ids = ctx + rest + ans
        # where the answer's tokens sit in the context (the copy source)
        digits = tokenizer(s.answers[0], add_special_tokens=False)["input_ids"]
        starts = _find(ctx, digits)
        if not starts:
            continue
        src = sorted({p for st in starts for p in range(st, st + len(digits))})
        # queries predicting the answer tokens: the positions just before each of them
        q_at = list(range(len(ctx) + len(rest) - 1, len(ids) - 1))

        def observe(layer_idx, q, k, v, key_valid, src=src, q_at=q_at):
            b, hq, nq, d = q.shape
            g = hq // k.shape[1]
            qq = q[0, :, q_at].float()  # [hq, a, d]
            sc = (qq @ k[0].float().repeat_interleave(g, 0).transpose(-1, -2)) / math.sqrt(d)  # [hq, a, n]
            n = k.shape[2]
            causal = torch.arange(n)[None, :] <= torch.tensor(q_at)[:, None] + (n - nq)
            p = sc.masked_fill(~causal, float("-inf")).softmax(-1)
            mass = p[:, :, src].sum(-1).mean(-1)  # [hq]
            acc[layer_idx] += mass.view(-1, g).mean(-1).double()

        with torch.no_grad(), api.apply(model, "dense") as session, session.observe(observe):
            model(input_ids=torch.tensor([ids], device=model.device), use_cache=False)
        count += 1
    if count == 0:
        raise ValueError("profile: the pass key was never found as tokens in the context; use another tokenizer")
    return (acc / count).tolist()


def write_profile(path: str | Path, scores: list[list[float]], method: str, model: str,
                  query_head_scores: list[list[float]] | None = None) -> None:
    """The profile JSON every head-budget method reads: ``scores [layer][kv head]`` (higher = more important),
    and, where the method has them, the per-query-head values (``query_head_scores``)."""
    d = {"model": model, "method": method, "num_layers": len(scores), "num_kv_heads": len(scores[0]),
         "scores": [[round(x, 6) for x in row] for row in scores]}
    if query_head_scores is not None:
        d["query_head_scores"] = [[round(x, 6) for x in row] for row in query_head_scores]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(d, indent=1))
