"""Saved contexts: prefill and compress a context once, write the compressed cache to a file, answer any number of
later questions from it (kvpress users asked for this: NVIDIA/kvpress#170).

``save_context(path, cache, model, recipe, ...)`` writes one safetensors file holding every layer's cache as the
session left it: the uniform keys/values, the packed per-head ragged prefix with its positions and lengths, the
kept positions, the sliding window and what left it, H2O's score accumulator and the decode selector's state
(its typed ``DecodeState`` fields; page metadata is recomputed from the keys on first use). The header carries a
format version, a fingerprint of the model (its config and a sample of its weights) and the recipe's canonical
spec and settings. ``load_context(path, model, recipe)`` rebuilds the cache and refuses, with one line, another
model, another recipe, a newer format or a damaged file. Answers from a loaded context equal the in-memory path
token for token (tested).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

__all__ = ["FORMAT", "save_context", "load_context", "model_fingerprint"]

FORMAT = "longattn.context/1"


def model_fingerprint(model) -> str:
    """A cheap identity of a model: its config and the first values of four of its weights (first, two middle,
    last by name), hashed."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    names = sorted(n for n, _ in model.named_parameters())
    params = dict(model.named_parameters())
    for n in {names[0], names[len(names) // 3], names[2 * len(names) // 3], names[-1]}:
        h.update(n.encode())
        h.update(params[n].detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def _state_fields(state) -> tuple[dict, dict]:
    """``(tensors, scalars)`` of a typed decode state (dataclass)."""
    tensors, scalars = {}, {}
    for f in dataclasses.fields(state):
        val = getattr(state, f.name)
        if isinstance(val, torch.Tensor):
            tensors[f.name] = val
        elif val is None or isinstance(val, (int, float, str, bool)):
            scalars[f.name] = val
        else:
            raise ValueError(f"save_context: the decode state {type(state).__name__}.{f.name} ({type(val).__name__}) "
                             "cannot be saved (an offloaded store); save before offloading, or use offload=false")
    return tensors, scalars


def save_context(path, cache, model, recipe, *, n_tokens: int | None = None, meta: dict | None = None) -> Path:
    """Write ``cache`` (a cache filled inside ``apply(model, recipe)``) to ``path`` (safetensors)."""
    from safetensors.torch import save_file

    from . import api
    from .bench.records import method_settings, recipe_key
    from .cache import LongattnLayer, PageMeta
    from .cache.state import DecodeState

    recipe = api.parse(recipe)
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for i, layer in enumerate(cache.layers):
        if not isinstance(layer, LongattnLayer):
            raise ValueError(f"save_context: layer {i} is a {type(layer).__name__}; save a cache filled inside "
                             "longattn.apply()")
        info = {"window": layer.window, "dropped": layer.dropped, "prefix_logical_len": layer.prefix_logical_len,
                "initialized": bool(layer.is_initialized), "states": {}}
        for name in ("keys", "values", "kept_positions", "scores"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                tensors[f"{i}.{name}"] = t.contiguous()
        if layer.prefix is not None:
            p = layer.prefix
            for name in ("keys", "values", "positions", "lengths"):
                tensors[f"{i}.prefix.{name}"] = getattr(p, name).contiguous()
            info["prefix_logical"] = p.logical_len
        for key, state in layer.decode_state.items():
            if isinstance(state, PageMeta):
                continue  # recomputed from the keys when first used
            if not isinstance(state, DecodeState):
                raise ValueError(f"save_context: unknown decode state {key!r} in layer {i}")
            ts, sc = _state_fields(state)
            cls = f"{type(state).__module__}.{type(state).__qualname__}"
            info["states"][key] = {"class": cls, "scalars": sc, "tensors": sorted(ts)}
            for name, t in ts.items():
                tensors[f"{i}.state.{key}.{name}"] = t.contiguous()
        layers.append(info)
    header = {"format": FORMAT, "model": model_fingerprint(model), "model_type": model.config.model_type,
              "recipe": recipe_key(recipe), "settings": method_settings(recipe), "layers": layers,
              "n_tokens": n_tokens, "dtype": str(next(model.parameters()).dtype), **(meta or {})}
    path = Path(path)
    from .outputs import check_output_file

    check_output_file(path, "--out", overwrite=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={"longattn": json.dumps(header, default=str)})
    tmp.replace(path)
    return path


def read_header(path) -> dict:
    """The header of a saved context (``ValueError`` for a file that is not one)."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--context: no such file {str(p)!r}")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        header = json.loads(meta["longattn"])
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise ValueError(f"--context: {str(p)!r} is not a longattn saved context ({type(e).__name__}: {e})") from None
    return header


def load_context(path, model, recipe=None):
    """The cache saved in ``path`` for ``model`` (``recipe``: must be the one it was made with; None takes the
    file's). Returns ``(cache, header)``; the cache is used inside ``apply(model, header["recipe"])``."""
    import importlib

    from safetensors import safe_open
    from transformers import DynamicCache

    from . import api
    from .bench.records import recipe_key
    from .cache import LongattnLayer, RaggedKV

    header = read_header(path)
    fmt = header.get("format", "")
    if fmt != FORMAT:
        raise ValueError(f"--context: {path} has format {fmt!r}; this longattn reads {FORMAT!r} (made by a newer "
                         "longattn? upgrade, or compress the context again)")
    if header.get("model") != model_fingerprint(model):
        raise ValueError(f"--context: {path} was made with another model ({header.get('model_type')}, fingerprint "
                         f"{header.get('model')}); load it into the model it was compressed with")
    if recipe is not None and recipe_key(api.parse(recipe)) != header["recipe"]:
        raise ValueError(f"--context: {path} was compressed with the recipe {header['recipe']!r}, not "
                         f"{recipe_key(api.parse(recipe))!r}; use that recipe (or none: the file's)")
    dev = next(model.parameters()).device
    cache = DynamicCache()
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        get = lambda name: f.get_tensor(name).to(dev) if name in names else None  # noqa: E731
        for i, info in enumerate(header["layers"]):
            layer = LongattnLayer(window=info["window"])
            if info["initialized"]:
                k, v = get(f"{i}.keys"), get(f"{i}.values")
                layer.lazy_initialization(k, v)
                layer.keys, layer.values = k, v
            layer.dropped = info["dropped"]
            layer.prefix_logical_len = info["prefix_logical_len"]
            layer.kept_positions = get(f"{i}.kept_positions")
            layer.scores = get(f"{i}.scores")
            if "prefix_logical" in info:
                layer.prefix = RaggedKV(get(f"{i}.prefix.keys"), get(f"{i}.prefix.values"),
                                        get(f"{i}.prefix.positions"), f.get_tensor(f"{i}.prefix.lengths"),
                                        info["prefix_logical"])
            for key, st in info["states"].items():
                mod, _, qual = st["class"].rpartition(".")
                if not mod.startswith("longattn."):
                    raise ValueError(f"--context: {path} names a decode state outside longattn ({st['class']!r})")
                cls = getattr(importlib.import_module(mod), qual)
                fields = dict(st["scalars"], **{n: get(f"{i}.state.{key}.{n}") for n in st["tensors"]})
                layer.decode_state[key] = cls(**fields)
            cache.layers.append(layer)
    return cache, header
