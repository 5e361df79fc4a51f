"""The state of one ``apply()`` and the per-call routing of the attention function.

Per call of the registered attention function (``hf._attention`` -> ``Session.attend``), in this order:
1. decode (``q_len == 1``) with a decode selector: the selector picks the tokens, ``ops.decode`` attends;
2. decode with a KV policy that acts while generating (``policy.acts_at_decode``, H2O's eviction): the
   policy's own ``decode_attend`` hook;
3. a compressed cache layer: attention over the kept prefix plus the tokens appended since (``ops.ragged``),
   and, for a chunked policy, compression of the chunk just added;
4. otherwise (prefill, or decode over an uncompressed cache): the recipe's prefill pattern for multi-token
   calls, dense SDPA else; then, at the end of prefill, the KV policy compresses the layer
   (``policy.compress_layer``) and the decode selector sees the prefill (``selector.on_prefill``).

The session's public API (used by bench, profile and tests instead of its attributes): ``cache``,
``cache_kwarg``, the read-only counters ``method_s`` / ``compressions`` / ``decode_stats``,
``set_compression()`` / ``no_compression()``, ``observe()`` and ``override_attention()``.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref

from . import hf
from .ops.dense import dense_attention
from .ops.flex import compile_seconds
from .ops.ragged import attend_compressed

__all__ = ["Session"]


class Session:
    """State of one ``apply()``: the recipe, the model's cache, timers and hooks."""

    def __init__(self, model, recipe, tokenizer=None) -> None:
        self.model = model
        self.recipe = recipe
        self.tokenizer = tokenizer
        self.num_layers = getattr(model.config, "num_hidden_layers", 1)
        self.prev_impl = None  # the attention implementation to restore (set by hf.activate)
        self._cache = None
        self._method_s = 0.0  # time spent inside the methods (layouts, scoring, compression, selection)
        self._attn_s = {"prefill": 0.0, "decode": 0.0}  # time inside full-attention layers' attention
        self._compressions = 0
        self._compress = True
        self._observers: list = []
        self._observed_s = 0.0  # time spent in the observers (measurements on the side, not attention)
        self._override = None
        self._decode_stats: dict = {}
        self._decode_shared: dict = {}  # per-step state shared across layers (TidalDecode's positions)
        self._undo_chunk = None
        self._hook = None
        self._cache_kw = hf.cache_kwarg_name(model)
        self._caches: list = []  # weak references to every cache this session adopted
        self._inputs: dict = {}  # the running forward's input_ids, attention_mask and position_ids
        self._scoring = False  # a method's own scoring forward (KVzip's reconstruction): dense, nothing compressed

    # ---- public, read-only -------------------------------------------------------------------------------
    @property
    def cache(self):
        """The cache the model used last (the one the hook handed to its latest forward)."""
        return self._cache

    @property
    def cache_kwarg(self) -> str:
        """Name of the model's cache argument (``cache`` or ``past_key_values``, by transformers version)."""
        return self._cache_kw

    @property
    def method_s(self) -> float:
        """Seconds spent inside the methods: layouts, scoring, compression, decode-time selection."""
        return self._method_s

    @property
    def compressions(self) -> int:
        """Cache layers compressed so far (one per layer and prefill, or per chunk)."""
        return self._compressions

    @property
    def attention_seconds(self) -> dict:
        """Seconds inside the attention of the full-attention layers (what a method can change; sliding-window
        layers excluded), methods included: ``{"prefill": multi-token calls, "decode": one-token calls}`` (a
        copy). A dense run's share of its prefill / decode time is the Amdahl limit's ``s``."""
        return dict(self._attn_s)

    @property
    def observed_seconds(self) -> float:
        """Seconds spent in the observers (``observe``) so far: measurements on the side, left out of
        ``attention_seconds``."""
        return self._observed_s

    @property
    def decode_stats(self) -> dict:
        """Decode selectors: ``select_s`` seconds selecting, ``selected`` tokens attended and ``possible`` tokens
        cached, summed over layers and steps (a copy)."""
        return dict(self._decode_stats)

    @property
    def compression_enabled(self) -> bool:
        return self._compress

    # ---- public, control -----------------------------------------------------------------------------------
    def set_compression(self, enabled: bool) -> None:
        """Turn the KV policy's compression on or off for the following forwards (the bench turns it off once the
        context is in: the question and the answer are never compressed)."""
        self._compress = bool(enabled)

    @contextlib.contextmanager
    def no_compression(self):
        """Forwards inside the block are not compressed (e.g. to fill a reference cache)."""
        prev, self._compress = self._compress, False
        try:
            yield self
        finally:
            self._compress = prev

    @contextlib.contextmanager
    def observe(self, fn):
        """Call ``fn(layer_idx, query, key, value, key_valid)`` on every multi-token attention call inside the
        block (profiling, recall); the observer's own time is not counted in ``method_s``."""
        self._observers.append(fn)
        try:
            yield self
        finally:
            self._observers.remove(fn)

    @contextlib.contextmanager
    def override_attention(self, fn):
        """Inside the block, ``fn(layer_idx, q, k, v, key_valid, scale) -> out`` replaces the multi-token attention
        of the full-attention layers (sliding-window layers keep theirs; DuoAttention's gate training mixes full
        and streaming attention this way, the head scores mask or measure heads). ``fn`` computes plain softmax
        attention: a model with softcap or attention sinks on its full layers is refused here."""
        feats = hf.model_features(self.model)
        if feats:
            raise ValueError(f"override_attention: the model's full-attention layers use {', '.join(feats)}, which "
                             "the override would drop")
        prev, self._override = self._override, fn
        try:
            yield self
        finally:
            self._override = prev

    # ---- install / remove ------------------------------------------------------------------------------
    def install(self) -> None:
        cfg = self.model.config
        kv, sel, pre = self.recipe.kv, self.recipe.decode, self.recipe.prefill
        if kv is not None:
            kv.prepare(self.model)
        if sel is not None:
            sel.prepare(self.model)
        if self.recipe.calibrate is not None:
            self.recipe.calibrate.prepare(self.model)
        n_layers = getattr(pre, "num_layers", None)
        if n_layers is not None and n_layers != cfg.num_hidden_layers:
            raise ValueError(f"prefill: the mixed profile {pre.profile!r} has {n_layers} layers, the model has "
                             f"{cfg.num_hidden_layers}")
        hf.activate(self)
        if self.recipe.calibrate is not None:
            self.recipe.calibrate.install(self.model)
        if kv is not None and kv.repeat:
            self._undo_chunk = hf.set_prefill_chunk(self.model, kv.chunk)
        self._hook = hf.install_cache_hook(self.model, self._on_cache,
                                           self._on_forward_end if kv is not None and kv.model_pass else None)

    def remove(self) -> None:
        if self._hook is not None:
            for h in self._hook:
                h.remove()
            self._hook = None
        self._detach_caches()
        if self.recipe.calibrate is not None:
            self.recipe.calibrate.remove(self.model)
        hf.deactivate(self)
        if self._undo_chunk is not None:
            self._undo_chunk()
            self._undo_chunk = None

    def _on_cache(self, cache, inputs: dict | None = None) -> None:
        self._cache = cache
        self._inputs = inputs or {}
        if cache is not None and not any(r() is cache for r in self._caches):
            self._caches.append(weakref.ref(cache))

    @contextlib.contextmanager
    def scoring_pass(self):
        """Forwards inside the block are a method's own scoring passes (KVzip's context reconstruction): dense
        attention, nothing compressed, no selector state built; observers still see them."""
        prev, self._scoring = self._scoring, True
        try:
            yield self
        finally:
            self._scoring = prev

    def _on_forward_end(self) -> None:
        """After a model forward: a policy that scores with forwards of its own (``model_pass``) compresses the
        cache once the prefill is in."""
        policy, cache, ids = self.recipe.kv, self._cache, self._inputs.get("input_ids")
        if self._scoring or not self._compress or policy.is_noop or cache is None or ids is None:
            return
        if ids.shape[-1] <= 1 or getattr(cache, "_longattn_scored", False):
            return
        t0 = time.perf_counter()
        policy.after_prefill(self, ids, self._inputs.get("attention_mask"), self._inputs.get("position_ids"))
        cache._longattn_scored = True
        self._compressions += sum(1 for layer in cache.layers if getattr(layer, "compressed", False))
        self._method_s += time.perf_counter() - t0

    def _detach_caches(self) -> None:
        """A compressed layer (per-head budgets, logical positions) is valid only inside apply(): mark the layers
        of every cache this session compressed so that a later use outside refuses with a clear error (an
        uncompressed layer is an ordinary DynamicLayer and stays usable)."""
        from .cache import LongattnLayer

        for ref in self._caches:
            cache = ref()
            for layer in getattr(cache, "layers", []) if cache is not None else []:
                if isinstance(layer, LongattnLayer) and layer.compressed:
                    layer.detached = True
        self._caches.clear()

    # ---- the attention function ---------------------------------------------------------------------------
    def attend(self, module, query, key, value, key_valid, scaling, features=None):
        """``_attend``, timed into ``attention_seconds`` on full-attention layers: the call's own observers and
        FlexAttention compilation are left out (so a compilation in a sliding-window layer is not taken off the
        full layers' time)."""
        t0, o0, c0 = time.perf_counter(), self._observed_s, compile_seconds()
        out = self._attend(module, query, key, value, key_valid, scaling, features)
        if features is None or features.window is None:
            spent = time.perf_counter() - t0 - (self._observed_s - o0) - (compile_seconds() - c0)
            self._attn_s["prefill" if query.shape[2] > 1 else "decode"] += spent
        return out

    def _attend(self, module, query, key, value, key_valid, scaling, features=None):
        """Attention output ``[b, hq, nq, d]`` of one layer's call (see the module docstring for the order).
        ``features``: the call's sliding window, softcap and sinks (``hf.Features``). Methods run on full
        attention layers; a sliding-window layer attends densely inside its window (its cache already holds at
        most the window), and is compressed only while the whole prompt fits in the window."""
        f = features if features is not None else hf.Features()
        window = f.window
        layer_idx = getattr(module, "layer_idx", 0)
        scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
        layer = self._layer(layer_idx)
        nq = query.shape[2]
        if nq > 1 and self._observers:
            t_obs = time.perf_counter()
            for obs in self._observers:
                obs(layer_idx, query, key, value, key_valid)
            self._observed_s += time.perf_counter() - t_obs
        if self._scoring:
            return dense_attention(query, key, value, key_valid, scale, window, f.softcap, f.sinks)
        cal = self.recipe.calibrate
        if cal is not None and window is None and self._override is None:  # full-attention layers
            kv_phys = key_valid if layer is None else layer.physical_key_valid(key_valid)
            return cal.attend(layer, layer_idx, query, key, value, kv_phys, scale, f.softcap)
        policy, sel = self.recipe.kv, self.recipe.decode
        if nq == 1 and layer is not None and sel is not None and window is None:
            return self._decode_select(layer, layer_idx, query, key, value, key_valid, scale, f, module)
        if nq == 1 and layer is not None and policy is not None and policy.acts_at_decode and layer.prefix is None:
            t0 = time.perf_counter()
            out = policy.decode_attend(layer, query, key_valid, scale, f, module)
            self._method_s += time.perf_counter() - t0
            return out
        if layer is not None and layer.compressed:
            out = attend_compressed(layer, query, key_valid, scale, f.softcap, f.sinks, window)
            k0 = layer.prefix_physical_len
            self._maybe_compress(layer, layer_idx, module, query, layer.keys[..., k0:, :], layer.values[..., k0:, :],
                                 key_valid)
            self._selector_prefill(layer, layer_idx, query, key_valid, window)
            return out

        pattern = self.recipe.prefill
        if nq > 1 and self._override is not None and window is None:  # full-attention layers only
            out = self._override(layer_idx, query, key, value, key_valid, scale)
        elif nq > 1 and pattern is not None and window is None:
            stats: dict = {}
            # the model is causal whatever the pattern's own default (2-D forms are non-causal)
            out = pattern.for_layer(layer_idx).attend(
                query, key, value, scale=scale, key_valid=key_valid, causal=True, stats=stats, softcap=f.softcap,
                sinks=f.sinks,
            )
            self._method_s += stats.get("est_s", 0.0)
        else:
            out = dense_attention(query, key, value, key_valid, scale, window, f.softcap, f.sinks)
        self._maybe_compress(layer, layer_idx, module, query, key, value, key_valid)
        self._selector_prefill(layer, layer_idx, query, key_valid, window)
        return out

    def _layer(self, layer_idx: int):
        from .cache import LongattnLayer

        cache = self._cache
        if cache is None or layer_idx >= len(cache.layers):
            return None
        layer = cache.layers[layer_idx]
        return layer if isinstance(layer, LongattnLayer) else None

    def _selector_prefill(self, layer, layer_idx, query, key_valid, window=None) -> None:
        """Let the decode selector see a multi-token forward (its representatives, clusters) once the layer holds
        what the KV policy kept (full attention layers only: selectors select inside full layers)."""
        sel = self.recipe.decode
        if sel is None or layer is None or query.shape[2] <= 1 or layer.prefix is not None or window is not None:
            return
        t0 = time.perf_counter()
        sel.on_prefill(layer, layer_idx, query, layer.keys, layer.physical_key_valid(key_valid))
        self._method_s += time.perf_counter() - t0

    def _decode_select(self, layer, layer_idx, query, key, value, key_valid, scale, f, module=None):
        """One decode step through the recipe's selector (dense on its ``dense_layers``)."""
        from .decode.base import Step

        sel = self.recipe.decode
        if layer.prefix is not None:
            raise ValueError(f"decode: {sel.name} needs every kv head to hold the same tokens count; the KV policy "
                             f"{self.recipe.kv.name} kept per-head budgets (ragged cache)")
        kv_phys = layer.physical_key_valid(key_valid)
        if sel.is_dense(layer_idx):
            return dense_attention(query, key, value, kv_phys, scale, None, f.softcap, f.sinks)
        step = Step(query, key, value, kv_phys, layer, layer_idx, self.num_layers, scale, self._decode_shared,
                    f.softcap, f.sinks, module)
        before = self._decode_stats.get("select_s", 0.0)
        out = sel.attend(step, self._decode_stats)
        self._method_s += self._decode_stats.get("select_s", 0.0) - before
        return out

    def _maybe_compress(self, layer, layer_idx, module, query, tail_k, tail_v, key_valid) -> None:
        """Run the KV policy on the tokens this forward added, when it is the prefill's (first forward, or
        every forward of a chunked policy) and compression is on."""
        policy = self.recipe.kv
        nq = query.shape[2]
        if layer is None or policy is None or policy.is_noop or not self._compress or nq <= 1 or policy.model_pass:
            return
        if layer.tail_len != nq or (layer.compressed and not policy.repeat):
            return
        t0 = time.perf_counter()
        kv_tail = None if key_valid is None else key_valid[:, key_valid.shape[1] - nq :]
        policy.compress_layer(layer, query, tail_k, tail_v, kv_tail, module, layer_idx, self.num_layers)
        self._compressions += 1
        self._method_s += time.perf_counter() - t0
