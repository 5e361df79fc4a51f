"""SnapKV: keep the keys that the last queries of the prompt (the observation window) attend to.

Paper: "SnapKV: LLM Knows What You are Looking for Before Generation" (Li et al., NeurIPS 2024,
https://arxiv.org/abs/2404.14469). Score of key j = mean over the last ``obs_window`` queries (and over the query
heads of its GQA group) of softmax attention, smoothed by a 1-D average pool of ``kernel`` tokens; the window
tokens themselves are always kept (the most recent first when the window exceeds the budget). Departures: the budget is ``int(n * (1 - ratio))`` including the window
(as kvpress's ``SnapKVPress``); GQA groups share one selection per kv head (mean over the group), so the cache
stays unrepeated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import check_int, check_odd
from ..hf import module_logits
from ..ops.core import capped
from ..registry import register
from .base import KVPolicy, press_changes, slow_probs

__all__ = ["SnapKV"]


@register(
    "snapkv",
    "kv",
    paper="SnapKV (Li et al., NeurIPS 2024) https://arxiv.org/abs/2404.14469",
    summary="observation window of last queries, pooled attention scores per kv head",
)
@dataclass(frozen=True)
class SnapKV(KVPolicy):
    """Observation-window attention scores, pooled."""

    renamed = {"window": "obs_window"}  # old spellings, accepted with a FutureWarning

    kvpress_press = "SnapKVPress"
    examples = ({"obs_window": 8},)

    obs_window: int = 64
    kernel: int = 5

    def kvpress_kwargs(self) -> dict | None:
        return press_changes({"window_size": self.obs_window, "kernel_size": self.kernel},
                             {"window_size": 64, "kernel_size": 5})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.obs_window, "obs_window")
        check_odd(self.kernel, "kernel")

    def reference_scores(self, q, k, v, key_valid=None, module=None):
        """Loop by loop: the mean over the last ``obs_window`` queries and the kv head's query heads of their
        softmax attention to key j, averaged over the real keys within ``kernel // 2`` of j; the window's own
        tokens always kept, most recent first."""
        b, hq, nq, _ = q.shape
        hk, n = k.shape[1], k.shape[2]
        g = hq // hk
        w = min(self.obs_window, nq, n)
        r = self.kernel // 2
        out = torch.zeros(b, hk, n, dtype=torch.float64)
        for bi in range(b):
            ok = [key_valid is None or bool(key_valid[bi, j]) for j in range(n)]
            for h in range(hk):
                raw = [0.0] * n
                for hh in range(h * g, (h + 1) * g):
                    for i in range(nq - w, nq):
                        for j, p in slow_probs(q, k, key_valid, bi, hh, i, module).items():
                            raw[j] += p / (w * g)
                for j in range(n):
                    near = [t for t in range(max(0, j - r), min(n, j + r + 1)) if ok[t]]
                    out[bi, h, j] = sum(raw[t] for t in near) / len(near) if near else 0.0
                for t, j in enumerate(range(n - w, n)):
                    out[bi, h, j] = 1e9 + t  # the window: always kept, most recent first
        return out

    def score(self, q, k, v, key_valid, module=None) -> torch.Tensor:
        b, hq, nq, d = q.shape
        hk, n = k.shape[1], k.shape[2]
        g = hq // hk
        w = min(self.obs_window, nq, n)
        qw = q[:, :, -w:].float().view(b, hk, g, w, d)
        scale, softcap, sinks = module_logits(module, d)
        s = capped(torch.matmul(qw, k.float().unsqueeze(2).transpose(-1, -2)) * scale, softcap)  # [b, hk, g, w, n]
        qpos = torch.arange(n - w, n, device=k.device)
        allowed = torch.arange(n, device=k.device)[None, :] <= qpos[:, None]
        if key_valid is not None:
            allowed = allowed & key_valid.to(torch.bool)[:, None, None, None, :]
        s = s.masked_fill(~allowed, float("-inf"))
        if sinks is not None:  # the layer's sink takes its share of each window query's attention
            sink = sinks.float().view(1, hk, g, 1, 1).expand(b, hk, g, w, 1)
            s = torch.cat([s, sink], -1).softmax(-1)[..., :n].nan_to_num(0.0)
        else:
            s = s.softmax(-1).nan_to_num(0.0)
        sc = s.mean(dim=(2, 3))  # [b, hk, n]
        if self.kernel > 1:
            # average over the real neighbours only (left padding and the sequence ends are not neighbours)
            valid = (torch.ones(b, n, device=k.device) if key_valid is None else key_valid.float())
            valid = valid[:, None, :].expand(b, hk, n).reshape(b * hk, 1, n)
            pool = lambda x: F.avg_pool1d(x, self.kernel, stride=1, padding=self.kernel // 2,  # noqa: E731
                                          count_include_pad=True)
            sc = (pool(sc.reshape(b * hk, 1, n) * valid) / pool(valid).clamp_min(1e-9)).view(b, hk, n)
        # the observation window is always kept, its most recent tokens first when it exceeds the budget
        sc[..., n - w :] = sc.amax() + 1.0 + torch.arange(w, device=sc.device, dtype=sc.dtype)
        return sc
