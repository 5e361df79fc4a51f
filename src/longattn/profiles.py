"""Per-(layer, kv head) profiles: JSON files written by ``longattn profile heads`` and read by policies."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = ["HeadProfile", "load_profile", "BUILTIN", "EXAMPLE", "write_example_profile"]

# built-in profiles shipped with the package, by name
BUILTIN = {
    "smollm2-135m": "smollm2-135m.heads.json",  # training-free retrieval score (longattn profile heads)
    "smollm2-135m-gates": "smollm2-135m.gates.json",  # DuoAttention gates (profile heads --method gates)
}


@dataclass(frozen=True)
class HeadProfile:
    num_layers: int
    num_kv_heads: int
    scores: tuple[tuple[float, ...], ...]  # [layer][kv head], higher = more retrieval-like / more budget
    method: str = ""
    model: str = ""
    #: ``query_head_scores`` where the profile has them: ``[layer][query head]`` (head scorers that see query heads)
    query_scores: tuple[tuple[float, ...], ...] | None = None

    def check(self, num_layers: int, num_kv_heads: int, what: str = "profile") -> None:
        if (self.num_layers, self.num_kv_heads) != (num_layers, num_kv_heads):
            raise ValueError(
                f"{what}: the profile is for {self.num_layers} layers x {self.num_kv_heads} kv heads, the model has "
                f"{num_layers} x {num_kv_heads}"
            )


def load_profile(spec: str, key: str = "scores") -> HeadProfile:
    """Load ``spec``: a JSON path or a built-in name (``smollm2-135m``)."""
    if spec in BUILTIN:
        text = resources.files("longattn.data").joinpath(BUILTIN[spec]).read_text()
        where = f"built-in profile {spec!r}"
    else:
        p = Path(spec)
        if not p.is_file():
            raise ValueError(f"profile: no such file {spec!r} (or a built-in name: {', '.join(BUILTIN)})")
        text, where = p.read_text(), str(p)
    try:
        d = json.loads(text)
        L, H = int(d["num_layers"]), int(d["num_kv_heads"])
        rows = d[key]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"profile {where}: expected JSON with num_layers, num_kv_heads, {key} ({e})") from None
    if len(rows) != L or any(len(r) != H for r in rows):
        raise ValueError(f"profile {where}: {key} must be {L} layers x {H} kv heads, got "
                         f"{len(rows)} x {sorted({len(r) for r in rows})}")
    vals = tuple(tuple(float(x) for x in r) for r in rows)
    if key == "budgets" and any(x < 0 for r in vals for x in r):
        raise ValueError(f"profile {where}: budgets must be >= 0")
    q = d.get("query_head_scores")
    qvals = None
    if isinstance(q, list) and len(q) == L and q and all(isinstance(r, list) and len(r) == len(q[0]) for r in q):
        qvals = tuple(tuple(float(x) for x in r) for r in q)
    return HeadProfile(L, H, vals, d.get("method", ""), d.get("model", ""), qvals)


#: the value an ``examples`` entry gives ``profile`` when the generic tests should write one for their tiny model
EXAMPLE = "<profile>"


def write_example_profile(path, *, num_layers: int, num_kv_heads: int, **_) -> str:
    """A head profile for a tiny test model: distinct scores in (0, 1), so every ordering of heads is strict."""
    n = num_layers * num_kv_heads
    scores = [[((li * num_kv_heads + h) * 7 % n + 1) / (n + 1) for h in range(num_kv_heads)] for li in range(num_layers)]
    Path(path).write_text(json.dumps({"num_layers": num_layers, "num_kv_heads": num_kv_heads, "scores": scores}))
    return str(path)
