"""Name -> class for every method, task and backend; the CLI builds anything from a name plus arguments.

Method modules are *discovered*: each family package (``prefill``, ``kv``, ``decode``, ``bench.tasks``) imports
every module in it (``discover``), so a new file in a family registers itself (``@register``), is listed by
``longattn list``, exported in the public API (the family's ``__all__``) and picked up by the generic tests
through the ``examples`` its class declares. Modules whose name starts with ``_`` are private helpers.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
import warnings
from dataclasses import dataclass

__all__ = ["KINDS", "FAMILIES", "Entry", "register", "get", "names", "entries", "discover"]

KINDS = ("prefill", "kv", "decode", "calibrate", "task", "backend", "mixer")


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str
    cls: type
    paper: str  # "Title (venue year) <url>"
    summary: str


_REGISTRY: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}


def register(name: str, kind: str, *, paper: str = "", summary: str = ""):
    """Class decorator: ``@register("snapkv", "kv", paper=..., summary=...)``.

    A class may declare ``renamed = {"old": "new"}``: settings renamed to the project's one name per idea; the
    old spelling keeps working (constructor and spec strings) with a ``FutureWarning``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")

    def deco(cls):
        doc = (cls.__doc__ or "").strip().splitlines()
        _REGISTRY[kind][name] = Entry(name, kind, cls, paper, summary or (doc[0] if doc else ""))
        cls.name = name
        cls.kind = kind
        if getattr(cls, "renamed", None):
            init = cls.__init__

            @functools.wraps(init)
            def __init__(self, *args, **kwargs):
                init(self, *args, **canonical_kwargs(type(self), kwargs))

            cls.__init__ = __init__
        return cls

    return deco


def canonical_kwargs(cls, kwargs: dict, where: str | None = None) -> dict:
    """``kwargs`` with the old spellings of renamed settings (``cls.renamed``) replaced by the new ones, each
    with a FutureWarning; giving both spellings is an error."""
    renamed = getattr(cls, "renamed", None) or {}
    out = dict(kwargs)
    for old, new in renamed.items():
        if old in out:
            what = where or getattr(cls, "name", cls.__name__)
            if new in out:
                raise ValueError(f"{what}: {old}= is the old name of {new}=; give one of them")
            warnings.warn(f"{what}: {old}= is deprecated, use {new}= (same meaning)", FutureWarning, stacklevel=4)
            out[new] = out.pop(old)
    return out


#: kind -> the package whose modules hold that kind's classes
FAMILIES = {"prefill": "longattn.prefill", "kv": "longattn.kv", "decode": "longattn.decode",
            "calibrate": "longattn.calibrate", "task": "longattn.bench.tasks", "mixer": "longattn.mixers"}


def discover(package: str, namespace: dict) -> list[str]:
    """Import every module of ``package`` (``base`` first, ``_private`` ones skipped), put the *classes* each
    module exports (its ``__all__``) into ``namespace`` (the package's globals) and return their names sorted:
    the package's ``__all__``. Functions stay importable from their modules."""
    pkg = importlib.import_module(package)
    mods = sorted((m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")),
                  key=lambda n: (n != "base", n))
    names = set()
    for name in mods:
        mod = importlib.import_module(f"{package}.{name}")
        for attr in getattr(mod, "__all__", ()):
            obj = getattr(mod, attr)
            if inspect.isclass(obj):
                namespace[attr] = obj
                names.add(attr)
    return sorted(names)


def _load_all() -> None:
    # importing the family packages imports (and so registers) every method module
    for pkg in FAMILIES.values():
        importlib.import_module(pkg)


def get(name: str, kind: str | tuple[str, ...] | None = None) -> Entry:
    """The entry of ``name`` among ``kind`` (one kind, a tuple of kinds, or all)."""
    _load_all()
    kinds = [kind] if isinstance(kind, str) else list(kind or KINDS)
    for k in kinds:
        if k not in _REGISTRY:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {k!r}")
        if name in _REGISTRY[k]:
            return _REGISTRY[k][name]
    allowed = ", ".join(sorted(n for k in kinds for n in _REGISTRY[k]))
    where = f" of kind {'/'.join(kinds)}" if kind else ""
    raise ValueError(f"unknown method {name!r}{where}; allowed: {allowed}")


def names(kind: str) -> list[str]:
    _load_all()
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return sorted(_REGISTRY[kind])


def entries(kind: str | None = None) -> list[Entry]:
    _load_all()
    kinds = [kind] if kind else list(KINDS)
    for k in kinds:
        if k not in _REGISTRY:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {k!r}")
    return [e for k in kinds for _, e in sorted(_REGISTRY[k].items())]
