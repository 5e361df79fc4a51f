"""Per-layer, per-head mixture of prefill patterns (MoA; MInference's per-head pattern assignment).

Papers: MoA, "Mixture of Sparse Attention for Automatic Large Language Model Compression" (Fu et al., 2024,
https://arxiv.org/abs/2406.14909); MInference 1.0 offline per-head pattern search
(https://arxiv.org/abs/2407.02490).

``profile`` names a JSON file (written by ``longattn profile search``) or a built-in profile (``smollm2-135m``:
searched on 2 calibration prompts of 4096 tokens at a mean density of 0.2)::

    {"format": "longattn.mixed/1", "block_size": 64, "num_layers": L, "num_heads": H,
     "layers": [["sink_window:window=256", "vertical_slash:vertical=256:slash=256", ...], ...]}

one pattern spec per query head and layer (``"dense"`` = every causal block). Each layer's layout takes, for
each head, the blocks and the token rule of that head's pattern. Departures: a pattern is estimated on all
heads and its rows for the heads that use it are kept (simple, costs one estimate per distinct pattern and
layer); vertical_slash heads inside a mixture use the column/diagonal blocks over the original keys (without
the compact column segment of ``vertical_slash.attend``); ``core_context`` cannot be mixed (it adds keys).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..layout import BlockLayout, TokenRule
from ..registry import register
from .base import Geometry, PrefillPattern

__all__ = ["Mixed", "FORMAT", "write_mixed"]


def _dense(q, k, v, scale, key_valid, window, causal, softcap=None, sinks=None):
    """Dense attention for the heads of a mixture that use no pattern (rows with no visible key give 0)."""
    from ..ops.dense import dense_attention, masked_grouped
    from ..reference import dense_mask

    if causal:
        return dense_attention(q, k, v, key_valid, scale, window, softcap, sinks)
    m = dense_mask(q.shape[2], k.shape[2], causal=False, window=window, device=q.device)[None, None]
    if key_valid is not None:
        m = m & key_valid.to(torch.bool)[:, None, None, :]
    return masked_grouped(q, k, v, m.expand(q.shape[0], q.shape[1], -1, -1), scale, softcap, sinks)


FORMAT = "longattn.mixed/1"
# built-in profiles shipped with the package, by name (made by `longattn profile search`)
BUILTIN = {"smollm2-135m": "smollm2-135m.mixed.json"}


def write_mixed(path, layers: list[list[str]], block_size: int, **meta) -> None:
    """Write a mixed-pattern JSON profile."""
    doc = {"format": FORMAT, "block_size": block_size, "num_layers": len(layers),
           "num_heads": len(layers[0]) if layers else 0, **meta, "layers": layers}
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def _parse_head(spec: str, block_size: int, where: str) -> PrefillPattern | None:
    from ..api import parse_method
    from .core_context import CoreContext

    if spec.strip() == "dense":
        return None
    try:
        p = parse_method(spec, "prefill")
    except ValueError as e:
        raise ValueError(f"profile {where}: {e}") from None
    if isinstance(p, (CoreContext, Mixed)):
        raise ValueError(f"profile {where}: {p.name} cannot be part of a mixture")
    if p.block_size != block_size:
        raise ValueError(f"profile {where}: block_size of {spec!r} is {p.block_size}, the profile's is "
                         f"{block_size}; all heads must share one block_size")
    return p


@register(
    "mixed",
    "prefill",
    paper="MoA (Fu et al., 2024) https://arxiv.org/abs/2406.14909; MInference head search "
    "https://arxiv.org/abs/2407.02490",
    summary="per-layer, per-head patterns from a JSON profile (longattn profile search)",
)
@dataclass(frozen=True)
class Mixed(PrefillPattern):
    """Per-(layer, head) patterns loaded from ``profile`` (a JSON file)."""

    profile: str = ""
    _layers: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.profile, str) or not self.profile:
            raise ValueError("profile must name a JSON file written by `longattn profile search`")
        if self.profile in BUILTIN:
            from importlib import resources

            p = f"built-in profile {self.profile!r}"
            text = resources.files("longattn.data").joinpath(BUILTIN[self.profile]).read_text()
        else:
            p = Path(self.profile)
            if not p.is_file():
                raise ValueError(f"profile: no such file {self.profile!r} (or a built-in name: {', '.join(BUILTIN)})")
            text = p.read_text()
        try:
            d = json.loads(text)
            fmt, bs, layers = d["format"], int(d["block_size"]), d["layers"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"profile {p}: expected {FORMAT} JSON with block_size and layers ({e})") from None
        if fmt != FORMAT:
            raise ValueError(f"profile {p}: format must be {FORMAT!r}, got {fmt!r}")
        if bs != self.block_size:
            raise ValueError(f"block_size ({self.block_size}) does not match the profile's block_size {bs}; "
                             f"use mixed:profile=...:block_size={bs}")
        if not isinstance(layers, list) or not layers or not all(isinstance(r, list) and r for r in layers):
            raise ValueError(f"profile {p}: layers must be a non-empty list of per-head spec lists")
        if len({len(r) for r in layers}) != 1:
            raise ValueError(f"profile {p}: every layer must list the same number of heads")
        parsed = tuple(
            tuple(_parse_head(s, bs, f"{p} layer {i} head {h}") for h, s in enumerate(r))
            for i, r in enumerate(layers)
        )
        object.__setattr__(self, "_layers", parsed)

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def for_layer(self, layer_idx: int) -> MixedLayer:
        if not 0 <= layer_idx < len(self._layers):
            raise ValueError(f"profile {self.profile}: has {len(self._layers)} layers, the model asked for layer "
                             f"{layer_idx}")
        return MixedLayer(heads=self._layers[layer_idx], block_size=self.block_size, backend=self.backend)

    def layout(self, q, k, key_valid=None) -> BlockLayout:
        if len(self._layers) != 1:
            raise ValueError("mixed: a multi-layer profile needs a layer; use for_layer(i).layout(...)")
        return self.for_layer(0).layout(q, k, key_valid)

    examples = ({"profile": "<profile>", "block_size": 16},)
    full_example = None  # a mixture is as full as its heads' patterns

    @classmethod
    def write_example_profile(cls, path, *, num_layers: int = 1, num_heads: int = 4, num_kv_heads: int = 2) -> str:
        """A small mixed profile for the generic tests: per head, in turn, sink_window, dense, vertical_slash and
        shifted_groups (block size 16)."""
        specs = ["sink_window:sink=8:window=24:block_size=16", "dense",
                 "vertical_slash:vertical=10:slash=8:obs_window=8:sink=2:window=2:block_size=16",
                 "shifted_groups:group=40:block_size=16"]
        write_mixed(path, [[specs[(h + i) % len(specs)] for h in range(num_heads)] for i in range(num_layers)],
                    block_size=16)
        return str(path)

    def reference_mask(self, q, k, key_valid=None):
        return self.for_layer(0).reference_mask(q, k, key_valid)


@dataclass(frozen=True)
class MixedLayer(PrefillPattern):
    """One layer of a mixture: ``heads[h]`` is query head ``h``'s pattern (None = dense).

    ``attend`` runs each pattern on its own heads with its own kernel path (so vertical_slash heads keep their
    compact column segment) and writes the outputs into place; ``layout`` is the merged per-head layout."""

    heads: tuple = ()

    def groups(self) -> list[tuple[PrefillPattern | None, list[int]]]:
        out: dict = {}
        for h, p in enumerate(self.heads):
            out.setdefault(p, []).append(h)
        return list(out.items())

    def attend(self, q, k, v, *, scale=None, key_valid=None, window=None, layout=None, causal=None, stats=None,
               softcap=None, sinks=None):
        if layout is not None:
            return super().attend(q, k, v, scale=scale, key_valid=key_valid, window=window, layout=layout,
                                  causal=causal, stats=stats, softcap=softcap, sinks=sinks)
        b, hq, nq, _ = q.shape
        hk = k.shape[1]
        if len(self.heads) != hq:
            raise ValueError(f"mixed profile: the layer lists {len(self.heads)} heads, the model has {hq} query heads")
        g = hq // hk
        causal = True if causal is None else causal
        out = q.new_empty(b, hq, nq, v.shape[-1])
        for p, heads in self.groups():
            idx = torch.tensor(heads, device=q.device)
            kv_heads = sorted({h // g for h in heads})
            if len(heads) == len(kv_heads) * g:  # whole GQA groups: keep the kv heads unrepeated
                kv_idx = torch.tensor(kv_heads, device=q.device)
            else:
                kv_idx = idx // g
            qs, ks, vs = q[:, idx], k[:, kv_idx], v[:, kv_idx]
            ss = None if sinks is None else sinks[idx]
            if p is None:
                o = _dense(qs, ks, vs, scale, key_valid, window, causal, softcap, ss)
            elif getattr(p, "head_dependent", False):  # its rule depends on the head's index among all heads
                from ..ops.dispatch import block_sparse_attention

                lay = p.layout(q, k, key_valid).select_heads(idx)
                o = block_sparse_attention(qs, ks, vs, lay, causal=causal, scale=scale, key_valid=key_valid,
                                           window=window, backend=p.backend, softcap=softcap, sinks=ss)
            else:
                o = p.attend(qs, ks, vs, scale=scale, key_valid=key_valid, window=window, causal=causal,
                             stats=stats, softcap=softcap, sinks=ss)
            out[:, idx] = o.to(out.dtype)
        return out

    def layout(self, q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None = None) -> BlockLayout:
        b, hq, nq, _ = q.shape
        nk = k.shape[2]
        if len(self.heads) != hq:
            raise ValueError(f"mixed profile: the layer lists {len(self.heads)} heads, the model has {hq} query heads")
        geo = Geometry(nq, nk, self.block_size, q.device)
        distinct: list = []
        assign = []
        for p in self.heads:
            if p not in distinct:
                distinct.append(p)
            assign.append(distinct.index(p))
        assign_t = torch.tensor(assign, device=q.device)
        bm = torch.zeros(b, hq, geo.nqb, geo.nkb, dtype=torch.bool, device=q.device)
        rules = []
        for i, p in enumerate(distinct):
            heads = assign_t == i
            if p is None:
                m = geo.causal_blocks()[None, None].expand(b, hq, -1, -1)
                rules.append(None)
            else:
                lay = p.layout(q, k, key_valid)
                m = lay.to_block_mask().expand(b, hq, -1, -1)
                rules.append(lay.rule)
            bm = torch.where(heads.view(1, hq, 1, 1), m, bm)
        rule = None
        if any(r is not None for r in rules):
            def fn(bb, hh, qp, kp):
                ok = None
                for i, r in enumerate(rules):
                    term = assign_t[hh] == i
                    if r is not None:
                        term = term & r(bb, hh, qp, kp)
                    ok = term if ok is None else ok | term
                return ok
            rule = TokenRule(fn=fn)
        return BlockLayout.from_block_mask(bm, block_size=self.block_size, q_len=nq, kv_len=nk, rule=rule)

    def reference_mask(self, q, k, key_valid=None):
        """Head by head: the head's own pattern's reference (all causal pairs for a dense head)."""
        from ..reference import dense_mask

        b, hq, nq, _ = q.shape
        nk = k.shape[2]
        out = torch.zeros(b, hq, nq, nk, dtype=torch.bool)
        for h, p in enumerate(self.heads):
            if p is None:
                out[:, h] = dense_mask(nq, nk)[None]
            else:
                r = p.reference_mask(q, k, key_valid)
                out[:, h] = r[:, h if r.shape[1] > 1 else 0]
        return out
