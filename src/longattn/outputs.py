"""Output files: checked before any work, never replaced without being asked, written whole, named safely.

Every command that writes a file (``bench --json/--out``, ``ops-bench --json``, ``profile --out`` ...) checks its
paths first (``check_output_file``: the parent can be created, the path is not a directory, the file is
writable, an existing file is refused without ``--overwrite``), so a long run never ends in a traceback with
its results lost; ``write_atomic`` writes through a temporary file and a rename, so a crash leaves the old file
or the new one, never half of it; ``safe_name`` turns data (a task or method name from a records file) into a
file name that cannot leave its directory.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

__all__ = ["check_output_file", "check_output_dir", "write_atomic", "safe_name"]


def check_output_file(path, flag: str, overwrite: bool = False) -> Path:
    """Check that ``path`` can be written (one clear ``ValueError`` naming ``flag`` otherwise); an existing file
    is refused unless ``overwrite``. Nothing is left behind by the check."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag}: {str(p)!r} is a directory; give a file path")
    if p.exists() and not overwrite:
        raise ValueError(f"{flag}: {str(p)!r} exists; add --overwrite to replace it (or choose another path)")
    parent = p.parent if str(p.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag}: cannot create the directory {str(parent)!r} ({e.strerror or e})") from None
    if not parent.is_dir():
        raise ValueError(f"{flag}: {str(parent)!r} is not a directory")
    existed = p.exists()
    try:
        with open(p, "a"):
            pass
    except OSError as e:
        raise ValueError(f"{flag}: cannot write {str(p)!r} ({e.strerror or e})") from None
    if not existed:
        p.unlink()
    return p


def check_output_dir(path, flag: str) -> Path:
    """``path`` is (or can be made) a writable directory."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag}: {str(p)!r} is a file, not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag}: cannot create the directory {str(p)!r} ({e.strerror or e})") from None
    if not os.access(p, os.W_OK):
        raise ValueError(f"{flag}: the directory {str(p)!r} is not writable")
    return p


def write_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent if str(p.parent) else ".", prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


def safe_name(text, limit: int = 80) -> str:
    """A file-name component made from data: no path separators, no leading dots, bounded length."""
    s = _UNSAFE.sub("_", str(text)).strip("._") or "x"
    return s[:limit]
