"""Argument checks shared by every family: each raises ``ValueError`` naming the argument and the allowed range.

Methods validate their settings in ``__post_init__`` with these (never with ``assert``), so a bad spec fails at
parse time with one line that the command line prints as it is.
"""

from __future__ import annotations

__all__ = ["read_text", "check_int", "check_float", "check_ratio", "check_choice", "check_odd", "check_block_size", "parse_layers"]


def check_int(value, name: str, lo: int = 1, hi: int | None = None, hint: str = "") -> int:
    """``value`` is an int (not a bool) in ``[lo, hi]`` (``hi`` None: unbounded); ``hint`` explains the range."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        want = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be an int {want}{f' ({hint})' if hint else ''}, got {value!r}")
    return value


def check_float(value, name: str, lo: float, hi: float, lo_open: bool = True, hi_open: bool = False) -> float:
    """``value`` is a number in the interval ``lo..hi`` (open or closed at each end as asked)."""
    rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number in {rng}, got {value!r}")
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    return float(value)


def check_ratio(ratio, name: str = "ratio") -> float:
    """The fraction of the cache removed: ``[0, 1)``."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0.0 <= float(ratio) < 1.0):
        raise ValueError(f"{name} (fraction of the cache removed) must be in [0, 1), got {ratio!r}")
    return float(ratio)


def check_choice(value, name: str, allowed) -> str:
    """``value`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")
    return value


def check_odd(value, name: str) -> int:
    """An odd int >= 1 (pooling kernels centred on a token)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise ValueError(f"{name} must be an odd int >= 1, got {value!r}")
    return value


def check_block_size(block_size: int, name: str = "block_size") -> int:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 16:
        raise ValueError(f"{name} must be a power of two >= 16, got {block_size!r}")
    if block_size & (block_size - 1):
        raise ValueError(f"{name} must be a power of two >= 16 (16, 32, 64, 128, ...), got {block_size}")
    return block_size


def parse_layers(spec: str, name: str = "dense_layers") -> tuple[int, ...]:
    """``"0,1"`` -> ``(0, 1)``; empty string -> ``()``."""
    if not isinstance(spec, str):
        raise ValueError(f"{name} must be a comma-separated string of layer indices like '0,1', got {spec!r}")
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        try:
            val = int(part)
        except ValueError:
            raise ValueError(f"{name}: {part!r} is not a layer index (comma-separated ints like '0,1')") from None
        if val < 0:
            raise ValueError(f"{name}: layer indices must be >= 0, got {val}")
        out.append(val)
    return tuple(sorted(set(out)))


def read_text(path, flag: str) -> str:
    """The UTF-8 text of the file that ``flag`` names: one clear error for a missing, binary, non-UTF-8 or empty file."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{flag}: no such file {path!r}")
    data = p.read_bytes()
    if b"\0" in data:
        raise ValueError(f"{flag}: {path!r} is a binary file, not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag}: {path!r} is not UTF-8 text (byte {e.start}); convert it, e.g. iconv -t utf-8") from None
    if not text.strip():
        raise ValueError(f"{flag}: {path!r} is empty")
    return text
