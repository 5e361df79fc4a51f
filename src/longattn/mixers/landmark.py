"""Landmark attention as trained: a landmark per block and the grouped softmax.

Paper: "Landmark Attention: Random-Access Infinite Context Length for Transformers" (Mohtashami & Jaggi,
NeurIPS 2023, https://arxiv.org/abs/2305.16300). The sequence is cut into blocks of ``block`` tokens and each block
gets a landmark. A query ``i`` in block ``c`` attends, in one softmax, to the tokens ``j <= i`` of its own block and
to the landmarks of the earlier blocks; the mass a landmark ``L_b`` receives is shared out over the tokens of block
``b`` by a second softmax over that block alone (the grouped softmax):

``w_ij = softmax(S)_j`` for ``j`` in block ``c``, ``w_ij = softmax(S)_{L_b} * softmax_{j' in b}(s_ij')_j`` for ``j``
in an earlier block ``b``, where ``S`` holds ``s_ij = q_i . k_j / sqrt(d)`` (own block) and ``q_i . k_{L_b} /
sqrt(d)`` (landmarks); ``y_i = sum_j w_ij v_j``. A landmark's own value is never read. Rotary positions; a
landmark sits at its block's last position.

Departure (the interface keeps ``[b, n, dim]``): in the paper the landmark is a token of the stream, and its key
at a layer comes from its state after the layers below, where it attended to its block. A mixer cannot carry
extra tokens between layers, so the landmark's state is built in the layer: a learnable landmark embedding ``e``
attends (softmax) to its block's tokens, ``h_b = e + attn_b(e)``, and ``k_{L_b} = W_k h_b``. The training-free
decode selector of the same name (``decode/landmark.py``) uses the block's mean key instead. Causal only (as the
paper: a language model); a block with no real token has no landmark.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..checks import check_int
from ..registry import register
from .base import Mixer
from .softmax import rope, rope_qkv

__all__ = ["LandmarkAttention"]


@register("landmark_trained", "mixer", paper="Landmark Attention (Mohtashami & Jaggi, NeurIPS 2023) "
          "https://arxiv.org/abs/2305.16300", summary="a landmark per block, grouped softmax: own block + earlier "
          "blocks through their landmarks (causal)")
class LandmarkAttention(Mixer):
    """Landmark attention with the grouped softmax (causal)."""

    supports_causal = (True,)
    examples = ({"block": 3}, {"block": 4})

    def __init__(self, dim: int, heads: int = 4, causal: bool = True, block: int = 32) -> None:
        super().__init__(dim, heads, causal)
        check_int(block, "block", 1)
        self.block = block
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.landmark = nn.Parameter(torch.randn(dim) / math.sqrt(dim))

    _qkv = rope_qkv

    def _landmark_keys(self, k, v, real):
        """``[b, h, nb, d]`` the landmarks' keys (``k, v`` of the tokens, rotated), ``[b, nb]`` which exist."""
        b, h, n, d = k.shape
        nb = -(-n // self.block)
        pad = nb * self.block - n
        last = torch.clamp(torch.arange(nb, device=k.device) * self.block + self.block - 1, max=n - 1)
        wq, wk, _ = self.qkv.weight.chunk(3, 0)
        ql = rope((self.landmark @ wq.T).view(h, 1, d).expand(h, nb, d), pos=last)  # [h, nb, d]
        kb = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(b, h, nb, self.block, d)
        vb = torch.nn.functional.pad(v, (0, 0, 0, pad)).view(b, h, nb, self.block, d)
        rb = torch.nn.functional.pad(real, (0, pad)).view(b, nb, self.block)
        s = torch.einsum("hcd,bhcjd->bhcj", ql, kb) / math.sqrt(d)
        p = torch.nan_to_num(s.masked_fill(~rb[:, None], float("-inf")).softmax(-1))
        att = torch.einsum("bhcj,bhcjd->bhcd", p, vb)  # [b, h, nb, d]
        state = self.landmark + att.transpose(1, 2).reshape(b, nb, h * d)  # h_b = e + attn_b(e)
        kl = rope(self.split(state @ wk.T), pos=last)
        return kl, rb.any(-1)

    def forward(self, x, mask=None):
        self.check_input(x, mask)
        q, k, v = self._qkv(x)
        b, h, n, d = q.shape
        real = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask.bool()
        kl, has = self._landmark_keys(k, v, real)
        nb = kl.shape[2]
        blk = torch.arange(n, device=x.device) // self.block
        s_tok = q @ k.transpose(-1, -2) / math.sqrt(d)  # [b, h, n, n]
        s_lm = q @ kl.transpose(-1, -2) / math.sqrt(d)  # [b, h, n, nb]
        i = torch.arange(n, device=x.device)
        own = (blk[:, None] == blk[None, :]) & (i[None, :] <= i[:, None])
        own = own[None, None] & real[:, None, None, :]
        earlier = (torch.arange(nb, device=x.device)[None, :] < blk[:, None])[None, None] & has[:, None, None, :]
        logits = torch.cat([s_tok.masked_fill(~own, float("-inf")), s_lm.masked_fill(~earlier, float("-inf"))], -1)
        p = torch.nan_to_num(logits.softmax(-1))
        p_tok, p_lm = p[..., :n], p[..., n:]
        pad = nb * self.block - n  # softmax within each key block: keys viewed as [nb, block]
        inner = torch.nn.functional.pad(s_tok.masked_fill(~real[:, None, None, :], float("-inf")), (0, pad),
                                        value=float("-inf")).view(b, h, n, nb, self.block)
        within = torch.nan_to_num(inner.softmax(-1))
        w = p_tok + (p_lm[..., None] * within).view(b, h, n, nb * self.block)[..., :n]
        return self.masked(self.out(self.merge(w @ v)), mask)

    def reference(self, x, mask=None):
        q, k, v = self._qkv(x)
        b, h, n, d = q.shape
        wq, wk, _ = self.qkv.weight.chunk(3, 0)
        nb = -(-n // self.block)
        y = torch.zeros_like(q)
        for bi in range(b):
            ok = [mask is None or bool(mask[bi, j]) for j in range(n)]
            members = [[j for j in range(c * self.block, min((c + 1) * self.block, n)) if ok[j]] for c in range(nb)]
            # the landmarks' states and keys (each attends to its block's real tokens)
            keys_l = {}
            for c in range(nb):
                if not members[c]:
                    continue
                last = torch.tensor([min((c + 1) * self.block, n) - 1])
                state = self.landmark.clone()
                for hh in range(h):
                    ql = rope((self.landmark @ wq.T).view(h, d)[hh][None], pos=last)[0]
                    s = torch.stack([ql @ k[bi, hh, j] / math.sqrt(d) for j in members[c]])
                    pr = torch.softmax(s, 0)
                    o = sum(pr[t] * v[bi, hh, j] for t, j in enumerate(members[c]))
                    state = state + torch.cat([torch.zeros(hh * d, dtype=x.dtype), o,
                                               torch.zeros((h - hh - 1) * d, dtype=x.dtype)])
                keys_l[c] = [rope((state @ wk.T).view(h, d)[hh][None], pos=last)[0] for hh in range(h)]
            for hh in range(h):
                for i in range(n):
                    c = i // self.block
                    own = [j for j in members[c] if j <= i]
                    lms = [bb for bb in range(c) if bb in keys_l]
                    logits = [q[bi, hh, i] @ k[bi, hh, j] / math.sqrt(d) for j in own]
                    logits += [q[bi, hh, i] @ keys_l[bb][hh] / math.sqrt(d) for bb in lms]
                    if not logits:
                        continue
                    p = torch.softmax(torch.stack(logits), 0)
                    out = sum(p[t] * v[bi, hh, j] for t, j in enumerate(own)) if own else 0
                    for t, bb in enumerate(lms):
                        inner = torch.softmax(torch.stack([q[bi, hh, i] @ k[bi, hh, j] / math.sqrt(d)
                                                           for j in members[bb]]), 0)
                        out = out + p[len(own) + t] * sum(inner[u] * v[bi, hh, j] for u, j in enumerate(members[bb]))
                    y[bi, hh, i] = out
        return self.masked(self.out(self.merge(y)), mask)
