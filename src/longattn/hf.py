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

import torch
from transformers.cache_utils import DynamicLayer as BaseLayer

__all__ = ["NAME", "SUPPORTED_MODEL_TYPES", "BaseLayer", "activate", "adopt_cache", "cache_kwarg_name",
           "check_model", "deactivate", "install_cache_hook", "mask_query_length", "register", "set_prefill_chunk"]

NAME = "longattn"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# id(module) -> the active Session of the model that module belongs to (every submodule of an applied model), so
# the registered attention function never mixes up two models, even two that share one config object
_SESSIONS: dict = {}
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


def check_model(model) -> None:
    """Refuse, before any work, a model whose attention longattn does not honour."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model: unsupported model type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


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


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    session = _SESSIONS.get(id(module))
    if session is None:
        raise RuntimeError(
            "the 'longattn' attention implementation is only usable inside `with longattn.apply(model, recipe):` "
            "(this module's model is not inside one; did two models share one config object?)"
        )
    if kwargs.get("output_attentions"):
        raise ValueError("output_attentions=True is not supported by longattn (no N x N weights are formed)")
    out = session.attend(module, query, key, value, attention_mask, scaling, window=kwargs.get("sliding_window"))
    return out.transpose(1, 2).contiguous(), None


# ---- cache adoption -------------------------------------------------------------------------------------------
def install_cache_hook(model, on_cache):
    """A forward pre-hook on ``model`` that hands every forward a cache of ``LongattnLayer``s (``adopt_cache``)
    and tells ``on_cache(cache)``; returns the hook handle."""
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
        cache = adopt_cache(given, use_cache, name)
        if cache is not None:
            kwargs[name] = cache
        on_cache(cache)
        return args, kwargs

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def adopt_cache(cache, use_cache: bool = True, name: str = "cache"):
    """The cache a forward will use, its layers made ``LongattnLayer``s: a new ``DynamicCache`` when the call
    has none and caches, the caller's own otherwise (uncompressed ``DynamicLayer``s are taken over without a
    copy); anything else is refused by name."""
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

    from .cache import LongattnLayer

    if cache is None and use_cache:
        cache = DynamicCache()
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
    return cache
