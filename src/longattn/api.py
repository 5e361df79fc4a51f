"""``longattn.apply(model, recipe)``, ``Recipe`` and the ``name:key=value`` method parser."""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from . import registry

__all__ = ["Recipe", "apply", "parse", "parse_method", "method_kwargs", "SLOTS"]

SLOTS = ("prefill", "kv", "decode", "calibrate")


@dataclass(frozen=True)
class Recipe:
    """The slots of a method recipe; any may be None (dense there). ``calibrate`` (ACT) changes the dense
    attention itself, so it stands alone (with at most the no-op ``dense`` KV policy)."""

    prefill: Any = None
    kv: Any = None
    decode: Any = None
    calibrate: Any = None
    spec: str = ""  # the string it was parsed from, for records

    def __post_init__(self) -> None:
        from .kv.base import KVPolicy
        from .prefill.base import PrefillPattern

        if self.prefill is not None and not isinstance(self.prefill, PrefillPattern):
            raise ValueError(f"prefill must be a PrefillPattern or None, got {type(self.prefill).__name__}")
        if self.kv is not None and not isinstance(self.kv, KVPolicy):
            raise ValueError(f"kv must be a KVPolicy or None, got {type(self.kv).__name__}")
        if self.calibrate is not None:
            from .calibrate.base import Calibration

            if not isinstance(self.calibrate, Calibration):
                raise ValueError(f"calibrate must be a Calibration or None, got {type(self.calibrate).__name__}")
            others = [m.name for m in (self.prefill, self.kv, self.decode)
                      if m is not None and not getattr(m, "is_noop", False)]
            if others:
                raise ValueError(f"calibrate: {self.calibrate.name} recalibrates the dense attention of every query; "
                                 f"it cannot be combined with {', '.join(others)} (give it alone)")
        if self.decode is not None:
            from .decode.base import DecodeSelector

            if not isinstance(self.decode, DecodeSelector):
                raise ValueError(f"decode must be a DecodeSelector or None, got {type(self.decode).__name__}")
            kv = self.kv
            if kv is not None and kv.acts_at_decode:
                raise ValueError(f"decode: {self.decode.name} cannot be combined with {kv.name}'s decode-time "
                                 "eviction (decode_budget); both would decide what each step attends to")
            if kv is not None and not kv.is_noop and self.decode.needs_full_cache:
                raise ValueError(f"decode: {self.decode.name} needs the full cache as the prompt filled it; it cannot "
                                 f"follow the KV policy {kv.name} (allowed with a KV policy: quest, token_select, "
                                 "landmark, lserve_pages, longheads)")

    def __str__(self) -> str:
        if self.spec:
            return self.spec
        parts = [_spec_of(m) for m in (self.prefill, self.kv, self.decode, self.calibrate) if m is not None]
        return "+".join(parts) or "dense"


def _spec_of(method) -> str:
    fields = [
        f"{f.name}={getattr(method, f.name)}"
        for f in dataclasses.fields(method)
        if f.init and getattr(method, f.name) != f.default
    ]
    return ":".join([method.name] + fields)


def _convert(value: str, typ, name: str, method: str):
    origin = typing.get_origin(typ)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value.lower() == "none":
            return None
        typ = args[0]
    try:
        if typ is bool:
            if value.lower() in ("1", "true", "yes"):
                return True
            if value.lower() in ("0", "false", "no"):
                return False
            raise ValueError
        if typ is int:
            return int(value)
        if typ is float:
            return float(value)
        return typ(value)
    except (TypeError, ValueError):
        allowed = " (true/false, yes/no or 1/0)" if typ is bool else ""
        raise ValueError(f"{method}: {name}={value!r} is not a valid {getattr(typ, '__name__', typ)}{allowed}") from None


def method_kwargs(spec: str, kind: str | None = None) -> tuple[type, dict]:
    """``"snapkv:ratio=0.5"`` -> ``(SnapKV, {"ratio": 0.5})``: the class and its converted arguments (old setting
    names mapped, duplicates refused), without building the instance."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"method spec must be a non-empty string like 'snapkv:ratio=0.5', got {spec!r}")
    name, *kvs = spec.strip().split(":")
    entry = registry.get(name.strip(), kind or SLOTS)
    cls = entry.cls
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    renamed = getattr(cls, "renamed", None) or {}
    given: dict[str, str] = {}
    for item in kvs:
        if "=" not in item:
            raise ValueError(f"{name}: expected key=value, got {item!r}")
        k, v = (s.strip() for s in item.split("=", 1))
        if k not in fields and k not in renamed:
            raise ValueError(f"{name}: unknown argument {k!r}; allowed: {', '.join(fields) or '(none)'}")
        if k in given:
            raise ValueError(f"{name}: {k}= is given twice ({given[k]!r} and {v!r}); give it once")
        given[k] = v
    given = registry.canonical_kwargs(cls, given, name)
    return cls, {k: _convert(v, hints.get(k, str), k, name) for k, v in given.items()}


def parse_method(spec: str, kind: str | None = None):
    """``"snapkv:ratio=0.5:obs_window=32"`` -> ``SnapKV(ratio=0.5, obs_window=32)``."""
    cls, kwargs = method_kwargs(spec, kind)
    try:
        return cls(**kwargs)
    except ValueError as e:  # the method's own check: say which method it is
        name = getattr(cls, "name", None) or spec.split(":", 1)[0].strip()
        if str(e).startswith((f"{name}:", f"{name} ")):
            raise
        raise ValueError(f"{name}: {e}") from None


def parse(spec: str | Recipe | None) -> Recipe:
    """Parse a recipe: specs of different slots joined by ``+`` (``"sink_window+snapkv:ratio=0.5"``); the slot
    comes from the method's registry kind, or is given explicitly as ``kv=snapkv:ratio=0.5``. ``dense`` (or an
    empty string) is the empty recipe."""
    if isinstance(spec, Recipe):
        return spec
    if spec is None:
        return Recipe(spec="dense")
    if getattr(spec, "kind", None) in SLOTS and dataclasses.is_dataclass(spec):  # one method object
        return Recipe(**{spec.kind: spec}, spec=_spec_of(spec))
    if not isinstance(spec, str):
        raise ValueError(f"recipe must be a string or Recipe, got {type(spec).__name__}")
    slots: dict[str, Any] = {}
    parts = [p.strip() for p in spec.split("+")]
    if spec.strip() and any(not p for p in parts):
        raise ValueError(f"recipe {spec!r}: an empty method between '+' signs; join method specs like "
                         "vertical_slash+snapkv:ratio=0.5 (or give dense)")
    for part in parts:
        if not part:
            continue
        kind = None
        head = part.split(":", 1)[0]
        if "=" in head:
            kind, part = (s.strip() for s in part.split("=", 1))
            if kind not in SLOTS:
                raise ValueError(f"recipe slot must be one of {', '.join(SLOTS)}, got {kind!r}")
        method = parse_method(part, kind)
        slot = method.kind
        if slot not in SLOTS:
            raise ValueError(f"{method.name!r} is a {slot}, not a method (allowed slots: {', '.join(SLOTS)})")
        if slot in slots:
            raise ValueError(f"recipe {spec!r} fills the {slot} slot twice")
        slots[slot] = method
    return Recipe(prefill=slots.get("prefill"), kv=slots.get("kv"), decode=slots.get("decode"),
                  calibrate=slots.get("calibrate"), spec=spec.strip() or "dense")


@contextlib.contextmanager
def apply(model, recipe: str | Recipe | None = None, tokenizer=None):
    """Run ``model`` (forward / ``generate``) with ``recipe`` inside the block; restore it exactly on exit.

    Yields the session (``session.method_s``: seconds spent inside the methods; ``session.cache``: the last
    cache the model used). ``tokenizer``: for methods that run the model on text of their own (KVzip's
    reconstruction prompt)."""
    from .hf import check_model
    from .session import Session

    recipe = parse(recipe)
    check_model(model)
    session = Session(model, recipe, tokenizer)
    try:
        session.install()
    except BaseException:
        session.remove()  # undo whatever part was installed
        raise
    try:
        yield session
    finally:
        session.remove()
