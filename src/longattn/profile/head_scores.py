"""Head scores beside the retrieval score: AttentionInfluence, GATEAU's CAM and AMP's projection importance.

All three return ``(per kv head [layer][kv head], per query head [layer][query head])`` on library-made
retrieval samples (passkey: the answer must be copied from far away), written in the one profile format that
``duo_attention``, ``moa_budgets`` and ``lserve_pages`` read (``write_profile``; the query-head values kept
beside). A kv head's score is the mean of its query heads'.

* ``attention_influence`` ("AttentionInfluence: Adopting Attention Head Influence for Weak-to-Strong Pretraining
  Data Selection", Hua et al., 2025, https://arxiv.org/abs/2505.07293): mask one head (its attention output set
  to zero) and measure how much the loss of the gold answer rises; one forward per query head and sample.
* ``cam`` (GATEAU's Contextual Awareness Measurement, "GATEAU: Selecting Influential Samples for Long Context
  Alignment", Si et al., 2024, https://arxiv.org/abs/2410.15633): the context is cut into ``segments``; a
  segment's importance is the rise of the answer's loss when it is removed; a head's CAM is the Spearman
  correlation between the attention its answer queries put on each segment and those importances (a head that
  looks where it matters scores near 1).
* ``amp`` ("AMP: Attention Heads and MLP Pruning", Mugnaini et al., 2025, https://arxiv.org/abs/2504.21174): the
  mean L2 norm, over the tokens, of the head's output projected by its slice of ``o_proj`` (what the head adds to
  the residual stream).

* ``act`` (ACT's head filtering, "Unveiling and Harnessing Hidden Attention Sinks", Yu et al., ICML 2024,
  https://arxiv.org/abs/2406.15765): calibrate one query head alone (``calibrate/act.py``) and measure how much
  the gold answer's loss *drops*; ``act:heads=FILE`` then calibrates the heads with a positive gain. Samples from
  a task where dense is imperfect (``niah`` by default).

Departures: the samples are our passkey task, not the papers' corpora; the influence mask zeroes the head's output
(not its attention weights); CAM's segments are equal token spans of the context.
"""

from __future__ import annotations

import math
import sys

import torch

__all__ = ["attention_influence", "cam_scores", "cam_one", "amp_scores", "act_gains", "spearman"]


def _samples(tokenizer, samples: int, length: int, seed: int, task: str = "passkey"):
    from .. import registry

    task = registry.get(task, "task").cls()
    for i in range(samples):
        yield qa_ids(tokenizer, task.make(tokenizer, length, i, seed))


def qa_ids(tokenizer, sample) -> tuple[list[int], list[int], list[int]]:
    """Token ids of (context, question part, gold answer) of a sample: the first of ``answers``, spaced."""
    from ..bench.prompts import encode

    ctx, rest = encode(tokenizer, sample)
    return ctx, rest, tokenizer(" " + sample.answers[0], add_special_tokens=False)["input_ids"]


def silencer(silenced: dict):
    """An ``override_attention`` function: dense attention with the query heads ``silenced[layer]`` (a list)
    giving zeros; ``silenced`` is read at every call, so the caller may change it between forwards."""
    def attend(layer_idx, q, k, v, key_valid, scale):
        out = _dense(q, k, v, key_valid, scale)
        heads = silenced.get(layer_idx)
        if heads:
            out = out.clone()
            out[:, heads] = 0
        return out

    return attend


def _answer_loss(model, ctx, rest, ans) -> float:
    ids = torch.tensor([ctx + rest + ans], device=model.device)
    logits = model(input_ids=ids, use_cache=False).logits[0, len(ctx) + len(rest) - 1 : -1].float()
    return float(torch.nn.functional.cross_entropy(logits, ids[0, len(ctx) + len(rest) :]))


def _per_kv(per_q: torch.Tensor, hk: int) -> list[list[float]]:
    L, hq = per_q.shape
    return per_q.view(L, hk, hq // hk).mean(-1).tolist()


def _dense(q, k, v, key_valid, scale):
    from ..ops.dense import dense_attention

    return dense_attention(q, k, v, key_valid, scale, None)


def attention_influence(model, tokenizer, samples: int = 2, length: int = 1024, seed: int = 1234,
                        progress: bool = True):
    """Loss rise of the gold answer when each query head's output is zeroed (mean over samples)."""
    from tqdm.auto import tqdm

    from .. import api
    from ..hf import kv_heads

    cfg = model.config
    L, hq, hk = cfg.num_hidden_layers, cfg.num_attention_heads, kv_heads(cfg)
    acc = torch.zeros(L, hq, dtype=torch.float64)
    data = list(_samples(tokenizer, samples, length, seed))
    bar = tqdm(total=len(data) * L * hq, desc="attention_influence", disable=not progress, file=sys.stderr)
    silenced: dict = {}

    with torch.no_grad(), api.apply(model, "dense") as s, s.override_attention(silencer(silenced)):
        for ctx, rest, ans in data:
            silenced.clear()
            base = _answer_loss(model, ctx, rest, ans)
            for li in range(L):
                for h in range(hq):
                    silenced.clear()
                    silenced[li] = [h]
                    acc[li, h] += _answer_loss(model, ctx, rest, ans) - base
                    bar.update()
    bar.close()
    per_q = acc / len(data)
    return _per_kv(per_q, hk), per_q.tolist()


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); 0 when either side is constant."""
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for t in range(i, j + 1):
                r[order[t]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return 0.0 if va == 0 or vb == 0 else cov / (va * vb)


def _modules(model) -> dict:
    return {m.layer_idx: m for m in model.modules() if getattr(m, "layer_idx", None) is not None
            and hasattr(m, "scaling")}


def cam_one(model, ctx, rest, ans, segments: int = 8, mods: dict | None = None) -> torch.Tensor:
    """GATEAU's CAM of one sample, ``[layer, query head]``: the Spearman correlation between the attention the
    answer's queries put on each of ``segments`` equal context spans and the spans' importance (the answer's loss
    rise when the span is removed)."""
    from .. import api
    from ..hf import module_logits

    cfg = model.config
    L, hq = cfg.num_hidden_layers, cfg.num_attention_heads
    mods = _modules(model) if mods is None else mods
    bounds = [round(i * len(ctx) / segments) for i in range(segments + 1)]
    with torch.no_grad():
        base = _answer_loss(model, ctx, rest, ans)
        importance = [_answer_loss(model, ctx[: bounds[i]] + ctx[bounds[i + 1] :], rest, ans) - base
                      for i in range(segments)]
    a0 = len(ctx) + len(rest) - 1
    q_at = list(range(a0, a0 + len(ans)))
    mass = {}

    def observe(layer_idx, q, k, v, key_valid):
        d = q.shape[-1]
        g = q.shape[1] // k.shape[1]
        scale, _, _ = module_logits(mods.get(layer_idx), d)
        qq = q[0, :, q_at].float()
        sc = (qq @ k[0].float().repeat_interleave(g, 0).transpose(-1, -2)) * scale
        n = k.shape[2]
        causal = torch.arange(n)[None, :] <= torch.tensor(q_at)[:, None]
        p = sc.masked_fill(~causal, float("-inf")).softmax(-1).mean(1)  # [hq, n]
        mass[layer_idx] = torch.stack([p[:, bounds[i] : bounds[i + 1]].sum(-1) for i in range(len(bounds) - 1)], -1)

    with torch.no_grad(), api.apply(model, "dense") as s, s.observe(observe):
        model(input_ids=torch.tensor([ctx + rest + ans], device=model.device), use_cache=False)
    out = torch.zeros(L, hq, dtype=torch.float64)
    for li in mass:
        for h in range(hq):
            out[li, h] = spearman(mass[li][h].tolist(), importance)
    return out


def cam_scores(model, tokenizer, samples: int = 2, length: int = 1024, segments: int = 8, seed: int = 1234,
               progress: bool = True):
    """Spearman correlation between each head's attention on the context segments (from the answer's queries)
    and the segments' importance (the answer's loss rise without them), mean over samples."""
    from tqdm.auto import tqdm

    from ..hf import kv_heads

    cfg = model.config
    L, hq, hk = cfg.num_hidden_layers, cfg.num_attention_heads, kv_heads(cfg)
    mods = _modules(model)
    acc = torch.zeros(L, hq, dtype=torch.float64)
    data = list(_samples(tokenizer, samples, length, seed))
    for ctx, rest, ans in tqdm(data, desc="cam", disable=not progress, file=sys.stderr):
        acc += cam_one(model, ctx, rest, ans, segments, mods)
    per_q = acc / len(data)
    return _per_kv(per_q, hk), per_q.tolist()


def amp_scores(model, tokenizer, samples: int = 2, length: int = 1024, seed: int = 1234, progress: bool = True):
    """Mean over tokens of ``|| o_h W_O^h ||_2`` per query head (mean over samples)."""
    from tqdm.auto import tqdm

    from .. import api
    from ..hf import kv_heads
    from ..kv.critical import output_weight

    cfg = model.config
    L, hq, hk = cfg.num_hidden_layers, cfg.num_attention_heads, kv_heads(cfg)
    wo = {m.layer_idx: output_weight(m) for m in model.modules() if getattr(m, "layer_idx", None) is not None
          and hasattr(m, "scaling")}
    acc = torch.zeros(L, hq, dtype=torch.float64)
    data = list(_samples(tokenizer, samples, length, seed))

    def measure(layer_idx, q, k, v, key_valid, scale):
        out = _dense(q, k, v, key_valid, scale)  # [b, hq, n, d]
        d = out.shape[-1]
        w = wo[layer_idx].float().view(-1, hq, d)  # [hidden, hq, d]
        proj = torch.einsum("bhnd,ohd->bhno", out.float(), w)  # [b, hq, n, hidden]
        acc[layer_idx] += proj.norm(dim=-1).mean((0, 2)).double()
        return out

    with torch.no_grad(), api.apply(model, "dense") as s, s.override_attention(measure):
        for ctx, rest, ans in tqdm(data, desc="amp", disable=not progress, file=sys.stderr):
            model(input_ids=torch.tensor([ctx + rest + ans], device=model.device), use_cache=False)
    per_q = acc / len(data)
    return _per_kv(per_q, hk), per_q.tolist()


def act_gains(model, tokenizer, samples: int = 2, length: int = 1024, seed: int = 1234, task: str = "niah",
              alpha: float = 5.0, beta: float = 0.4, progress: bool = True):
    """Drop of the gold answer's loss when ACT calibrates each query head alone (mean over samples): ACT's head
    filtering. One forward per query head and sample."""
    from tqdm.auto import tqdm

    from .. import api
    from ..calibrate.act import ACT
    from ..hf import kv_heads

    cfg = model.config
    L, hq, hk = cfg.num_hidden_layers, cfg.num_attention_heads, kv_heads(cfg)
    acc = torch.zeros(L, hq, dtype=torch.float64)
    data = list(_samples(tokenizer, samples, length, seed, task))
    bar = tqdm(total=len(data) * L * hq, desc="act head filtering", disable=not progress, file=sys.stderr)
    act = ACT(alpha=alpha, beta=beta)
    off = [[False] * hq for _ in range(L)]
    with torch.no_grad():
        for ctx, rest, ans in data:
            base = _answer_loss(model, ctx, rest, ans)
            with api.apply(model, act):
                for li in range(L):
                    for h in range(hq):
                        mask = [row[:] for row in off]
                        mask[li][h] = True
                        object.__setattr__(act, "_mask", mask)  # this head alone
                        acc[li, h] += base - _answer_loss(model, ctx, rest, ans)
                        bar.update()
    bar.close()
    per_q = acc / len(data)
    return per_q.view(L, hk, hq // hk).amax(-1).tolist(), per_q.tolist()
