"""KV-cache policies applied once at the end of prefill: score every cached token, keep a budget per head.

A policy is a frozen dataclass with ``score()``; ``keep()`` turns scores into kept indices. The cache then
holds only the kept tokens (``cache.RaggedKV``): the memory is really freed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..checks import check_ratio

__all__ = ["KVPolicy", "Wrapper"]


def valid_lengths(k: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
    """``[b]`` number of real (not padded) keys per row."""
    b, _, n, _ = k.shape
    return torch.full((b,), n, device=k.device) if key_valid is None else key_valid.sum(-1)


def mask_padding(scores: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
    """``scores [b, h, n]`` with padded keys at -inf, so they are never kept."""
    if key_valid is None:
        return scores
    return scores.masked_fill(~key_valid.to(torch.bool)[:, None, :], float("-inf"))


def press_changes(args: dict, defaults: dict) -> dict:
    """The entries of ``args`` that differ from a press's ``defaults`` (a peer row's name stays short)."""
    return {k: v for k, v in args.items() if defaults.get(k, object()) != v}


@dataclass(frozen=True)
class KVPolicy:
    """Base of every KV policy. ``ratio`` is the fraction of the prefill's tokens removed (0 keeps all)."""

    ratio: float = 0.0

    def __post_init__(self) -> None:
        check_ratio(self.ratio)

    #: settings of small instances for the generic tests (a tiny model, ~100-150 tokens); the tests add ``ratio``
    examples: ClassVar[tuple[dict, ...]] = ()
    #: the name of kvpress's equivalent press (``--peer kvpress`` rows, the side-by-side benchmark), declared by
    #: the class itself (None: no equivalent)
    kvpress_press: ClassVar[str | None] = None

    def kvpress_kwargs(self) -> dict | None:
        """The press's arguments besides ``compression_ratio`` that make it this policy's setting, those that
        differ from the press's defaults (None: these settings have no kvpress equivalent)."""
        return {}


    @classmethod
    def write_example_profile(cls, path, **shape) -> str:
        """The head profile an example's ``profile="<profile>"`` stands for (policies that read one)."""
        from ..profiles import write_example_profile

        return write_example_profile(path, **shape)

    #: the policy scores with forwards of its own after the prefill (KVzip): ``after_prefill`` compresses every
    #: layer at once, instead of ``compress_layer`` inside each layer's prefill
    model_pass: ClassVar[bool] = False

    def after_prefill(self, session, input_ids, attention_mask=None, position_ids=None) -> None:  # pragma: no cover - only where model_pass
        """Called once the prefill forward returned (``model_pass`` policies): score and compress the cache."""
        raise NotImplementedError

    #: compress every multi-token forward's new tokens (chunked prefill), not only the first forward
    repeat = False
    #: compress after the question (SnapKV paper setting) instead of question-agnostically (the bench reads it)
    query_aware = False

    @property
    def is_noop(self) -> bool:
        return self.ratio == 0.0

    def prepare(self, model) -> None:
        """Called once by ``apply()`` with the model (profiles check their shapes here)."""

    @property
    def acts_at_decode(self) -> bool:
        """The policy also decides what each decode step attends to (H2O's eviction while generating); such a
        policy cannot be combined with a decode selector."""
        return False

    def compress_layer(self, layer, q, k, v, key_valid, module=None, layer_idx: int = 0, num_layers: int = 1) -> None:
        """End of prefill (or of a chunk): keep this policy's tokens of the ``k, v`` the forward added to the
        cache ``layer`` and free the rest (``LongattnLayer.compress``)."""
        idx, lengths = self.keep(q, k, v, key_valid, module, layer_idx, num_layers)
        layer.compress(idx, lengths)

    def decode_attend(self, layer, q, key_valid, scale, features=None, module=None):  # pragma: no cover
        """One decode step ``q [b, hq, 1, d]`` over ``layer`` when ``acts_at_decode``: ``[b, hq, 1, d]``
        (``features``: the call's softcap and sinks, ``hf.Features``; ``module``: the attention module)."""
        raise NotImplementedError

    def budgets(self, valid_len: torch.Tensor, kv_heads: int, layer_idx: int = 0, num_layers: int = 1):
        """Tokens kept per (batch row, kv head): ``int(valid_len * (1 - ratio))``, at least 1 (as kvpress)."""
        keep = torch.clamp((valid_len.double() * (1.0 - self.ratio)).floor().long(), min=1)
        keep = torch.minimum(keep, valid_len.long())
        return keep.view(-1, 1).expand(-1, kv_heads).contiguous()

    #: no slow reference can exist (a random baseline, a no-op): the generic reference test skips it, saying why
    no_reference: ClassVar[str] = ""

    def reference_scores(self, q, k, v, key_valid=None, module=None) -> torch.Tensor:
        """The policy's score formula from its paper, computed slowly, loop by loop over rows, heads, queries and
        keys in float64 (the truth the tests hold ``score()``/``keep()`` to): ``[b, kv_heads, n]``; higher =
        keep, ``inf`` = always kept (ties among ``inf`` broken by a larger finite tiebreak added by the policy)."""
        raise NotImplementedError  # pragma: no cover - each scorer defines it

    def reference_budget(self, n_valid: int, kv_heads: int, layer_idx: int, num_layers: int) -> list[int]:
        """Tokens each kv head keeps for a row of ``n_valid`` real tokens: ``int(n_valid * (1 - ratio))``, >= 1."""
        return [max(1, int(n_valid * (1.0 - self.ratio)))] * kv_heads

    def reference_keep(self, q, k, v, key_valid=None, module=None, layer_idx: int = 0, num_layers: int = 1):
        """Kept positions per (row, kv head) as Python sets: each head's ``reference_budget`` best
        ``reference_scores`` among the real keys (a plain sort)."""
        sc = self.reference_scores(q, k, v, key_valid, module)
        b, hk, n = sc.shape
        out = []
        for bi in range(b):
            real = [j for j in range(n) if key_valid is None or bool(key_valid[bi, j])]
            budget = self.reference_budget(len(real), hk, layer_idx, num_layers)
            row = []
            for h in range(hk):
                order = sorted(real, key=lambda j: -float(sc[bi, h, j]))
                row.append(set(order[: budget[h]]))
            out.append(row)
        return out

    def score(self, q, k, v, key_valid, module=None) -> torch.Tensor:  # pragma: no cover - abstract
        """``[b, kv_heads, kv_len]`` float; higher = keep."""
        raise NotImplementedError

    def keep(self, q, k, v, key_valid=None, module=None, layer_idx: int = 0, num_layers: int = 1, scores=None):
        """Kept token indices per (b, kv head): ``(idx [b, hkv, max_keep] long ascending, lengths [b, hkv])``.
        Entries past ``lengths`` are padding. Padded keys (``key_valid`` False) are never kept. ``scores``:
        this policy's ``score()`` when the caller already has it."""
        b, hk, n, _ = k.shape
        scores = (self.score(q, k, v, key_valid, module) if scores is None else scores).float()
        if scores.shape != (b, hk, n):
            raise RuntimeError(f"{type(self).__name__}.score returned {tuple(scores.shape)}, expected {(b, hk, n)}")
        scores = mask_padding(scores, key_valid)
        lengths = self.budgets(valid_lengths(k, key_valid), hk, layer_idx, num_layers).to(k.device)
        return self.top(scores, lengths)

    @staticmethod
    def top(scores: torch.Tensor, lengths: torch.Tensor):
        """Indices of the ``lengths[b, h]`` best ``scores [b, h, n]`` per row, ascending, padded."""
        n = scores.shape[-1]
        lengths = torch.minimum(lengths.to(scores.device).long(), torch.tensor(n, device=scores.device))
        max_keep = max(int(lengths.max()), 1)
        top = torch.topk(scores, max_keep, dim=-1, sorted=True).indices  # best first
        slot = torch.arange(max_keep, device=scores.device)
        in_budget = slot < lengths.unsqueeze(-1)
        # sort the kept ones ascending by position; padding slots go to the end
        key = torch.where(in_budget, top, torch.full_like(top, n))
        idx = torch.sort(key, dim=-1).values
        idx = torch.where(idx < n, idx, torch.zeros_like(idx))
        return idx, lengths


def inner_policy(spec: str, ratio: float):
    """Build a wrapper's inner policy from ``name[/key=value...]`` (``/`` instead of ``:``) with ``ratio``."""
    from ..api import parse_method

    if not isinstance(spec, str) or not spec:
        raise ValueError(f"inner must be a kv policy name like 'snapkv' or 'snapkv/obs_window=32', got {spec!r}")
    parts = spec.split("/")
    if any(p.startswith("ratio=") for p in parts[1:]):
        raise ValueError(f"inner={spec!r}: give ratio= to the wrapper, not to its inner policy")
    pol = parse_method(":".join(parts + [f"ratio={ratio}"]), "kv")
    if isinstance(pol, Wrapper) and not getattr(type(pol), "nestable", False):
        raise ValueError(f"inner={spec!r}: {pol.name} cannot be nested")
    return pol


@dataclass(frozen=True)
class Wrapper(KVPolicy):
    """A policy wrapping another one (``inner``), built from ``inner`` and the wrapper's ``ratio``."""

    inner: str = "snapkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "_inner", inner_policy(self.inner, self.ratio))

    @property
    def policy(self) -> KVPolicy:
        return self._inner

    def reference_scores(self, q, k, v, key_valid=None, module=None):
        return self.policy.reference_scores(q, k, v, key_valid, module)

    def reference_budget(self, n_valid, kv_heads, layer_idx, num_layers):
        return self.policy.reference_budget(n_valid, kv_heads, layer_idx, num_layers)

    def prepare(self, model) -> None:
        self.policy.prepare(model)

    def score(self, q, k, v, key_valid, module=None):
        return self.policy.score(q, k, v, key_valid, module)

    def budgets(self, valid_len, kv_heads, layer_idx=0, num_layers=1):
        return self.policy.budgets(valid_len, kv_heads, layer_idx, num_layers)

    def keep(self, q, k, v, key_valid=None, module=None, layer_idx: int = 0, num_layers: int = 1):
        return self.policy.keep(q, k, v, key_valid, module, layer_idx, num_layers)


def slow_probs(q, k, key_valid, bi: int, h: int, i: int, module=None) -> dict[int, float]:
    """Reference helper: the softmax attention of query ``i`` of query head ``h`` (row ``bi``) over the real keys
    it can see (causal, queries aligned to the end), computed from the dot products one by one in float64, with
    the layer's scale, softcap and sink (``module``)."""
    import math

    from ..hf import module_logits

    nq, n, d = q.shape[2], k.shape[2], q.shape[-1]
    g = q.shape[1] // k.shape[1]
    scale, softcap, sinks = module_logits(module, d)
    qp = i + n - nq
    keys = [j for j in range(qp + 1) if key_valid is None or bool(key_valid[bi, j])]
    logits = [float(q[bi, h, i].double() @ k[bi, h // g, j].double()) * scale for j in keys]
    if softcap is not None:
        logits = [softcap * math.tanh(x / softcap) for x in logits]
    if not logits:
        return {}
    extra = [] if sinks is None else [float(sinks[h])]
    m = max(logits + extra)
    e = [math.exp(x - m) for x in logits]
    z = sum(e) + sum(math.exp(x - m) for x in extra)
    return {j: x / z for j, x in zip(keys, e)}


def attention_to_keys(q, k, key_valid, queries: int | None = None, chunk: int = 512, normalize: bool = True,
                      module=None):
    """Mean softmax attention that each key receives from the last ``queries`` queries (all if None),
    ``[b, kv_heads, n]``: summed over queries in chunks (no N x N tensor), averaged over the query heads of the
    GQA group and, with ``normalize``, divided by the number of queries that can see the key (causal). The
    logits are the layer's (``module``: its scale, softcap and sink)."""
    from ..hf import module_logits
    from ..ops.core import capped

    b, hq, nq, d = q.shape
    scale, softcap, sinks = module_logits(module, d)
    hk, n = k.shape[1], k.shape[2]
    g = hq // hk
    w = nq if queries is None else min(queries, nq)
    kf = k.float().unsqueeze(2)  # [b, hk, 1, n, d]
    kpos = torch.arange(n, device=k.device)
    acc = torch.zeros(b, hk, n, device=k.device)
    seen = torch.zeros(b, n, device=k.device)
    kv_ok = None if key_valid is None else key_valid.to(torch.bool)
    for c0 in range(nq - w, nq, chunk):
        c1 = min(nq, c0 + chunk)
        qc = q[:, :, c0:c1].float().reshape(b, hk, g, c1 - c0, d)
        s = capped(torch.matmul(qc, kf.transpose(-1, -2)) * scale, softcap)  # [b, hk, g, c, n]
        qpos = torch.arange(c0, c1, device=k.device) + (n - nq)
        allowed = kpos[None, :] <= qpos[:, None]  # [c, n]
        if kv_ok is not None:
            allowed = allowed[None] & kv_ok[:, None, :]  # [b, c, n]
            q_ok = kv_ok[:, n - nq + c0 : n - nq + c1]  # padded queries do not vote
            seen += (allowed & q_ok[:, :, None]).sum(1).float()
            allowed = (allowed & q_ok[:, :, None])[:, None, None]
        else:
            seen += allowed.sum(0).float()[None]
        s = s.masked_fill(~allowed, float("-inf"))
        if sinks is not None:  # the layer's sink takes its share of each query's attention
            sink = sinks.float().view(1, hk, g, 1, 1).expand(b, hk, g, c1 - c0, 1)
            p = torch.cat([s, sink], -1).softmax(-1)[..., :n].nan_to_num(0.0)
        else:
            p = s.softmax(-1).nan_to_num(0.0)
        acc += p.sum(dim=(2, 3))
    acc = acc / g
    if normalize:
        acc = acc / seen.clamp_min(1)[:, None, :]
    return acc
