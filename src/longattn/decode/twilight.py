"""Twilight: top-p pruning of any selector's candidates, so the budget adapts per head and step.

Paper: "Twilight: Adaptive Attention Sparsity with Hierarchical Top-p Pruning" (Lin et al., 2025,
https://arxiv.org/abs/2502.02770). Select, then prune: an inner selector (``inner``, its settings after ``/``)
proposes candidate tokens with a generous budget; their attention is estimated from a low-precision copy of the
keys (per-token symmetric ``bits``-bit quantization, the paper's INT4; ``bits=0`` uses the exact keys), softmaxed
over the candidates per query head; each query head keeps the fewest candidates whose estimated mass reaches
``top_p`` (at least one), and attends exactly to those. A head whose attention is peaked keeps few tokens, a flat
one many.

Departures: the quantized key copy lives in the layer's decode state (int8 storage holding ``bits``-bit values
and one float scale per token and head, in buffers with room to grow; it is counted in the cache's bytes, made at
the end of prefill and updated for appended tokens only); the softcap, when the layer has one, is applied to the estimate too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache.state import DecodeState
from ..checks import check_float, check_int
from ..registry import register
from .base import DecodeSelector, Step

__all__ = ["Twilight", "QuantizedKeys", "quantize_keys"]


@dataclass
class QuantizedKeys(DecodeState):
    """int8 ``codes [b, hk, cap, d]`` and float32 ``scale [b, hk, cap, 1]`` of the layer's first ``n`` keys, in
    buffers with room for ``cap >= n`` (a decode step writes its token's codes in place: no copy of the rest)."""

    codes: torch.Tensor
    scale: torch.Tensor
    n: int = 0

    def extend(self, k: torch.Tensor, bits: int) -> None:
        """Quantize and append ``k [b, hk, t, d]`` (the buffers grow by a quarter when full)."""
        t = k.shape[2]
        if self.n + t > self.codes.shape[2]:
            cap = max(self.n + t, self.codes.shape[2] + max(16, self.codes.shape[2] // 4))
            codes = self.codes.new_zeros(*self.codes.shape[:2], cap, self.codes.shape[3])
            scale = self.scale.new_zeros(*self.scale.shape[:2], cap, 1)
            codes[:, :, : self.n], scale[:, :, : self.n] = self.codes[:, :, : self.n], self.scale[:, :, : self.n]
            self.codes, self.scale = codes, scale
        c, sc = quantize_keys(k, bits)
        self.codes[:, :, self.n : self.n + t], self.scale[:, :, self.n : self.n + t] = c, sc
        self.n += t


def quantize_keys(k: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric quantization: ``scale = max|k| / (2^(bits-1) - 1)``, codes ``round(k / scale)``."""
    qmax = 2 ** (bits - 1) - 1
    scale = k.float().abs().amax(-1, keepdim=True).clamp_min(1e-8) / qmax
    codes = torch.round(k.float() / scale).clamp(-qmax - 1, qmax).to(torch.int8)
    return codes, scale


def inner_selector(spec: str) -> DecodeSelector:
    from ..api import parse_method

    if not isinstance(spec, str) or not spec:
        raise ValueError(f"inner must be a decode selector like 'quest' or 'quest/budget=256', got {spec!r}")
    sel = parse_method(":".join(spec.split("/")), "decode")
    if isinstance(sel, Twilight):
        raise ValueError(f"inner={spec!r}: twilight cannot wrap itself")
    return sel


@register("twilight", "decode", paper="Twilight (Lin et al., 2025) https://arxiv.org/abs/2502.02770",
          summary="top-p over the estimated attention of any selector's candidates (adaptive budget per head)")
@dataclass(frozen=True)
class Twilight(DecodeSelector):
    """Top-p pruning of an inner selector's candidates."""

    examples = ({"inner": "quest/budget=96/page=16", "top_p": 0.8},
                {"inner": "token_select/budget=64/sink=4/recent=8", "top_p": 0.5, "bits": 0})
    full_example = {"inner": "quest/budget=4096/page=16", "top_p": 1.0}

    inner: str = "quest/budget=2048"
    top_p: float = 0.95
    bits: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float(self.top_p, "top_p", 0.0, 1.0)
        check_int(self.bits, "bits", 0, 8)
        if self.bits == 1:
            raise ValueError("bits must be 0 (exact keys) or 2..8, got 1")
        object.__setattr__(self, "_inner", inner_selector(self.inner))

    @property
    def needs_full_cache(self) -> bool:  # type: ignore[override]
        return self._inner.needs_full_cache

    def prepare(self, model) -> None:
        super().prepare(model)
        self._inner.prepare(model)

    def on_prefill(self, layer, layer_idx, q, k, key_valid) -> None:
        self._inner.on_prefill(layer, layer_idx, q, k, key_valid)
        if self.bits and self.top_p < 1.0:
            self._quantized(layer.decode_state, k)  # at the end of prefill (its cost is the prefill's)

    def _quantized(self, states: dict, k: torch.Tensor) -> QuantizedKeys:
        """The layer's quantized key copy, brought up to its ``n`` keys (rebuilt when tokens were removed)."""
        st = states.get("twilight")
        n = k.shape[2]
        if st is None or st.n > n or st.codes.shape[0] != k.shape[0]:
            b, hk, _, d = k.shape
            st = QuantizedKeys(torch.zeros(b, hk, 0, d, dtype=torch.int8, device=k.device),
                               torch.zeros(b, hk, 0, 1, device=k.device))
        if st.n < n:
            st.extend(k[:, :, st.n :], self.bits)
        states["twilight"] = st
        return st

    def estimate_keys(self, step: Step, idx: torch.Tensor) -> torch.Tensor:
        """The candidates' keys ``[b, hq, m, d]`` the estimate reads (``idx [b, hq, m]``): exact, or dequantized
        from the layer's quantized copy (extended by the new tokens; only the candidates are dequantized)."""
        from ..ops.decode import gather_rows

        b, hq, m = idx.shape
        hk, n = step.k.shape[1], step.n
        kvh = torch.arange(hq, device=idx.device) // (hq // hk)
        if not self.bits:
            return gather_rows(step.k, idx, kvh).float()
        st = self._quantized(step.state, step.k)
        return gather_rows(st.codes[:, :, :n], idx, kvh).float() * gather_rows(st.scale[:, :, :n], idx, kvh)

    def select(self, step: Step):
        from ..ops.core import capped

        idx, valid = self._inner.select(step)
        b, hq, _, d = step.q.shape
        hk = step.k.shape[1]
        if idx.shape[1] == hk and hq != hk:  # one candidate set per query head
            idx = idx.repeat_interleave(hq // hk, 1)
            valid = None if valid is None else valid.repeat_interleave(hq // hk, 1)
        ok = torch.ones_like(idx, dtype=torch.bool) if valid is None else valid.clone()
        if step.key_valid is not None:
            ok &= torch.gather(step.key_valid.bool()[:, None, :].expand(b, hq, -1), 2, idx)
        if self.top_p >= 1.0:
            return idx, ok
        cand = self.estimate_keys(step, idx)  # [b, hq, m, d]
        logits = capped(torch.einsum("bhd,bhmd->bhm", step.q[:, :, 0].float(), cand) * step.scale, step.softcap)
        p = logits.masked_fill(~ok, float("-inf")).softmax(-1).nan_to_num(0.0)
        ps, order = p.sort(-1, descending=True)
        keep_sorted = (ps.cumsum(-1) - ps) < self.top_p  # the mass before each candidate is short of top_p
        keep_sorted[..., 0] = True
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted) & ok
        return idx, keep

    def reference_select(self, step: Step, prefill_q=None) -> dict:
        """Loop by loop: the inner selector's reference candidates, per query head (a kv head's set for each of
        its query heads); the keys quantized token by token (``round(x / (max|x| / (2^(bits-1)-1)))``); the
        softmax of the estimated logits over the real candidates; the best candidates while the mass before
        them is below ``top_p`` (at least one)."""
        import math

        cand = self._inner.reference_select(step, prefill_q)
        b, hq = step.q.shape[:2]
        hk, d = step.k.shape[1], step.q.shape[-1]
        g = hq // hk
        per_q = any(h >= hk for _, h in cand) or hq == hk
        qmax = 2 ** (self.bits - 1) - 1 if self.bits else None
        out = {}
        for bi in range(b):
            for h in range(hq):
                c = cand[bi, h] if per_q else cand[bi, h // g]
                c = [j for j in c if step.key_valid is None or bool(step.key_valid[bi, j])]
                if self.top_p >= 1.0:
                    out[bi, h] = set(c)
                    continue
                logits = {}
                for j in c:
                    kj = [float(x) for x in step.k[bi, h // g, j]]
                    if qmax:
                        s = max(abs(x) for x in kj) / qmax
                        s = max(s, 1e-8 / qmax)
                        kj = [max(-qmax - 1, min(qmax, round(x / s))) * s for x in kj]
                    val = sum(float(step.q[bi, h, 0, t]) * kj[t] for t in range(d)) * step.scale
                    if step.softcap is not None:
                        val = step.softcap * math.tanh(val / step.softcap)
                    logits[j] = val
                top = max(logits.values())
                z = sum(math.exp(x - top) for x in logits.values())
                acc, kept = 0.0, set()
                for j in sorted(logits, key=lambda j: -logits[j]):
                    if acc < self.top_p or not kept:
                        kept.add(j)
                    acc += math.exp(logits[j] - top) / z
                out[bi, h] = kept
        return out
