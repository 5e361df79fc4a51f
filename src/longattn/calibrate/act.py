"""ACT, the Attention Calibration Technique (Yu et al., ICML 2024): training-free, input-adaptive.

Per layer and query head, a key is a *sink* of the forward when the mean attention it receives from the forward's
queries exceeds ``alpha / N`` (``N`` the keys a query row may see; the first token is exempt with ``keep_first``,
as the visible start-of-sequence sink carries the model's no-op attention). In the calibrated heads every query
then gives the sinks ``beta`` times their attention and hands the removed mass to the other keys in proportion
to their attention:

    a'[q, s] = beta * a[q, s]                                          (s a sink)
    a'[q, j] = a[q, j] * (1 + (1 - beta) * sum_s a[q, s] / sum_{j' not sink} a[q, j'])   (otherwise)

so every row still sums to one. The sinks found by a multi-token forward (the prompt) are kept in the cache layer
and calibrate each generated token after it. Which heads to calibrate: ``heads=all`` or a profile written by
``longattn profile act`` (the heads whose calibration lowered the answers' loss on calibration samples, the paper's
head filtering); ``layers`` restricts the layers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from ..checks import check_int, parse_layers
from ..ops.core import capped
from ..registry import register
from .base import Calibration

__all__ = ["ACT", "act_attention", "load_act_heads"]

_STATE = "act_sinks"


def load_act_heads(spec: str, num_layers: int, num_heads: int) -> list[list[bool]]:
    """The heads to calibrate from a profile JSON (``query_head_scores [layer][query head]``: the loss drop when
    that head alone is calibrated): the heads whose score is > 0."""
    p = Path(spec)
    if not p.is_file():
        raise ValueError(f"act: heads must be 'all' or a profile JSON written by `longattn profile act`; no such "
                         f"file {spec!r}")
    try:
        rows = json.loads(p.read_text())["query_head_scores"]
        gains = [[float(x) for x in r] for r in rows]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"act: profile {spec}: expected JSON with query_head_scores [layer][query head] ({e})") from None
    if len(gains) != num_layers or any(len(r) != num_heads for r in gains):
        raise ValueError(f"act: profile {spec} is for {len(gains)} layers x {sorted({len(r) for r in gains})} query "
                         f"heads, the model has {num_layers} x {num_heads}")
    return [[g > 0 for g in r] for r in gains]


def _visible(nq: int, nk: int, key_valid: torch.Tensor | None, q0: int, q1: int, device) -> torch.Tensor:
    """``[b or 1, 1, q1 - q0, nk]`` bool: query rows ``q0..q1`` (aligned to the end of the keys) may see key j."""
    qpos = torch.arange(nk - nq + q0, nk - nq + q1, device=device)
    allowed = torch.arange(nk, device=device)[None, :] <= qpos[:, None]
    allowed = allowed[None, None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :].bool()
    return allowed


def _probs(q, k, scale, softcap, allowed):
    s = capped(torch.matmul(q, k.transpose(-1, -2)) * scale, softcap).masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.nan_to_num(p, nan=0.0)  # a row that sees no key (padding) attends to nothing


def act_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None, scale: float,
                  *, alpha: float = 5.0, beta: float = 0.4, keep_first: bool = True,
                  sinks: torch.Tensor | None = None, softcap: float | None = None, block: int = 256
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibrated attention of ``q [b, h, nq, d]`` over ``k, v [b, h(k), nk, d]`` (causal, queries aligned to the
    end of the keys; kv heads shared by groups of query heads). ``sinks [b, h, nk]`` bool: calibrate those keys;
    None: find them from these queries (mean attention received > ``alpha / N``). Returns ``(out [b, h, nq, d]``
    in ``q``'s dtype, ``sinks [b, h, nk])``. Computed in float32, ``block`` query rows at a time."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    g = h // k.shape[1]
    qf = q.float()
    kf = k.float().repeat_interleave(g, dim=1)
    vf = v.float().repeat_interleave(g, dim=1)
    kv = None if key_valid is None else key_valid.bool()
    if sinks is None:
        received = torch.zeros(b, h, nk, device=q.device)
        for q0 in range(0, nq, block):
            q1 = min(nq, q0 + block)
            p = _probs(qf[:, :, q0:q1], kf, scale, softcap, _visible(nq, nk, kv, q0, q1, q.device))
            if kv is not None:  # a padded query row is no reader
                p = p * kv[:, nk - nq + q0 : nk - nq + q1][:, None, :, None]
            received += p.sum(2)
        n_keys = torch.full((b,), float(nk), device=q.device) if kv is None else kv.sum(1).float()
        n_queries = torch.full((b,), float(nq), device=q.device) if kv is None else kv[:, nk - nq :].sum(1).float()
        mean = received / n_queries.clamp(min=1)[:, None, None]
        sinks = mean > (alpha / n_keys.clamp(min=1))[:, None, None]
        if kv is not None:
            sinks &= kv[:, None, :]
        if keep_first:
            first = torch.zeros(b, dtype=torch.long, device=q.device) if kv is None else kv.long().argmax(1)
            sinks[torch.arange(b, device=q.device), :, first] = False
    sinks = sinks.bool()
    out = torch.empty(b, h, nq, d, device=q.device, dtype=torch.float32)
    for q0 in range(0, nq, block):
        q1 = min(nq, q0 + block)
        p = _probs(qf[:, :, q0:q1], kf, scale, softcap, _visible(nq, nk, kv, q0, q1, q.device))
        s = sinks[:, :, None, :]
        sink_mass = (p * s).sum(-1, keepdim=True)
        rest = p.sum(-1, keepdim=True) - sink_mass
        boost = torch.where(rest > 0, 1 + (1 - beta) * sink_mass / rest.clamp(min=1e-30), torch.ones_like(rest))
        p = torch.where(s & (rest > 0), beta * p, p * boost)
        out[:, :, q0:q1] = torch.matmul(p, vf)
    return out.to(q.dtype), sinks


@register("act", "calibrate", paper="Unveiling and Harnessing Hidden Attention Sinks: ACT (Yu et al., ICML 2024) "
          "https://arxiv.org/abs/2406.15765",
          summary="finds each head's attention sinks on the fly (mean attention > alpha/N), scales their attention "
                  "by beta and gives the rest to the other tokens; per-head filtering from `profile act`")
@dataclass(frozen=True)
class ACT(Calibration):
    """ACT. ``alpha``: sink threshold (a key is a sink when it receives more than ``alpha / N`` mean attention);
    ``beta``: the factor on a sink's attention; ``keep_first``: never calibrate the first token; ``heads``:
    ``all`` or a profile from ``longattn profile act``; ``layers``: comma-separated layers ("" = every full layer);
    ``block``: query rows computed at a time."""

    alpha: float = 5.0
    beta: float = 0.4
    keep_first: bool = True
    heads: str = "all"
    layers: str = ""
    block: int = 256
    _mask: list | None = field(default=None, init=False, repr=False, compare=False)
    examples: ClassVar[tuple] = ({}, {"alpha": 2.0, "beta": 0.2, "layers": "0"}, {"keep_first": False})

    def __post_init__(self) -> None:
        if not 0 < float(self.alpha):
            raise ValueError(f"act: alpha must be > 0, got {self.alpha}")
        if not 0 <= float(self.beta) <= 1:
            raise ValueError(f"act: beta must be in [0, 1], got {self.beta}")
        check_int(self.block, "act: block", 1)
        parse_layers(self.layers, "act: layers")
        if not isinstance(self.heads, str) or not self.heads:
            raise ValueError(f"act: heads must be 'all' or a profile JSON path, got {self.heads!r}")

    def prepare(self, model) -> None:
        from .. import hf

        feats = hf.model_features(model)
        if "sinks" in feats:
            raise ValueError("act: the model's attention has per-head sink logits (gpt-oss); ACT's redistribution is "
                             "defined for plain softmax attention")
        cfg = hf.text_config(model.config)
        n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
        only = parse_layers(self.layers, "act: layers")
        bad = [i for i in only if i >= n_layers]
        if bad:
            raise ValueError(f"act: layers {bad} past the model's {n_layers} layers")
        mask = ([[True] * n_heads for _ in range(n_layers)] if self.heads == "all"
                else load_act_heads(self.heads, n_layers, n_heads))
        if only:
            mask = [row if i in only else [False] * n_heads for i, row in enumerate(mask)]
        object.__setattr__(self, "_mask", mask)

    def head_mask(self, layer_idx: int, n_heads: int) -> list[bool]:
        """The query heads calibrated in ``layer_idx`` (``prepare`` resolves the profile; without it, every head
        of the ``layers``)."""
        if self._mask is not None and layer_idx < len(self._mask):
            return self._mask[layer_idx]
        only = parse_layers(self.layers, "act: layers")
        return [not only or layer_idx in only] * n_heads

    def attend(self, layer, layer_idx, q, k, v, key_valid, scale, softcap=None):
        from ..ops.dense import dense_attention

        heads = self.head_mask(layer_idx, q.shape[1])
        if not any(heads):
            return dense_attention(q, k, v, key_valid, scale, None, softcap)
        idx = torch.tensor([i for i, on in enumerate(heads) if on], device=q.device)
        g = q.shape[1] // k.shape[1]
        state = layer.decode_state if layer is not None else {}
        stored = state.get(_STATE)
        sinks = None
        if q.shape[2] == 1 and stored is not None:  # a generated token: the prompt's sinks, new keys are not
            sinks = torch.zeros(q.shape[0], len(idx), k.shape[2], dtype=torch.bool, device=q.device)
            n = min(stored.shape[-1], k.shape[2])
            sinks[..., :n] = stored[..., :n]
        # the calibrated heads' own kv heads (each query head with its group's keys)
        kq, vq = k.index_select(1, idx // g), v.index_select(1, idx // g)
        out_c, found = act_attention(q.index_select(1, idx), kq, vq, key_valid, scale, alpha=self.alpha,
                                     beta=self.beta, keep_first=self.keep_first, sinks=sinks, softcap=softcap,
                                     block=self.block)
        if q.shape[2] > 1 and layer is not None:
            state[_STATE] = found
        if len(idx) == q.shape[1]:
            return out_c
        out = dense_attention(q, k, v, key_valid, scale, None, softcap).clone()
        out[:, idx] = out_c
        return out
