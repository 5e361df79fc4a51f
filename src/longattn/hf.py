"""The only module that touches transformers: its extension points, cache adoption and version shims.

Extension points used (all public): ``AttentionInterface.register`` and ``AttentionMaskInterface.register``
(name ``"longattn"``), ``PreTrainedModel.set_attn_implementation``, cache layers (``Cache.layers``,
``DynamicLayer`` as the base of ``cache.LongattnLayer``), ``generation_config.prefill_chunk_size``, and a PyTorch
forward pre-hook on the model that puts ``LongattnLayer``s into the cache it is given. Nothing is registered on
import; ``register()`` runs when the first ``apply()`` starts.

The per-call routing (prefill pattern, compressed cache, decode selector) lives in ``session.py``; the kernels
in ``ops/``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer as BaseLayer

__all__ = ["NAME", "BaseLayer", "Features", "call_features", "kv_heads", "layer_kinds", "module_logits", "plain_cache_bytes", "Rope", "rope_of", "query_positions", "activate", "adopt_cache", "cache_kwarg_name",
           "check_model", "deactivate", "install_cache_hook", "mask_query_length", "register", "register_attention",
           "set_prefill_chunk"]

NAME = "longattn"

# id(module) -> the active Session of the model that module belongs to (every submodule of an applied model), so
# the registered attention function never mixes up two models, even two that share one config object
_SESSIONS: dict = {}
_REGISTERED: set = set()


def register_attention(name: str, fn) -> None:
    """Register ``fn`` as transformers' attention implementation ``name``, with longattn's mask function (the 2-D
    key validity instead of an N x N mask); idempotent per name."""
    if name in _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, _mask)
    _REGISTERED.add(name)


def register() -> None:
    """Register the ``longattn`` attention and mask functions with transformers (idempotent)."""
    register_attention(NAME, _attention)


@dataclass(frozen=True)
class Features:
    """The attention features of one call: sliding ``window``, logit ``softcap``, per-head ``sinks``."""

    window: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None


# what transformers hands the attention function: the features longattn honours, and the arguments it may ignore
# (they carry no attention semantics); anything else is refused by name, never ignored
FEATURE_ARGS = ("scaling", "dropout", "sliding_window", "softcap", "s_aux", "output_attentions")
IGNORED_ARGS = ("position_ids", "use_cache", "output_router_logits", "cache_position", "position_embeddings",
                "output_hidden_states", "return_dict")
LAYER_KINDS = ("full_attention", "sliding_attention")


def call_features(module, kwargs: dict) -> Features:
    """The features of one attention call (``ValueError`` naming any argument longattn would otherwise ignore)."""
    unknown = sorted(set(kwargs) - set(FEATURE_ARGS) - set(IGNORED_ARGS))
    if unknown:
        raise ValueError(f"model: {type(module).__name__} passes the attention argument(s) {', '.join(unknown)}, "
                         f"which longattn does not honour (it honours {', '.join(FEATURE_ARGS)})")
    if kwargs.get("output_attentions"):
        raise ValueError("output_attentions=True is not supported by longattn (no N x N weights are formed)")
    if kwargs.get("dropout"):
        raise ValueError(f"model: attention dropout {kwargs['dropout']} (training mode) is not supported by longattn; "
                         "call model.eval()")
    sinks = kwargs.get("s_aux")
    return Features(kwargs.get("sliding_window"), kwargs.get("softcap"), None if sinks is None else sinks.detach())


def module_logits(module, head_dim: int):
    """``(scale, softcap, sinks)`` of an attention module, read from the attributes transformers' attention
    modules pass to the attention function (``scaling``, ``attn_logit_softcapping``, ``sinks``); ``(1/sqrt(d),
    None, None)`` without a module. KV policies score with these, so their attention is the layer's own."""
    import math

    if module is None:
        return 1.0 / math.sqrt(head_dim), None, None
    scale = getattr(module, "scaling", None)
    sinks = getattr(module, "sinks", None)
    return (1.0 / math.sqrt(head_dim) if scale is None else float(scale),
            getattr(module, "attn_logit_softcapping", None),
            None if not isinstance(sinks, torch.Tensor) else sinks.detach())


class Rope:
    """The rotary position embedding of one attention layer, exactly as transformers applies it there (its
    rotary module and its modeling file's ``apply_rotary_pos_emb``: rotate-half or interleaved, partial rotary
    dims, scaled frequencies); for methods that reason about queries before RoPE (Expected Attention)."""

    def __init__(self, rotary, apply_fn, layer_type: str | None) -> None:
        self.rotary, self.apply_fn, self.layer_type = rotary, apply_fn, layer_type
        self._whole: bool | None = None  # the apply function takes the whole head (else only the rotary dims)

    def cos_sin(self, positions: torch.Tensor, like: torch.Tensor):
        """``(cos, sin)`` ``[b, n, rot]`` at ``positions [b, n]`` (``like``: dtype and device)."""
        kw = {"layer_type": self.layer_type} if self.layer_type is not None else {}
        with torch.no_grad():
            return self.rotary(like, positions.to(like.device), **kw)

    def rotate(self, x: torch.Tensor, cos, sin) -> torch.Tensor:
        """``x [b, h, n, d]`` rotated to the positions of ``cos, sin`` (as the layer rotates its queries; partial
        rotary: the first ``cos.shape[-1]`` dims, the rest passed through)."""
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        rot = cos.shape[-1]
        if rot < x.shape[-1] and self._whole is None:
            # cos narrower than the head: either the function splits off the rotary dims itself (GPT-NeoX) or
            # uses half-size tables (gpt-oss), or the layer splits them before calling it (StableLM): probe once
            probe = x[..., :1, :].new_zeros(1, 1, 1, x.shape[-1])
            try:
                self.apply_fn(probe, probe, cos[..., :1, :].reshape(1, 1, rot), sin[..., :1, :].reshape(1, 1, rot))
                self._whole = True
            except RuntimeError:
                self._whole = False
        if rot < x.shape[-1] and not self._whole:  # the layer splits off its rotary dims before applying RoPE
            head = self.apply_fn(x[..., :rot], x[:, :1, :, :rot], cos, sin)[0]
            return torch.cat([head, x[..., rot:]], -1)
        return self.apply_fn(x, x[:, :1], cos, sin)[0]  # the function rotates a (q, k) pair: k is one head here

    def unrotate(self, x: torch.Tensor, cos, sin) -> torch.Tensor:
        """The inverse of ``rotate``: a rotation by minus the angle, divided by the square of the tables'
        attention scaling (``cos^2 + sin^2``; YaRN-style rotaries scale them)."""
        out = self.rotate(x, cos, -sin)
        s2 = (cos.float() ** 2 + sin.float() ** 2).mean(-1)[:, None, :, None].to(out.dtype)  # [b, 1, n, 1]
        if cos.shape[-1] < x.shape[-1] and not self._whole:
            rot = cos.shape[-1]
            return torch.cat([out[..., :rot] / s2, out[..., rot:]], -1)
        return out / s2

    def mean_rotation(self, positions: torch.Tensor, dim: int, dtype=torch.float32) -> torch.Tensor:
        """``M [d, d]`` with ``x @ M`` = the rotation of ``x`` averaged over ``positions [m]`` (a vector's
        expected direction at a random one of those positions). Every RoPE convention applies ``x cos + f(x) sin``
        (rotate-half, interleaved, split halves, YaRN's scaled tables), linear in the tables, so the averaged
        rotation is the rotation by the averaged tables: one ``[d, d]`` rotation, not ``m`` of them
        (``explicit_mean_rotation`` is the definition; tested equal on every architecture)."""
        eye = torch.eye(dim, dtype=dtype, device=positions.device)
        cos, sin = self.cos_sin(positions.view(1, -1), eye)
        cos, sin = (t.to(dtype).mean(1, keepdim=True).expand(1, dim, t.shape[-1]) for t in (cos, sin))
        return self.rotate(eye.view(1, 1, dim, dim), cos, sin)[0, 0]  # row i: basis vector i, rotated

    def explicit_mean_rotation(self, positions: torch.Tensor, dim: int, dtype=torch.float32) -> torch.Tensor:
        """``mean_rotation`` by its definition: every basis vector rotated to every position, averaged."""
        eye = torch.eye(dim, dtype=dtype, device=positions.device)
        cos, sin = self.cos_sin(positions.view(1, -1), eye)
        basis = eye.view(1, dim, 1, dim).expand(1, dim, positions.numel(), dim)  # every basis vector at every position
        return self.rotate(basis, cos, sin).mean(2)[0]  # [d (basis), d]


def rope_of(module) -> Rope | None:
    """The ``Rope`` of attention ``module`` in a model inside ``apply()`` (None: no session, or a model without
    rotary embeddings)."""
    import inspect
    import sys

    session = _SESSIONS.get(id(module))
    apply_fn = getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)
    if session is None or apply_fn is None:
        return None
    rotary = getattr(module, "rotary_emb", None)
    if rotary is None:
        rotary = next((m for m in session.model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)
    if rotary is None:
        return None
    layer_type = None
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        types = getattr(text_config(session.model.config), "layer_types", None)
        layer_type = types[module.layer_idx] if types else None
    return Rope(rotary, apply_fn, layer_type)


def query_positions(module, nq: int, n_keys: int, key_valid: torch.Tensor | None, device) -> torch.Tensor:
    """``[b, nq]`` positions of the last ``nq`` queries of the running forward: the forward's ``position_ids``
    where it was given them (``generate`` does), else counted over the real tokens of ``key_valid`` (from 0), else
    the last ``nq`` of the keys."""
    session = _SESSIONS.get(id(module))
    pos = (getattr(session, "_inputs", None) or {}).get("position_ids") if session is not None else None
    if pos is not None and pos.shape[-1] == nq:
        return pos.to(device).long()
    if key_valid is not None:
        return (key_valid.long().cumsum(-1) - 1).clamp(min=0)[:, -nq:].to(device)
    return torch.arange(n_keys - nq, n_keys, device=device).view(1, -1)


def model_features(model) -> list[str]:
    """The logit features of the model's attention that plain softmax attention would drop: ``softcap``
    (``attn_logit_softcapping``), ``sinks`` (per-head sink logits)."""
    cfg = text_config(model.config)
    out = []
    if getattr(cfg, "attn_logit_softcapping", None):
        out.append("softcap")
    if any(isinstance(getattr(m, "sinks", None), torch.Tensor) for m in model.modules()):
        out.append("sinks")
    return out


def text_config(config):
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


def layer_kinds(model) -> list[tuple[str, int | None]]:
    """``(kind, window)`` of every decoder layer, from the config as transformers reads it (``layer_types``, or
    ``sliding_window`` / ``use_sliding_window`` / ``max_window_layers`` where there is none)."""
    cfg = text_config(model.config)
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:  # transformers < 5.3: the config's own fields, read as those versions' DynamicCache does
        types = getattr(cfg, "layer_types", None)
        window = getattr(cfg, "sliding_window", None)
        if types is None:
            sliding = window is not None and getattr(cfg, "use_sliding_window", True) is not False
            types = ["sliding_attention" if sliding else "full_attention"] * cfg.num_hidden_layers
        return [(t, window if t == "sliding_attention" else None) for t in types]
    types, kwargs = get_layer_types_and_kwargs(cfg)
    return [(t, kw.get("sliding_window")) for t, kw in zip(types, kwargs)]


def plain_cache_bytes(model, n_tokens: int, batch: int = 1) -> tuple[int, int]:
    """``(all layers, full-attention layers)``: bytes of keys and values the *plain* model's cache holds after
    ``n_tokens`` (transformers' DynamicCache from the config: a sliding layer keeps its last ``window - 1``
    tokens). What a recipe saves is measured against this, and against its compressible (full-layer) part."""
    cfg = text_config(model.config)
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * batch * kv_heads(cfg) * d * next(model.parameters()).element_size()
    total = full = 0
    for kind, window in layer_kinds(model):
        held = n_tokens if kind == "full_attention" else min(n_tokens, window - 1)
        total += held * per_token
        full += held * per_token if kind == "full_attention" else 0
    return total, full


def kv_heads(config) -> int:
    """Key/value heads of a config (``num_attention_heads`` where there is no ``num_key_value_heads``: MHA)."""
    cfg = text_config(config)
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def check_model(model) -> None:
    """Refuse, before any work, a model whose attention longattn does not honour: every decoder layer must be a
    full or sliding-window causal attention layer (other kinds, encoder-decoders, training mode are named)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"model: expected a Hugging Face transformers model, got {type(model).__name__}")
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(f"model: {cfg.model_type!r} is an encoder-decoder; longattn runs decoder-only models")
    try:
        kinds = layer_kinds(model)
    except Exception as e:  # noqa: BLE001 - a config transformers cannot read layer types from
        raise ValueError(f"model: cannot read the layer kinds of {cfg.model_type!r} ({e})") from None
    bad = sorted({k for k, _ in kinds if k not in LAYER_KINDS})
    if bad:
        raise ValueError(f"model: {cfg.model_type!r} has layers of kind {', '.join(bad)}, which longattn does not "
                         f"support (it runs {', '.join(LAYER_KINDS)})")
    if getattr(text_config(cfg), "attention_chunk_size", None):
        raise ValueError(f"model: {cfg.model_type!r} uses chunked attention (attention_chunk_size), which longattn "
                         "does not support")
    bidirectional = sorted({type(m).__name__ for m in model.modules() if getattr(m, "is_causal", True) is False})
    if bidirectional:
        raise ValueError(f"model: {cfg.model_type!r} has non-causal attention ({', '.join(bidirectional)}); longattn "
                         "runs causal decoder attention")
    if model.training:
        raise ValueError("model: call model.eval() first (longattn runs inference; dropout would be ignored)")


def cache_kwarg_name(model) -> str:
    """``cache`` in recent transformers, ``past_key_values`` before."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def mask_query_length(query_length) -> int:
    """The query length a cache layer's ``get_mask_sizes`` is given: transformers < 5.3 passes the
    ``cache_position`` tensor, later versions the length."""
    return query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)


# ---- activation ---------------------------------------------------------------------------------------------
def activate(session) -> None:
    """Route ``session.model``'s attention through ``session.attend``: register the functions, remember the
    previous implementation (``session.prev_impl``) and switch the model to ``longattn``."""
    register()
    model = session.model
    ids = [id(m) for m in model.modules()]
    if any(i in _SESSIONS for i in ids):
        raise ValueError("model: longattn.apply() is already active on this model (nesting is not supported)")
    session.prev_impl = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    for i in ids:
        _SESSIONS[i] = session


def deactivate(session) -> None:
    """Undo ``activate`` (whatever part of it ran)."""
    for i in [i for i, s in _SESSIONS.items() if s is session]:
        del _SESSIONS[i]
    if getattr(session, "prev_impl", None) is not None:
        session.model.set_attn_implementation(session.prev_impl)
        session.prev_impl = None


def set_prefill_chunk(model, chunk: int | None):
    """Make ``model.generate`` prefill ``chunk`` tokens at a time; returns an undo function (None: nothing to
    undo)."""
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return None
    prev = getattr(gc, "prefill_chunk_size", None)
    gc.prefill_chunk_size = chunk

    def undo() -> None:
        gc.prefill_chunk_size = prev

    return undo


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


def _attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    session = _SESSIONS.get(id(module))
    if session is None:
        raise RuntimeError(
            "the 'longattn' attention implementation is only usable inside `with longattn.apply(model, recipe):` "
            "(this module's model is not inside one; did two models share one config object?)"
        )
    out = session.attend(module, query, key, value, attention_mask, scaling, call_features(module, kwargs))
    return out.transpose(1, 2).contiguous(), None


# ---- cache adoption -------------------------------------------------------------------------------------------
def install_cache_hook(model, on_cache, on_end=None):
    """A forward pre-hook on ``model`` that hands every forward a cache of ``LongattnLayer``s (``adopt_cache``)
    and tells ``on_cache(cache, inputs)`` (``inputs``: the forward's ``input_ids``, ``attention_mask`` and
    ``position_ids``, None where not given); with ``on_end``, a forward hook that calls ``on_end()`` when the
    forward returns. Returns the hook handles."""
    name = cache_kwarg_name(model)
    other = "past_key_values" if name == "cache" else "cache"

    def hook(module, args, kwargs):
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(model.config, "use_cache", True)
        given = kwargs.get(name)
        if other in kwargs and kwargs[other] is not None:  # the caller's cache under the other spelling
            if given is not None and given is not kwargs[other]:
                raise ValueError(f"{name} and {other}: two different caches given; pass one")
            given = kwargs.pop(other)
        cache = adopt_cache(given, use_cache, name, model.config)
        if cache is not None:
            kwargs[name] = cache
        on_cache(cache, {"input_ids": kwargs.get("input_ids", args[0] if args else None),
                         "attention_mask": kwargs.get("attention_mask"), "position_ids": kwargs.get("position_ids")})
        return args, kwargs

    handles = [model.register_forward_pre_hook(hook, with_kwargs=True)]
    if on_end is not None:
        handles.append(model.register_forward_hook(lambda module, args, kwargs, out: on_end(), with_kwargs=True))
    return handles


def adopt_cache(cache, use_cache: bool = True, name: str = "cache", config=None):
    """The cache a forward will use, its layers made ``LongattnLayer``s: a new ``DynamicCache`` (built from the
    model's config, so sliding-window layers hold their window as in plain transformers) when the call has none
    and caches, the caller's own otherwise (``DynamicLayer`` and ``DynamicSlidingWindowLayer`` are taken over
    without a copy); any other layer type is refused by name."""
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    from .cache import LongattnLayer

    if cache is None and use_cache:
        cache = DynamicCache(config=config) if config is not None else DynamicCache()
    if cache is None:
        return None
    if not isinstance(cache, Cache):
        raise ValueError(f"{name}: longattn needs a transformers Cache object, got {type(cache).__name__}")
    if getattr(cache, "layer_class_to_replicate", None) is not None:
        cache.layer_class_to_replicate = LongattnLayer
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, LongattnLayer):
            layer.detached = False  # a compressed cache is valid again inside an apply() block
            continue
        if type(layer) is DynamicSlidingWindowLayer:
            cache.layers[i] = LongattnLayer.adopt(layer, window=layer.sliding_window)
        elif type(layer) is DynamicLayer:
            cache.layers[i] = LongattnLayer.adopt(layer)
        else:
            raise ValueError(f"{name}: unsupported cache layer {type(layer).__name__} (layer {i}); use "
                             "DynamicCache (the default)")
    return cache
