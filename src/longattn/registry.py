"""Name -> class for every method, task and backend; the CLI builds anything from a name plus arguments."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KINDS", "Entry", "register", "get", "names", "entries"]

KINDS = ("prefill", "kv", "decode", "task", "backend")


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str
    cls: type
    paper: str  # "Title (venue year) <url>"
    summary: str


_REGISTRY: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}


def register(name: str, kind: str, *, paper: str = "", summary: str = ""):
    """Class decorator: ``@register("snapkv", "kv", paper=..., summary=...)``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")

    def deco(cls):
        doc = (cls.__doc__ or "").strip().splitlines()
        _REGISTRY[kind][name] = Entry(name, kind, cls, paper, summary or (doc[0] if doc else ""))
        cls.name = name
        cls.kind = kind
        return cls

    return deco


def _load_all() -> None:
    # importing the method packages registers their classes
    from . import bench, decode, kv, prefill  # noqa: F401


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
