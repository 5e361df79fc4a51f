"""LongVQ: attention over vector-quantized keys, linear in the sequence length.

Paper: "LongVQ: Long Sequence Modeling with Vector Quantization on Structured Memory" (Liu et al., IJCAI 2024,
https://arxiv.org/abs/2404.11163), whose global abstraction is a fixed-size codebook; the quantized-key attention
it builds on is Transformer-VQ's (Lingle, 2023, https://arxiv.org/abs/2309.16354). Per head, each key is replaced by
its nearest code, ``k^_j = C[a_j]`` with ``a_j = argmin_s ||k_j - C_s||``, and

``y_i = sum_{j <= i} exp(q_i . k^_j / sqrt(d)) v_j / sum_{j <= i} exp(q_i . k^_j / sqrt(d))``

(``j`` over every real token when bidirectional). Because ``k^_j`` takes one of ``codes`` values this equals
``sum_s exp(q_i . C_s) U_s / sum_s exp(q_i . C_s) N_s`` with ``U_s``, ``N_s`` the sum of the values and the count of
the keys assigned to code ``s`` so far: causal attention runs in chunks of ``chunk`` tokens, exact (against the
quantized keys) inside a chunk and through ``U, N`` (a state of ``codes x (d + 1)`` per head) for the chunks
before; the recurrent step carries the same state.

The discrete step: the assignment has no gradient. The codebook is a parameter trained by the task loss through
the scores; the keys are trained by the commitment loss ``aux_loss = beta * mean ||k - sg(C[a])||^2`` (VQ-VAE's,
van den Oord et al., 2017), which the trainer adds to the task loss. Departures: LongVQ's surrounding MEGA-style
structure (EMA, gated attention) is not included, this is its VQ attention layer; the codebook is learned by
gradient rather than Transformer-VQ's EMA k-means.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..checks import check_int
from ..registry import register
from .base import Mixer

__all__ = ["LongVQ"]


@register("longvq", "mixer", paper="LongVQ (Liu et al., IJCAI 2024) https://arxiv.org/abs/2404.11163",
          summary="softmax attention over keys quantized to a learned codebook, linear time via per-code sums")
class LongVQ(Mixer):
    """Vector-quantized-key attention (causal in chunks, bidirectional, recurrent step)."""

    recurrent = True
    examples = ({"codes": 4, "chunk": 3}, {"codes": 8, "chunk": 4})

    def __init__(self, dim: int, heads: int = 4, causal: bool = True, codes: int = 64, chunk: int = 64,
                 beta: float = 0.25) -> None:
        super().__init__(dim, heads, causal)
        check_int(codes, "codes", 1)
        check_int(chunk, "chunk", 1)
        self.codes, self.chunk, self.beta = codes, chunk, beta
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.codebook = nn.Parameter(torch.randn(heads, codes, self.head_dim) / math.sqrt(self.head_dim))
        self.out = nn.Linear(dim, dim, bias=False)
        self.aux_loss = torch.zeros(())

    def _qkv(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.split(q), self.split(k), self.split(v)

    def assign(self, k: torch.Tensor) -> torch.Tensor:
        """Nearest code per key: ``k [b, h, n, d] -> [b, h, n]`` (long)."""
        dist = (k.detach()[..., None, :] - self.codebook.detach()[None, :, None]).pow(2).sum(-1)  # [b, h, n, S]
        return dist.argmin(-1)

    def _commit(self, k, a, real):
        ck = torch.gather(self.codebook.detach()[None].expand(k.shape[0], -1, -1, -1), 2,
                          a[..., None].expand(*a.shape, k.shape[-1]))
        w = real[:, None, :, None].to(k.dtype)
        self.aux_loss = self.beta * ((k - ck) ** 2 * w).sum() / (w.sum() * k.shape[1] * k.shape[-1]).clamp_min(1)

    def forward(self, x, mask=None):
        self.check_input(x, mask)
        q, k, v = self._qkv(x)
        b, h, n, d = q.shape
        real = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask.bool()
        a = self.assign(k)
        self._commit(k, a, real)
        onehot = torch.nn.functional.one_hot(a, self.codes).to(x.dtype) * real[:, None, :, None]  # [b, h, n, S]
        sc = torch.einsum("bhnd,hsd->bhns", q, self.codebook) / math.sqrt(d)
        e = torch.exp(sc - sc.amax(-1, keepdim=True))  # a per-query constant cancels in the ratio
        if not self.causal:
            num = torch.einsum("bhns,bhsd->bhnd", e, torch.einsum("bhjs,bhjd->bhsd", onehot, v))
            den = torch.einsum("bhns,bhs->bhn", e, onehot.sum(2))
            y = num / den.clamp_min(1e-30)[..., None]
            return self.masked(self.out(self.merge(y * real[:, None, :, None])), mask)
        U = q.new_zeros(b, h, self.codes, d)
        N = q.new_zeros(b, h, self.codes)
        ys = []
        for s0 in range(0, n, self.chunk):
            s1 = min(s0 + self.chunk, n)
            ec, oc, vc = e[:, :, s0:s1], onehot[:, :, s0:s1], v[:, :, s0:s1]
            w = torch.einsum("bhis,bhjs->bhij", ec, oc).tril()  # exp(q_i . k^_j) for j <= i in the chunk
            num = torch.einsum("bhis,bhsd->bhid", ec, U) + w @ vc
            den = torch.einsum("bhis,bhs->bhi", ec, N) + w.sum(-1)
            ys.append(num / den.clamp_min(1e-30)[..., None])
            U = U + torch.einsum("bhjs,bhjd->bhsd", oc, vc)
            N = N + oc.sum(2)
        y = torch.cat(ys, 2) * real[:, None, :, None]
        return self.masked(self.out(self.merge(y)), mask)

    def reference(self, x, mask=None):
        q, k, v = self._qkv(x)
        a = self.assign(k)
        kq = self.codebook[torch.arange(self.heads)[None, :, None], a]  # [b, h, n, d]: each key's code
        return self.masked(self.out(self.merge(self.loop_softmax(q, kq, v, mask))), mask)

    # recurrent form ---------------------------------------------------------------------------------------------
    def init_state(self, batch: int):
        d = self.head_dim
        p = self.codebook
        return p.new_zeros(batch, self.heads, self.codes, d), p.new_zeros(batch, self.heads, self.codes)

    def step(self, x_t, state):
        U, N = state
        q, k, v = (t[:, :, 0] for t in self._qkv(x_t[:, None]))  # [b, h, d]
        a = self.assign(k[:, :, None])[:, :, 0]
        oh = torch.nn.functional.one_hot(a, self.codes).to(x_t.dtype)
        U = U + oh[..., None] * v[:, :, None]
        N = N + oh
        sc = torch.einsum("bhd,hsd->bhs", q, self.codebook) / math.sqrt(self.head_dim)
        e = torch.exp(sc - sc.amax(-1, keepdim=True))
        y = torch.einsum("bhs,bhsd->bhd", e, U) / torch.einsum("bhs,bhs->bh", e, N)[..., None]
        return self.out(y.reshape(x_t.shape[0], self.dim)), (U, N)
