"""Expected Attention: keep the pairs that future queries are expected to attend to, weighted by their values.

Paper: "Expected Attention: KV Cache Compression by Estimating Attention from Future Queries Distribution"
(Devoto et al., 2025, https://arxiv.org/abs/2510.00636); kvpress's ``ExpectedAttentionPress``. The queries before
RoPE are modelled as a Gaussian: mean ``mu`` and covariance ``S`` of the observed queries (every prefill query
after the first ``sink``, or the last ``obs_window``), per query head. A future query sits at one of the next
``future`` positions, so its RoPE rotation is averaged over them (``R = mean_t R_t``): ``mu' = R mu``,
``S' = R S R^T``. For a Gaussian query, ``E[exp(s q.k)] = exp(s mu'.k + s^2/2 k^T S' k)``; the softmax of these
logits over the keys is each key's expected attention, averaged over the query heads of its GQA group and
multiplied by ``||v||`` (plus ``epsilon``). The first ``sink`` tokens are always kept.

Decoding (``decode_budget=B``): every ``every`` steps, once a kv head holds more than ``B`` tokens, all its
tokens are re-scored from the statistics of the last ``obs_window`` decode queries (default 64; the prefill's
seed the buffer) at the positions after the current one, and the lowest go down to ``B`` (the ``recent``
newest protected), as kvpress's ``DecodingPress`` does around a scorer.

Departures: the logit scale is the layer's own (Gemma's ``query_pre_attn_scalar``; kvpress uses ``1/sqrt(d)``);
softcapped layers use the expectation of the uncapped logits (the capped one has no closed form); attention
sinks (gpt-oss) take their share of the softmax. The queries are un-rotated from the layer's post-RoPE queries
with the model's own rotary embedding (``hf.Rope``), so any RoPE variant the model uses is followed exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import DecodeState
from ..checks import check_int
from ..registry import register
from .base import KVPolicy, press_changes

__all__ = ["ExpectedAttention", "QueryBuffer"]


@dataclass
class QueryBuffer(DecodeState):
    """The last decode queries before RoPE ``[b, hq, m, d]`` and the next position to rotate to."""

    queries: torch.Tensor
    steps: int = 0


@register("expected_attention", "kv",
          paper="Expected Attention (Devoto et al., 2025) https://arxiv.org/abs/2510.00636",
          summary="expected attention of future queries (Gaussian statistics under averaged RoPE) x ||v||")
@dataclass(frozen=True)
class ExpectedAttention(KVPolicy):
    """Expected attention of future queries, at the end of prefill and (``decode_budget``) while decoding."""

    kvpress_press = "ExpectedAttentionPress"
    examples = ({"sink": 4}, {"obs_window": 16, "future": 64, "covariance": False},
                {"vnorm": False, "epsilon": 0.01})

    sink: int = 4
    future: int = 512
    obs_window: int = 0  # 0: every prefill query after the sinks (kvpress); decoding: 64
    covariance: bool = True
    vnorm: bool = True
    epsilon: float = 0.0
    decode_budget: int = 0
    every: int = 16
    recent: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.sink, "sink", 0)
        check_int(self.future, "future", 1)
        check_int(self.obs_window, "obs_window", 0, hint="0: every prefill query after the sinks")
        check_int(self.decode_budget, "decode_budget", 0, hint="0: no eviction while generating")
        check_int(self.every, "every", 1)
        check_int(self.recent, "recent", 0)
        for name in ("covariance", "vnorm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.epsilon, (int, float)) or self.epsilon < 0:
            raise ValueError(f"epsilon must be a number >= 0, got {self.epsilon!r}")
        if self.decode_budget and self.decode_budget <= self.sink + self.recent:
            raise ValueError(f"decode_budget must exceed sink + recent ({self.sink + self.recent}), got "
                             f"{self.decode_budget}")

    def kvpress_kwargs(self) -> dict | None:
        if self.obs_window or self.decode_budget:
            return None  # kvpress's press uses every query, at the end of prefill only
        return press_changes({"n_future_positions": self.future, "n_sink": self.sink, "use_covariance": self.covariance,
                              "use_vnorm": self.vnorm, "epsilon": self.epsilon},
                             {"n_future_positions": 512, "n_sink": 4, "use_covariance": True, "use_vnorm": True,
                              "epsilon": 0.0})

    @property
    def is_noop(self) -> bool:
        return self.ratio == 0.0 and not self.decode_budget

    @property
    def acts_at_decode(self) -> bool:
        return bool(self.decode_budget)

    # ---- the statistics ------------------------------------------------------------------------------------
    def _prerope(self, q, module, key_valid, n_keys):
        """The queries before RoPE (``q`` un-rotated with the layer's rotary embedding; NoPE: as they are)."""
        from ..hf import query_positions, rope_of

        rope = rope_of(module) if module is not None else None
        if rope is None:
            return q, None, None
        pos = query_positions(module, q.shape[2], n_keys, key_valid, q.device)
        cos, sin = rope.cos_sin(pos, q.float())
        return rope.unrotate(q.float(), cos, sin), rope, pos

    def statistics(self, qpre, rope, next_pos: int, rows: torch.Tensor | None = None):
        """``(mu [b, hq, d], cov [b, hq, d, d] or None)`` of the future queries: the observed pre-RoPE queries'
        mean and covariance (``rows [b, m]``: which queries count), rotated by the RoPE averaged over the
        ``future`` positions from ``next_pos``."""
        qpre = qpre.float()
        b, hq, m, d = qpre.shape
        w = torch.ones(b, m, device=qpre.device) if rows is None else rows.float()
        w = w / w.sum(-1, keepdim=True).clamp(min=1.0)
        mu = torch.einsum("bm,bhmd->bhd", w, qpre)
        cov = None
        if self.covariance:
            c = qpre - mu.unsqueeze(2)
            cov = torch.einsum("bm,bhmi,bhmj->bhij", w, c, c)
        if rope is not None:
            rot = rope.mean_rotation(torch.arange(next_pos, next_pos + self.future, device=qpre.device), d)
            mu = mu @ rot
            if cov is not None:
                cov = rot.T @ cov @ rot
        return mu, cov

    def expected_scores(self, mu, cov, k, v, key_valid, module, protect: int | None = None):
        """``[b, hk, n]``: the softmax over the keys of ``s mu.k + s^2/2 k^T cov k``, averaged over each group,
        times ``||v|| (+ epsilon)``; the first ``sink`` real keys get the maximum + 1."""
        from ..hf import module_logits

        b, hk, n, d = k.shape
        hq = mu.shape[1]
        g = hq // hk
        scale, _, sinks = module_logits(module, d)
        kf = k.float().repeat_interleave(g, dim=1)  # [b, hq, n, d]
        logits = torch.einsum("bhd,bhnd->bhn", mu, kf) * scale
        if cov is not None:
            logits = logits + 0.5 * scale * scale * torch.einsum("bhnd,bhde,bhne->bhn", kf, cov, kf)
        first = torch.zeros(b, 1, dtype=torch.long, device=k.device) if key_valid is None else \
            (~key_valid[:, -n:]).long().sum(-1, keepdim=True)  # the first real key (left padding)
        j = torch.arange(n, device=k.device).view(1, n)
        is_sink = (j >= first) & (j < first + (self.sink if protect is None else protect))  # [b, n]
        out_of_softmax = is_sink if key_valid is None else is_sink | ~key_valid[:, -n:]
        logits = logits.masked_fill(out_of_softmax[:, None, :], float("-inf"))  # sinks are kept, not scored
        if sinks is not None:
            logits = torch.cat([logits, sinks.float().view(1, hq, 1).expand(b, hq, 1)], -1)
            p = logits.softmax(-1)[..., :n]
        else:
            p = logits.softmax(-1)
        sc = torch.nan_to_num(p.view(b, hk, g, n).mean(2))
        if self.vnorm:
            sc = (sc + self.epsilon) * v.float().norm(dim=-1)
        return torch.where(is_sink[:, None, :], sc.amax() + 1.0, sc)

    def score(self, q, k, v, key_valid, module=None) -> torch.Tensor:
        n = k.shape[2]
        qpre, rope, pos = self._prerope(q, module, key_valid, n)
        nq = q.shape[2]
        rows = torch.ones(q.shape[0], nq, dtype=torch.bool, device=q.device)
        if key_valid is not None:
            rows &= key_valid[:, -nq:]
        # the first ``sink`` real queries carry outliers (kvpress drops them); obs_window: only the last ones
        before = rows.long().cumsum(-1)
        rows &= before > self.sink
        if self.obs_window:
            rows &= (rows.long().sum(-1, keepdim=True) - rows.long().cumsum(-1)) < self.obs_window
        next_pos = int(pos.max()) + 1 if pos is not None else n
        mu, cov = self.statistics(qpre, rope, next_pos, rows)
        return self.expected_scores(mu, cov, k, v, key_valid, module)

    # ---- decoding ----------------------------------------------------------------------------------------
    def compress_layer(self, layer, q, k, v, key_valid, module=None, layer_idx: int = 0, num_layers: int = 1) -> None:
        if self.ratio > 0:
            super().compress_layer(layer, q, k, v, key_valid, module, layer_idx, num_layers)
        if not self.decode_budget:
            return
        if layer.prefix is not None:
            raise ValueError("expected_attention decode_budget: rows keep different numbers of tokens (padding); "
                             "use batch 1 or equal lengths")
        if not layer.compressed:  # ratio 0: the layer becomes a uniform compressed layer holding every token
            n = k.shape[2]
            idx = torch.arange(n, device=k.device).expand(*k.shape[:2], -1)
            layer.compress(idx, torch.full(k.shape[:2], n, device=k.device))
        qpre, _, _ = self._prerope(q, module, key_valid, k.shape[2])
        window = self.obs_window or 64
        layer.decode_state["expected_attention"] = QueryBuffer(qpre[:, :, -window:].float().contiguous())

    def decode_attend(self, layer, q, key_valid, scale, features=None, module=None):
        """One decode step (dense over the layer); every ``every`` steps, over budget, re-score and evict."""
        from ..ops.dense import dense_attention

        kv_phys = layer.physical_key_valid(key_valid)
        out = dense_attention(q, layer.keys, layer.values, kv_phys, scale, None,
                              getattr(features, "softcap", None), getattr(features, "sinks", None))
        n_keys = layer.get_seq_length()
        qpre, rope, pos = self._prerope(q, module, None, n_keys)
        buf = layer.decode_state.get("expected_attention")
        window = self.obs_window or 64
        queries = qpre.float() if buf is None else torch.cat([buf.queries, qpre.float()], 2)[:, :, -window:]
        steps = 1 if buf is None else buf.steps + 1
        if steps % self.every == 0 and layer.physical_len > self.decode_budget:
            next_pos = int(pos.max()) + 1 if pos is not None else n_keys
            mu, cov = self.statistics(queries, rope, next_pos)
            layer.scores = self.expected_scores(mu, cov, layer.keys, layer.values, kv_phys, module,
                                                protect=0).float()
            # the sinks (the oldest kept positions) and the recent ones stay
            positions = layer.physical_positions()
            layer.scores = layer.scores.masked_fill(positions < self.sink, float("inf"))
            layer.evict(self.decode_budget, max(self.recent, 1))
            layer.scores = None
        layer.decode_state["expected_attention"] = QueryBuffer(queries.contiguous(), steps)
        return out

    # ---- the slow reference ------------------------------------------------------------------------------
    def reference_scores(self, q, k, v, key_valid=None, module=None):
        """Loop by loop in float64, for a layer without RoPE (the generic tests' inputs; the model tests check
        the rotation): per query head, the mean and covariance of the counted queries (real, after the first
        ``sink`` real ones, the last ``obs_window``), each key's logit ``s mu.k + s^2/2 k^T S k``, their softmax
        over the real keys after the first ``sink`` (with the head's attention sink), the group mean, times
        ``||v||`` (+ epsilon); the ``sink`` first real keys always kept."""
        import math

        from ..hf import module_logits

        b, hq, nq, d = q.shape
        hk, n = k.shape[1], k.shape[2]
        g = hq // hk
        scale, _, sinks = module_logits(module, d)
        out = torch.zeros(b, hk, n, dtype=torch.float64)
        for bi in range(b):
            real_q = [i for i in range(nq) if key_valid is None or bool(key_valid[bi, n - nq + i])][self.sink :]
            if self.obs_window:
                real_q = real_q[-self.obs_window :]
            real_k = [j for j in range(n) if key_valid is None or bool(key_valid[bi, j])][self.sink :]
            sink_k = [j for j in range(n) if key_valid is None or bool(key_valid[bi, j])][: self.sink]
            probs = [[0.0] * n for _ in range(hq)]
            for h in range(hq):
                qs = [[float(x) for x in q[bi, h, i].double()] for i in real_q]
                m = len(qs)
                mu = [sum(r[t] for r in qs) / max(m, 1) for t in range(d)]
                cov = [[sum((r[a] - mu[a]) * (r[c] - mu[c]) for r in qs) / max(m, 1) for c in range(d)]
                       for a in range(d)]
                logit = {}
                for j in real_k:
                    kj = [float(x) for x in k[bi, h // g, j].double()]
                    val = scale * sum(mu[t] * kj[t] for t in range(d))
                    if self.covariance:
                        val += 0.5 * scale * scale * sum(kj[a] * cov[a][c] * kj[c] for a in range(d) for c in range(d))
                    logit[j] = val
                if not logit:
                    continue
                top = max(logit.values())
                z = sum(math.exp(x - top) for x in logit.values())
                if sinks is not None:
                    z += math.exp(float(sinks[h]) - top)
                for j in real_k:
                    probs[h][j] = math.exp(logit[j] - top) / z
            for h in range(hk):
                for j in real_k:
                    sc = sum(probs[hh][j] for hh in range(h * g, (h + 1) * g)) / g
                    if self.vnorm:
                        sc = (sc + self.epsilon) * math.sqrt(sum(float(x) ** 2 for x in v[bi, h, j].double()))
                    out[bi, h, j] = sc
            for t, j in enumerate(sink_k):
                out[bi, :, j] = 1e9 - t  # sinks: always kept
        return out
