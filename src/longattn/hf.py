"""The only module that touches transformers: attention/mask registration and cache adoption.

Extension points used (all public): ``AttentionInterface.register`` and ``AttentionMaskInterface.register``
(name ``"longattn"``), ``PreTrainedModel.set_attn_implementation``, cache layers (``Cache.layers``), and a
PyTorch forward pre-hook on the model that puts ``LongattnLayer``s into the cache it is given.

Per call of the attention function:
- prefill (``q_len > 1``): the recipe's prefill pattern -> BlockLayout -> ``block_sparse_attention``; dense
  SDPA when there is no pattern;
- end of prefill (the forward that filled an empty cache layer): the recipe's KV policy keeps a budget per
  kv head and the layer frees the rest;
- afterwards: attention over the compressed ragged prefix plus the uniform tail, merged by log-sum-exp.
"""

from __future__ import annotations

import inspect
import math
import time

import torch
import torch.nn.functional as F

from .cache import LongattnLayer
from .ops.core import masked_attention
from .ops.merge import merge_attention

__all__ = ["NAME", "SUPPORTED_MODEL_TYPES", "Session", "register", "cache_kwarg_name"]

NAME = "longattn"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# id(model.config) -> active Session. Layers share their model's config object.
_SESSIONS: dict[int, Session] = {}
_REGISTERED = False


def register() -> None:
    """Register the ``longattn`` attention and mask functions with transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, _mask)
    _REGISTERED = True


def cache_kwarg_name(model) -> str:
    """``cache`` in recent transformers, ``past_key_values`` before."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _mask(*args, attention_mask: torch.Tensor | None = None, kv_length: int | None = None, kv_offset: int = 0,
          **kwargs) -> torch.Tensor | None:
    """Mask function: instead of an N x N mask, hand the attention function the 2-D key validity
    ``[batch, kv_length]`` (None when nothing is padded). The causal rule is applied by the kernels."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"longattn expects a 2-D padding attention_mask, got shape {tuple(attention_mask.shape)}")
    m = attention_mask.to(torch.bool)
    if kv_length is not None:
        m = m[:, kv_offset : kv_offset + kv_length]
    if bool(m.all()):
        return None
    return m


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    session = _SESSIONS.get(id(module.config))
    if session is None:
        raise RuntimeError(
            "the 'longattn' attention implementation is only usable inside `with longattn.apply(model, recipe):`"
        )
    return session.attend(module, query, key, value, attention_mask, scaling, **kwargs)


class Session:
    """State of one ``apply()``: the recipe, the model's cache, timers."""

    def __init__(self, model, recipe) -> None:
        self.model = model
        self.recipe = recipe
        self.cache = None
        self.num_layers = getattr(model.config, "num_hidden_layers", 1)
        self.method_s = 0.0  # time spent inside the methods (layouts, scoring, compression)
        self.compressions = 0
        #: the KV policy compresses while this is True (the bench turns it off once the context is in)
        self.compress_enabled = True
        #: callables ``f(layer_idx, query, key, value, key_valid)`` run on every multi-token attention call (profiling)
        self.observers: list = []
        #: ``f(layer_idx, q, k, v, key_valid, scale) -> out`` replacing multi-token attention (gate training)
        self.attention_override = None
        #: decode selectors: seconds selecting, tokens attended and tokens cached, summed over layers and steps
        self.decode_stats: dict = {}
        self._decode_shared: dict = {}  # per-step state shared across layers (TidalDecode's positions)
        self._prev_chunk = None
        self._hook = None
        self._prev_impl = None
        self._cache_kw = cache_kwarg_name(model)

    # ---- install / remove ------------------------------------------------------------------------------
    def install(self) -> None:
        register()
        cfg = self.model.config
        if id(cfg) in _SESSIONS:
            raise ValueError("model: longattn.apply() is already active on this model (nesting is not supported)")
        kv = self.recipe.kv
        if kv is not None:
            kv.prepare(self.model)
        if self.recipe.decode is not None:
            self.recipe.decode.prepare(self.model)
        pre = self.recipe.prefill
        n_layers = getattr(pre, "num_layers", None)
        if n_layers is not None and n_layers != cfg.num_hidden_layers:
            raise ValueError(f"prefill: the mixed profile {pre.profile!r} has {n_layers} layers, the model has "
                             f"{cfg.num_hidden_layers}")
        self._prev_impl = cfg._attn_implementation
        self.model.set_attn_implementation(NAME)
        gc = getattr(self.model, "generation_config", None)
        if kv is not None and kv.repeat and gc is not None:
            self._prev_chunk = (gc, getattr(gc, "prefill_chunk_size", None))
            gc.prefill_chunk_size = kv.chunk
        _SESSIONS[id(cfg)] = self
        self._hook = self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if _SESSIONS.get(id(self.model.config)) is self:
            del _SESSIONS[id(self.model.config)]
        if self._prev_impl is not None:
            self.model.set_attn_implementation(self._prev_impl)
            self._prev_impl = None
        if self._prev_chunk is not None:
            gc, prev = self._prev_chunk
            gc.prefill_chunk_size = prev
            self._prev_chunk = None

    # ---- cache adoption ----------------------------------------------------------------------------------
    def _pre_forward(self, module, args, kwargs):
        from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

        name = self._cache_kw
        cache = kwargs.get(name)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.model.config, "use_cache", True)
        if cache is None and use_cache:
            cache = DynamicCache()
            kwargs[name] = cache
        if cache is not None:
            if not isinstance(cache, Cache):
                raise ValueError(f"{name}: longattn needs a transformers Cache object, got {type(cache).__name__}")
            if getattr(cache, "layer_class_to_replicate", None) is not None:
                cache.layer_class_to_replicate = LongattnLayer
            for i, layer in enumerate(cache.layers):
                if isinstance(layer, LongattnLayer):
                    continue
                if type(layer) is not DynamicLayer and layer.get_seq_length() > 0:
                    raise ValueError(
                        f"{name}: cannot adopt a filled {type(layer).__name__} (layer {i}); start from an empty "
                        "cache or a DynamicCache"
                    )
                if not isinstance(layer, DynamicLayer):
                    raise ValueError(
                        f"{name}: unsupported cache layer {type(layer).__name__}; use DynamicCache (the default)"
                    )
                cache.layers[i] = LongattnLayer.adopt(layer)
        self.cache = cache
        return args, kwargs

    # ---- the attention function ---------------------------------------------------------------------------
    def attend(self, module, query, key, value, key_valid, scaling, **kwargs):
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions=True is not supported by longattn (no N x N weights are formed)")
        layer_idx = getattr(module, "layer_idx", 0)
        window = kwargs.get("sliding_window")
        scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
        layer = None
        if self.cache is not None and layer_idx < len(self.cache.layers):
            layer = self.cache.layers[layer_idx]
            if not isinstance(layer, LongattnLayer):
                layer = None
        nq = query.shape[2]
        if nq > 1:
            for obs in self.observers:
                obs(layer_idx, query, key, value, key_valid)
        policy = self.recipe.kv
        if nq == 1 and layer is not None and self.recipe.decode is not None:
            out = self._decode_select(layer, layer_idx, query, key, value, key_valid, scale, window)
            return out.transpose(1, 2).contiguous(), None
        if nq == 1 and layer is not None and getattr(policy, "decode_budget", 0) and layer.prefix is None:
            out = self._decode_evicting(layer, query, key_valid, scale, policy)
            return out.transpose(1, 2).contiguous(), None
        if layer is not None and layer.compressed:
            if window is not None:
                raise ValueError("sliding-window layers cannot be combined with a KV policy in longattn")
            out = attend_compressed(layer, query, key_valid, scale)
            self._maybe_compress(layer, module, query, layer.keys[..., layer.prefix_physical_len :, :],
                                 layer.values[..., layer.prefix_physical_len :, :], key_valid)
            self._selector_prefill(layer, layer_idx, query, key_valid)
            return out.transpose(1, 2).contiguous(), None

        pattern = self.recipe.prefill
        if nq > 1 and self.attention_override is not None:
            out = self.attention_override(layer_idx, query, key, value, key_valid, scale)
        elif nq > 1 and pattern is not None:
            stats: dict = {}
            # the model is causal whatever the pattern's own default (2-D forms are non-causal)
            out = pattern.for_layer(layer_idx).attend(
                query, key, value, scale=scale, key_valid=key_valid, window=window, causal=True, stats=stats,
            )
            self.method_s += stats.get("est_s", 0.0)
        else:
            out = _dense(query, key, value, key_valid, scale, window)

        self._maybe_compress(layer, module, query, key, value, key_valid)
        self._selector_prefill(layer, layer_idx, query, key_valid)
        return out.transpose(1, 2).contiguous(), None

    def _selector_prefill(self, layer, layer_idx, query, key_valid) -> None:
        """Let the decode selector see a multi-token forward (its representatives, clusters) once the layer holds
        what the KV policy kept."""
        sel = self.recipe.decode
        if sel is None or layer is None or query.shape[2] <= 1 or layer.prefix is not None:
            return
        t0 = time.perf_counter()
        sel.on_prefill(layer, layer_idx, query, layer.keys, layer.physical_key_valid(key_valid))
        self.method_s += time.perf_counter() - t0

    def _decode_select(self, layer, layer_idx, query, key, value, key_valid, scale, window):
        """One decode step through the recipe's selector (dense on its ``dense_layers``)."""
        from .decode.base import Step

        sel = self.recipe.decode
        if window is not None:
            raise ValueError(f"decode: {sel.name} cannot run on sliding-window layers")
        if layer.prefix is not None:
            raise ValueError(f"decode: {sel.name} needs every kv head to hold the same tokens count; the KV policy "
                             f"{self.recipe.kv.name} kept per-head budgets (ragged cache)")
        kv_phys = layer.physical_key_valid(key_valid)
        if sel.is_dense(layer_idx):
            return _dense(query, key, value, kv_phys, scale, None)
        step = Step(query, key, value, kv_phys, layer, layer_idx, self.num_layers, scale, self._decode_shared)
        before = self.decode_stats.get("select_s", 0.0)
        out = sel.attend(step, self.decode_stats)
        self.method_s += self.decode_stats.get("select_s", 0.0) - before
        return out

    def _decode_evicting(self, layer, query, key_valid, scale, policy):
        """One decode step that also accumulates each kept token's attention, then evicts down to the budget."""
        t0 = time.perf_counter()
        b, hq, _, d = query.shape
        hk = layer.keys.shape[1]
        g = hq // hk
        kv_phys = layer.physical_key_valid(key_valid)
        s = torch.matmul(query.reshape(b, hk, g, d).float(), layer.keys.float().transpose(-1, -2)) * scale
        if kv_phys is not None:
            s = s.masked_fill(~kv_phys[:, None, None, :], float("-inf"))
        p = s.softmax(-1)  # [b, hk, g, physical]: the step's attention, kept for the scores
        out = torch.matmul(p, layer.values.float())
        if layer.scores is not None:
            prev = layer.scores
            pad = p.shape[-1] - prev.shape[-1]  # tokens appended since the last step start at 0
            layer.scores = torch.nn.functional.pad(prev, (0, pad)) + p.mean(2)
            layer.evict(policy.decode_budget, max(policy.n_recent, 1))
        self.method_s += time.perf_counter() - t0
        return out.reshape(b, hq, 1, d).to(query.dtype)

    def _maybe_compress(self, layer, module, query, tail_k, tail_v, key_valid) -> None:
        """Run the KV policy on the tokens this forward added, when it is the prefill's (first forward, or
        every forward of a chunked policy) and compression is on."""
        policy = self.recipe.kv
        nq = query.shape[2]
        if layer is None or policy is None or policy.is_noop or not self.compress_enabled or nq <= 1:
            return
        if layer.tail_len != nq or (layer.compressed and not policy.repeat):
            return
        t0 = time.perf_counter()
        kv_tail = None
        if key_valid is not None:
            kv_tail = key_valid[:, key_valid.shape[1] - nq :]
        layer_idx = getattr(module, "layer_idx", 0)
        if getattr(policy, "decode_budget", 0):  # H2O eviction: the kept tokens' scores seed the accumulator
            sc = policy.score(query, tail_k, tail_v, kv_tail, module).float()
            idx, lengths = policy.keep(query, tail_k, tail_v, kv_tail, module, layer_idx, self.num_layers,
                                       scores=sc)
            if policy.ratio == 0.0:
                idx = torch.arange(tail_k.shape[2], device=idx.device).expand(*tail_k.shape[:2], -1)
                lengths = torch.full(tail_k.shape[:2], tail_k.shape[2], device=idx.device)
            layer.compress(idx, lengths)
            if layer.prefix is not None:
                raise ValueError("h2o decode_budget: rows keep different numbers of tokens (padding); use batch 1 "
                                 "or equal lengths")
            layer.scores = torch.gather(sc, -1, idx[..., : layer.physical_len])
        else:
            idx, lengths = policy.keep(query, tail_k, tail_v, kv_tail, module, layer_idx, self.num_layers)
            layer.compress(idx, lengths)
        self.compressions += 1
        self.method_s += time.perf_counter() - t0


def _dense(q, k, v, key_valid, scale, window):
    """Dense SDPA, the same call transformers' ``sdpa`` path makes when nothing is padded."""
    nq, nk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if key_valid is None and window is None and (nq == nk or nq == 1):
        return F.scaled_dot_product_attention(q, k, v, is_causal=nq > 1, scale=scale, enable_gqa=gqa)
    qpos = torch.arange(nk - nq, nk, device=q.device)[:, None]
    kpos = torch.arange(nk, device=q.device)[None, :]
    m = kpos <= qpos
    if window is not None:
        m = m & (qpos - kpos < window)
    m = m[None, None]
    if key_valid is not None:
        m = m & key_valid[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale, enable_gqa=gqa)
    return torch.where(m.any(-1, keepdim=True), out, torch.zeros_like(out))


def attend_compressed(layer: LongattnLayer, q, key_valid, scale):
    """Attention of the newest ``q`` tokens over a compressed layer: the kept prefix (all visible) plus the
    tokens appended since (causal, aligned to the end). ``key_valid`` is the logical ``[b, seq]`` validity."""
    kv_phys = layer.physical_key_valid(key_valid)
    if layer.prefix is None:  # uniform budgets: an ordinary, smaller dense cache
        return _dense(q, layer.keys, layer.values, kv_phys, scale, None)
    return _attend_ragged(layer, q, layer.keys, layer.values, kv_phys, scale)


def _attend_ragged(layer: LongattnLayer, q, k_tail, v_tail, key_valid, scale):
    b, hq, nq, d = q.shape
    pre = layer.prefix
    hk = pre.heads
    g = hq // hk
    qg = q.reshape(b, hk, g * nq, d)
    # tail part
    t = k_tail.shape[2]
    qpos = torch.arange(t - nq, t, device=q.device)
    allowed = (torch.arange(t, device=q.device)[None, :] <= qpos[:, None]).repeat(g, 1)  # [g*nq, t]
    allowed = allowed[None, None]
    if key_valid is not None:  # validity of the tail keys
        allowed = allowed & key_valid[:, None, None, :]
    o_t, l_t = masked_attention(qg, k_tail, v_tail, allowed, scale)
    # prefix part
    if pre.uniform:
        kp, vp, _ = pre.as_uniform()
        o_p, l_p = masked_attention(qg, kp, vp, None, scale)
    else:
        o_p = torch.empty(b, hk, g * nq, d, dtype=o_t.dtype, device=q.device)
        l_p = torch.empty(b, hk, g * nq, dtype=l_t.dtype, device=q.device)
        for bi, hi, kr, vr, _ in pre.rows():
            o, lse = masked_attention(qg[bi, hi], kr, vr, None, scale)
            o_p[bi, hi], l_p[bi, hi] = o, lse
    out, _ = merge_attention([o_p, o_t], [l_p, l_t])
    return out.reshape(b, hq, nq, d).to(q.dtype)
