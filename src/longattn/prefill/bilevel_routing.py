"""Bi-level routing attention (BiFormer).

Paper: BiFormer, "Vision Transformer with Bi-Level Routing Attention" (Zhu et al., CVPR 2023,
https://arxiv.org/abs/2303.08801).

Tokens are partitioned into regions; region-level queries and keys are the mean of their tokens; each query
region routes to the ``topk`` regions of highest pooled affinity (per head) and its tokens attend to every token
of the union of routed regions (token-to-token attention in the gathered regions). 1-D: regions of ``region``
consecutive tokens, causal (a region routes among earlier regions and always keeps itself). 2-D (``image=HxW``):
regions are ``region x region`` tiles of the row-major token grid, non-causal, as in BiFormer.

Exact at token level (when regions do not align with blocks a token rule keeps only routed regions' keys).
Departures: BiFormer routes with the same projection-pooled queries/keys; in a causal 1-D setting the own region
is always routed (otherwise a query could see no key).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..checks import check_int
from ..layout import BlockLayout, TokenRule
from ..registry import register
from . import _slow
from .base import Geometry, PrefillPattern, expand_heads, topk_mask
from .neighborhood import parse_image

__all__ = ["BilevelRouting"]


@register(
    "bilevel_routing",
    "prefill",
    paper="BiFormer (Zhu et al., CVPR 2023) https://arxiv.org/abs/2303.08801",
    summary="route each region to its top-k regions by pooled affinity; token attention inside them (1-D/2-D)",
)
@dataclass(frozen=True)
class BilevelRouting(PrefillPattern):
    """Region routing (top-k regions per region), then token attention in the routed regions."""

    region: int = 256
    topk: int = 8
    image: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.region, "region")
        check_int(self.topk, "topk")
        img = parse_image(self.image)
        if img is not None:  # normalised to "HxW" so that the spec string round-trips
            object.__setattr__(self, "image", f"{img[0]}x{img[1]}")
            if img[0] % self.region or img[1] % self.region:
                raise ValueError(f"region ({self.region}) must divide both image sides {img[0]}x{img[1]}")

    @property
    def hw(self) -> tuple[int, int] | None:
        """``(H, W)`` of the 2-D form, None for 1-D."""
        return parse_image(self.image)

    def is_causal(self) -> bool:
        return self.hw is None

    def region_of(self, pos: torch.Tensor, n: int):
        if self.hw is None:
            return pos // self.region
        H, W = self.hw
        r = self.region
        return (pos // W // r) * (W // r) + (pos % W) // r

    def n_regions(self, n: int) -> int:
        if self.hw is None:
            return -(-n // self.region)
        H, W = self.hw
        return (H // self.region) * (W // self.region)

    def layout(self, q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None = None) -> BlockLayout:
        b, hq, nq, d = q.shape
        nk = k.shape[2]
        dev = q.device
        if self.hw is not None:
            H, W = self.hw
            if not (nq == nk == H * W):
                raise ValueError(f"image {H}x{W} = {H * W} tokens does not match q_len={nq}, kv_len={nk}")
        R = self.n_regions(nk)
        off = nk - nq
        kreg = self.region_of(torch.arange(nk, device=dev), nk)
        qreg = self.region_of(torch.arange(nq, device=dev) + off, nk)
        # region-pooled queries and keys (padded keys excluded)
        w = torch.ones(b, nk, device=dev) if key_valid is None else key_valid.float()
        ksum = torch.zeros(b, k.shape[1], R, d, device=dev).index_add_(2, kreg, k.float() * w[:, None, :, None])
        kcnt = torch.zeros(b, R, device=dev).index_add_(1, kreg, w)
        kpool = expand_heads(ksum / kcnt.clamp_min(1)[:, None, :, None], hq)
        qsum = torch.zeros(b, hq, R, d, device=dev).index_add_(2, qreg, q.float())
        qcnt = torch.zeros(R, device=dev).index_add_(0, qreg, torch.ones(nq, device=dev))
        qpool = qsum / qcnt.clamp_min(1)[None, None, :, None]
        s = torch.matmul(qpool, kpool.transpose(-1, -2)) / math.sqrt(d)  # [b, hq, R, R]
        allowed = (kcnt > 0)[:, None, None, :].expand(b, hq, R, R)
        if self.is_causal():
            ri = torch.arange(R, device=dev)
            allowed = allowed & (ri[None, :] <= ri[:, None])
        routed = topk_mask(s, self.topk, allowed)
        if self.is_causal():
            routed = routed | torch.eye(R, dtype=torch.bool, device=dev)
        # block mask = (q block contains region a) x routed[a, c] x (kv block contains region c)
        geo = Geometry(nq, nk, self.block_size, dev)
        bs = self.block_size

        def member(reg: torch.Tensor, nb: int) -> torch.Tensor:
            pad = nb * bs - reg.numel()
            x = torch.nn.functional.pad(reg, (0, pad), value=R).view(nb, bs)
            return torch.zeros(nb, R + 1, device=dev).scatter_(1, x, 1.0)[:, :R]

        aq, ak = member(qreg, geo.nqb), member(kreg, geo.nkb)
        m = torch.matmul(torch.matmul(aq, routed.float()), ak.T) > 0
        if self.is_causal():
            m = m & geo.causal_blocks()
        aligned = self.hw is None and self.region % bs == 0 and off % bs == 0
        rule = None
        if not aligned:
            region_of = self.region_of

            def fn(bb, hh, qp, kp):
                qp, kp = torch.clamp(qp, max=nk - 1), torch.clamp(kp, max=nk - 1)  # block padding
                return routed[bb, hh, region_of(qp, nk), region_of(kp, nk)]
            rule = TokenRule(fn=fn)
        return BlockLayout.from_block_mask(m, block_size=bs, q_len=nq, kv_len=nk, rule=rule)

    examples = ({"region": 24, "topk": 2, "block_size": 16}, {"region": 32, "topk": 2, "block_size": 16},
                {"region": 5, "topk": 2, "image": "15x10", "block_size": 16})
    full_example = {"region": 24, "topk": 20, "block_size": 16}

    def reference_mask(self, q, k, key_valid=None):
        """Loop by loop: regions of ``region`` positions (1-D) or ``region x region`` tiles (``image``); each
        query region's mean query scores every (causally reachable) key region's mean real key; a query attends
        to the tokens of its ``topk`` best regions, and in 1-D to its own region too (causally)."""
        b, hq, nq, _ = q.shape
        nk = k.shape[2]
        g = hq // k.shape[1]
        d = q.shape[-1]
        off = nk - nq
        if self.hw is None:
            region_of = [j // self.region for j in range(nk)]
        else:
            H, W = self.hw
            tiles_w = W // self.region
            region_of = [(j // W // self.region) * tiles_w + (j % W) // self.region for j in range(nk)]
        R = max(region_of) + 1
        causal = self.is_causal()
        m = torch.zeros(b, hq, nq, nk, dtype=torch.bool)
        for bi in range(b):
            for h in range(hq):
                kreg = [[j for j in range(nk) if region_of[j] == r and _slow.valid(key_valid, bi, j)] for r in range(R)]
                qreg = [[i for i in range(nq) if region_of[i + off] == r] for r in range(R)]
                for a in range(R):
                    if not qreg[a]:
                        continue
                    qa = q[bi, h, qreg[a]].double().mean(0)
                    sc = [float(qa @ k[bi, h // g, kreg[c]].double().mean(0)) / math.sqrt(d)
                          if kreg[c] and (c <= a or not causal) else float("-inf") for c in range(R)]
                    routed = _slow.topk_set(sc, self.topk) | ({a} if causal else set())
                    for i in qreg[a]:
                        for j in range(i + off + 1 if causal else nk):
                            m[bi, h, i, j] = region_of[j] in routed
        return m
