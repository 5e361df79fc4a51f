"""Neighborhood attention, 1-D and 2-D, with dilation and stride (NATTEN, Generalized Neighborhood Attention).

Papers: Neighborhood Attention Transformer (Hassani et al., CVPR 2023, https://arxiv.org/abs/2204.07143);
Dilated Neighborhood Attention (https://arxiv.org/abs/2209.15001); Generalized Neighborhood Attention
(Hassani et al., 2025, https://arxiv.org/abs/2504.16922) for ``stride``.

Each query attends to the ``kernel_size`` nearest keys of its dilation group (positions congruent modulo
``dilation``), NATTEN's way: the window is centred on the query and shifted inward at the sequence edges so it
always holds ``kernel_size`` keys. ``causal=True`` (1-D only) takes the ``kernel_size`` keys ending at the
query instead. ``stride`` (GNA) makes groups of ``stride`` consecutive queries share the window of one leader
query (the group's centre; its last query when causal). ``image=(H, W)`` (or ``"HxW"``) gives the 2-D form on
a row-major ``H x W`` token grid: the rule applies per axis.

Exact at token level (a token rule). Departures: none in the rule; the 2-D block set is found by evaluating
the rule on every pair (O(N^2) element-wise work at layout time), the 1-D one analytically. Through
``longattn.apply`` the model's causal rule is always kept on top.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int
from ..layout import BlockLayout, TokenRule
from ..registry import register
from .base import Geometry, PrefillPattern, blocks_from_rule

__all__ = ["Neighborhood", "parse_image"]


def parse_image(image) -> tuple[int, int] | None:
    """``None``, ``(H, W)`` or ``"HxW"`` -> ``(H, W)``."""
    if image is None:
        return None
    if isinstance(image, str):
        parts = image.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"image must be 'HxW' (e.g. '64x64') or (H, W), got {image!r}")
        image = (int(parts[0]), int(parts[1]))
    if (not isinstance(image, (tuple, list)) or len(image) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in image)):
        raise ValueError(f"image must be 'HxW' or (H, W) with positive ints, got {image!r}")
    return int(image[0]), int(image[1])


def _axis_ok(qi, ki, n: int, ks: int, dil: int, stride: int, causal: bool):
    """Per-axis NATTEN rule for coordinates ``qi`` (query) and ``ki`` (key) on an axis of length ``n``."""
    same = (qi % dil) == (ki % dil)
    j, jk = qi // dil, ki // dil
    lg = (n - 1 - qi % dil) // dil + 1  # length of the query's dilation group
    if causal:
        jl = torch.minimum((j // stride) * stride + stride - 1, lg - 1)
        ok = (jk <= jl) & (jk > jl - ks)
    else:
        jl = torch.minimum((j // stride) * stride + (stride - 1) // 2, lg - 1)
        start = torch.minimum(torch.clamp(jl - ks // 2, min=0), torch.clamp(lg - ks, min=0))
        ok = (jk >= start) & (jk < start + ks)
    return same & ok


@register(
    "neighborhood",
    "prefill",
    paper="NATTEN (Hassani et al., CVPR 2023) https://arxiv.org/abs/2204.07143; GNA "
    "https://arxiv.org/abs/2504.16922",
    summary="1-D/2-D neighborhood windows with dilation and stride; causal 1-D variant",
)
@dataclass(frozen=True)
class Neighborhood(PrefillPattern):
    """Sliding neighborhood of ``kernel_size`` keys per axis, dilated, strided, 1-D or 2-D."""

    kernel_size: int = 1024
    dilation: int = 1
    stride: int = 1
    causal: bool = True
    image: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.kernel_size, "kernel_size")
        check_int(self.dilation, "dilation")
        check_int(self.stride, "stride")
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal must be true or false, got {self.causal!r}")
        img = parse_image(self.image)
        if img is not None:  # normalised to "HxW" so that the spec string round-trips
            object.__setattr__(self, "image", f"{img[0]}x{img[1]}")
            if self.causal:
                raise ValueError("image (2-D neighborhood) needs causal=False; the causal variant is 1-D")
        if self.stride > self.kernel_size:
            raise ValueError(f"stride must be <= kernel_size ({self.kernel_size}), got {self.stride}")

    @property
    def hw(self) -> tuple[int, int] | None:
        """``(H, W)`` of the 2-D form, None for 1-D."""
        return parse_image(self.image)

    def is_causal(self) -> bool:
        return self.causal

    def rule_fn(self, n: int):
        ks, dil, st, causal = self.kernel_size, self.dilation, self.stride, self.causal
        if self.hw is None:
            if not causal and ks * dil > n:
                raise ValueError(f"kernel_size x dilation ({ks} x {dil}) must be <= the sequence length {n}")

            def fn(b, h, qp, kp):
                return _axis_ok(qp, kp, n, ks, dil, st, causal)
            return fn
        H, W = self.hw
        if H * W != n:
            raise ValueError(f"image {H}x{W} = {H * W} tokens does not match the sequence length {n}")
        if ks * dil > min(H, W):
            raise ValueError(f"kernel_size x dilation ({ks} x {dil}) must be <= each image side {H}x{W}")

        def fn2(b, h, qp, kp):
            return (_axis_ok(qp // W, kp // W, H, ks, dil, st, False)
                    & _axis_ok(qp % W, kp % W, W, ks, dil, st, False))
        return fn2

    def layout(self, q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None = None) -> BlockLayout:
        nq, nk = q.shape[2], k.shape[2]
        if self.hw is not None and nq != nk:
            raise ValueError(f"image form needs q_len == kv_len, got {nq} and {nk}")
        fn = self.rule_fn(nk)
        geo = Geometry(nq, nk, self.block_size, q.device)
        if self.hw is not None:
            m = blocks_from_rule(fn, geo, causal=False)
        else:
            m = self._blocks_1d(geo)
        return BlockLayout.from_block_mask(m[None, None], block_size=self.block_size, q_len=nq, kv_len=nk,
                                           rule=TokenRule(fn=fn))

    def _blocks_1d(self, geo: Geometry) -> torch.Tensor:
        ks, dil, st = self.kernel_size, self.dilation, self.stride
        n = geo.kv_len
        p = torch.arange(geo.off, n, device=geo.device)
        r = p % dil
        j = p // dil
        lg = (n - 1 - r) // dil + 1
        if self.causal:
            jl = torch.minimum((j // st) * st + st - 1, lg - 1)
            kmin = torch.clamp(jl - ks + 1, min=0) * dil + r
            kmax = torch.minimum(jl * dil + r, p)
        else:
            jl = torch.minimum((j // st) * st + (st - 1) // 2, lg - 1)
            start = torch.minimum(torch.clamp(jl - ks // 2, min=0), torch.clamp(lg - ks, min=0))
            kmin = start * dil + r
            kmax = torch.clamp((start + ks - 1) * dil + r, max=n - 1)
        bs = geo.bs
        pad = geo.nqb * bs - p.numel()
        lo = torch.nn.functional.pad(kmin, (0, pad), value=n).view(geo.nqb, bs).amin(1) // bs
        hi = torch.nn.functional.pad(kmax, (0, pad), value=-1).view(geo.nqb, bs).amax(1) // bs
        return (geo.kb[None, :] >= lo[:, None]) & (geo.kb[None, :] <= hi[:, None])

    examples = ({"kernel_size": 9, "dilation": 2, "stride": 2, "block_size": 16},
                {"kernel_size": 7, "dilation": 3, "stride": 3, "causal": False, "block_size": 16},
                {"kernel_size": 5, "causal": False, "image": "15x10", "block_size": 16})
    full_example = {"kernel_size": 200, "block_size": 16}

    def reference_mask(self, q, k, key_valid=None):
        """Loop by loop, NATTEN's definition per axis: position ``i`` = dilation group ``i % dilation`` and
        index ``i // dilation`` in it; its stride group's centre (causal: its last member) picks the window of
        ``kernel_size`` group members, shifted inside the sequence (non-causal) or ending there (causal); 2-D:
        the product of the row and column windows. Position-based: padding does not move the windows."""
        nq, nk = q.shape[2], k.shape[2]
        m = torch.zeros(1, 1, nq, nk, dtype=torch.bool)
        off = nk - nq
        for i in range(nq):
            if self.hw is None:
                keys = _window_keys(i + off, nk, self.kernel_size, self.dilation, self.stride, self.causal)
            else:
                H, W = self.hw
                rows = _window_keys(i // W, H, self.kernel_size, self.dilation, self.stride, False)
                cols = _window_keys(i % W, W, self.kernel_size, self.dilation, self.stride, False)
                keys = {r * W + c for r in rows for c in cols}
            for j in keys:
                if not self.causal or j <= i + off:
                    m[0, 0, i, j] = True
        return m


def _window_keys(i: int, n: int, ks: int, dil: int, st: int, causal: bool) -> set:
    """The keys of position ``i`` along one axis of length ``n`` (the reference, in plain Python)."""
    r, j = i % dil, i // dil
    lg = (n - 1 - r) // dil + 1
    if causal:
        jl = min((j // st) * st + st - 1, lg - 1)
        return {jj * dil + r for jj in range(max(jl - ks + 1, 0), jl + 1)}
    jl = min((j // st) * st + (st - 1) // 2, lg - 1)
    start = min(max(jl - ks // 2, 0), max(lg - ks, 0))
    return {jj * dil + r for jj in range(start, start + ks)}
