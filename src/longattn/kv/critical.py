"""CriticalKV: correct any scorer by what a pair changes in the layer's output, ``||v W_O||_1``, in two stages.

Paper: "Identify Critical KV Cache in LLM Inference from an Output Perturbation Perspective" (Feng et al., 2025,
https://arxiv.org/abs/2502.03805); kvpress's ``CriticalKVPress``. Attention weight alone bounds the output
perturbation of evicting a pair only up to the size of what the pair contributes through the output
projection. Stage 1 keeps the ``first_stage`` share of each head's budget by the inner scorer alone; stage 2
fills the rest by ``(score + epsilon) * ||v_j W_O^h||_1`` (the L1 norm of the value projected by the query
head's slice of ``o_proj``, averaged over the kv head's group of query heads). With an inner scorer that
already weights by ``||v||`` (``expected_attention``), give it ``vnorm=false``, as the paper does.

Departures: none in the scores; the budget is ours (``int(n_real * (1 - ratio))`` per head, padding excluded).
Needs the attention module's output projection (``o_proj``; GPT-NeoX's ``dense``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register
from .base import KVPolicy, Wrapper, mask_padding, press_changes, valid_lengths

__all__ = ["Critical", "output_weight"]


def output_weight(module) -> torch.Tensor:
    """``[hidden, heads * head_dim]``: the attention module's output projection weight."""
    for name in ("o_proj", "dense", "out_proj"):
        lin = getattr(module, name, None)
        if isinstance(getattr(lin, "weight", None), torch.Tensor):
            return lin.weight
    raise ValueError(f"critical: the attention module {type(module).__name__} has no output projection "
                     "(o_proj) to weight values by")


@register("critical", "kv", paper="CriticalKV (Feng et al., 2025) https://arxiv.org/abs/2502.03805",
          summary="two-stage: inner scorer, then (score + eps) x ||v W_O||_1 (any scorer)")
@dataclass(frozen=True)
class Critical(Wrapper):
    """The CriticalKV correction around an inner scorer."""

    kvpress_press = "CriticalKVPress"
    examples = ({"inner": "snapkv/obs_window=8"}, {"inner": "expected_attention/vnorm=false", "first_stage": 0.25},
                {"inner": "knorm", "epsilon": 0.0})

    epsilon: float = 1e-4
    first_stage: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("epsilon", "first_stage"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, float)) or val < 0 or (name == "first_stage"
                                                                                         and val > 1):
                raise ValueError(f"{name} must be a number in [0, {'1' if name == 'first_stage' else 'inf'}), "
                                 f"got {val!r}")

    def kvpress_kwargs(self) -> dict | None:
        from ..bench.peer_kvpress import press_args

        inner = press_args(self.policy)
        if inner is None:
            return None
        name, kw = inner
        return {**press_changes({"epsilon": self.epsilon, "first_stage_ratio": self.first_stage},
                                {"epsilon": 1e-4, "first_stage_ratio": 0.5}),
                "press": "/".join([name] + [f"{k}={v}" for k, v in kw.items()])}

    @staticmethod
    def projected_norm(v, module) -> torch.Tensor:
        """``[b, hk, n]``: ``||v_j W_O^h||_1`` per query head ``h``, averaged over each kv head's group."""
        b, hk, n, d = v.shape
        w = output_weight(module).float()  # [hidden, hq * d]
        hq = w.shape[1] // d
        g = hq // hk
        wo = w.t().reshape(hq, d, -1)  # per query head: [d, hidden]
        out = torch.zeros(b, hk, n, device=v.device)
        for h in range(hq):  # one head at a time: no [b, hq, n, hidden] tensor
            out[:, h // g] += (v[:, h // g].float() @ wo[h]).abs().sum(-1)
        return out / g

    def _scores(self, q, k, v, key_valid, module):
        inner = mask_padding(self.policy.score(q, k, v, key_valid, module).float(), key_valid)
        n_real = valid_lengths(k, key_valid)
        budget = self.budgets(n_real, k.shape[1]).to(k.device)  # [b, hk]
        first = (budget.double() * self.first_stage).long()  # stage 1 per head
        if self.first_stage > 0:
            first = torch.clamp(first, min=1)
        top = torch.topk(inner, max(int(first.max()), 1), dim=-1).indices
        chosen = torch.zeros_like(inner, dtype=torch.bool)
        slot = torch.arange(top.shape[-1], device=k.device)
        chosen.scatter_(-1, top, (slot < first.unsqueeze(-1)))
        stage2 = (inner + self.epsilon) * self.projected_norm(v, module)
        return torch.where(chosen, torch.finfo(torch.float32).max, stage2)

    def score(self, q, k, v, key_valid, module=None) -> torch.Tensor:
        return self._scores(q, k, v, key_valid, module)

    def budgets(self, valid_len, kv_heads, layer_idx=0, num_layers=1):
        return KVPolicy.budgets(self, valid_len, kv_heads, layer_idx, num_layers)

    def keep(self, q, k, v, key_valid=None, module=None, layer_idx: int = 0, num_layers: int = 1, scores=None):
        return KVPolicy.keep(self, q, k, v, key_valid, module, layer_idx, num_layers, scores)

    def reference_keep(self, q, k, v, key_valid=None, module=None, layer_idx: int = 0, num_layers: int = 1):
        """Loop by loop: per row and kv head, the inner policy's reference scores; its ``first_stage`` x budget
        best are kept; the rest of the budget goes to the best ``(score + epsilon) x ||v W_O||_1`` (the L1 norm
        summed element by element over the hidden size, averaged over the group's query heads)."""
        sc = self.policy.reference_scores(q, k, v, key_valid, module)
        b, hk, n = sc.shape
        d = v.shape[-1]
        w = output_weight(module).double()
        hq = w.shape[1] // d
        g = hq // hk
        out = []
        for bi in range(b):
            real = [j for j in range(n) if key_valid is None or bool(key_valid[bi, j])]
            budget = max(1, int(len(real) * (1.0 - self.ratio)))
            first = int(budget * self.first_stage)
            if self.first_stage > 0:
                first = max(first, 1)
            row = []
            for h in range(hk):
                order = sorted(real, key=lambda j: -float(sc[bi, h, j]))
                kept = set(order[:first])
                proj = {}
                for j in real:
                    tot = 0.0
                    for qh in range(h * g, (h + 1) * g):
                        for o in range(w.shape[0]):
                            tot += abs(sum(float(v[bi, h, j, t]) * float(w[o, qh * d + t]) for t in range(d)))
                    proj[j] = tot / g
                rest = sorted((j for j in real if j not in kept),
                              key=lambda j: -(float(sc[bi, h, j]) + self.epsilon) * proj[j])
                row.append(kept | set(rest[: budget - len(kept)]))
            out.append(row)
        return out
