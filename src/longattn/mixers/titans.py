"""Titans' neural long-term memory as a layer (MAL), a linear memory learned at test time.

Paper: "Titans: Learning to Memorize at Test Time" (Behrouz et al., 2024, https://arxiv.org/abs/2501.00663).
Per head, a memory ``M`` (here a ``d x d`` matrix) is trained while the sequence is read: token ``t`` brings the
associative loss ``l_t(M) = ||M k_t - v_t||^2`` (keys L2-normalised); the surprise carries momentum,
``S_t = eta S_{t-1} - theta grad l_t``, and the memory forgets, ``M_t = (1 - alpha) M_{t-1} + S_t``; the layer
reads ``y_t = M_t q_t``. Training is parallel by chunks as in the paper: inside a chunk of ``chunk`` tokens every
gradient is taken at the memory of the chunk's start; momentum and forgetting are then cumulative products,
computed for the whole chunk with two weight matrices; since every gradient is rank one (``2 e_s k_s^T``), the
reads ``M_t q_t`` and the chunk's final memory and momentum come from ``[chunk, chunk]`` and ``[chunk, d]`` products
(``O(C^2 d + C d^2)`` per chunk, no ``d x d`` memory per token). ``chunk=1`` is the fully recurrent rule, which
``step`` runs token by token.

Departures: ``eta``, ``theta``, ``alpha`` are learned per head (sigmoids of parameters), not functions of the token
(the paper's data-dependent gates); the memory is linear (the paper also uses deeper MLP memories); padded tokens
leave memory and momentum unchanged; causal only (the memory is a recurrence).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_int
from ..registry import register
from .base import Mixer

__all__ = ["Titans"]


@register("titans", "mixer", paper="Titans (Behrouz et al., 2024) https://arxiv.org/abs/2501.00663",
          summary="a linear memory trained at test time on an associative loss, with momentum and forgetting")
class Titans(Mixer):
    """Neural long-term memory (memory as a layer), chunk-parallel."""

    supports_causal = (True,)
    recurrent = True
    examples = ({"chunk": 1}, {"chunk": 4})

    def __init__(self, dim: int, heads: int = 4, causal: bool = True, chunk: int = 16) -> None:
        super().__init__(dim, heads, causal)
        check_int(chunk, "chunk", 1)
        self.chunk = chunk
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.gates = nn.Parameter(torch.tensor([[2.0, -1.0, -4.0]]).repeat(heads, 1))  # eta, theta, alpha logits

    def _proj(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return F.normalize(self.split(q), dim=-1), F.normalize(self.split(k), dim=-1), self.split(v)

    def _gates(self):
        g = torch.sigmoid(self.gates)
        return g[:, 0], g[:, 1], g[:, 2]  # [h] each

    def forward(self, x, mask=None):
        self.check_input(x, mask)
        q, k, v = self._proj(x)
        b, h, n, d = q.shape
        eta, theta, alpha = self._gates()
        real = torch.ones(b, n, dtype=q.dtype, device=x.device) if mask is None else mask.to(q.dtype)
        m = torch.zeros(b, h, d, d, dtype=q.dtype, device=x.device)
        s = torch.zeros_like(m)
        th = theta[None, :, None, None]
        ys = []
        for c0 in range(0, n, self.chunk):
            c1 = min(n, c0 + self.chunk)
            kc, vc, qc, rc = k[:, :, c0:c1], v[:, :, c0:c1], q[:, :, c0:c1], real[:, None, c0:c1]  # rc [b, 1, C]
            # gradients at the chunk's start memory, 2 e_s k_s^T with e_s = M0 k_s - v_s (0 on padding): rank one,
            # so no d x d matrix per token is ever formed
            e = (torch.einsum("bhij,bhcj->bhci", m, kc) - vc) * rc[..., None]
            # per-token factors, 1 on padding: log-cumulative products give the weights of every pair (t, s)
            ce = (torch.log(eta)[None, :, None] * rc).cumsum(-1)  # [b, h, C]
            ca = (torch.log1p(-alpha)[None, :, None] * rc).cumsum(-1)
            t = torch.arange(c1 - c0, device=x.device)
            tri = (t[:, None] >= t[None, :]).to(q.dtype)
            w_s = torch.exp(ce[..., :, None] - ce[..., None, :]) * tri  # S_t = E_t S0 - theta sum_s w_s(t,s) G_s
            w_m = torch.exp(ca[..., :, None] - ca[..., None, :]) * tri * rc[..., None, :]  # M_t = A_t M0 + sum w_m S_s
            big_e, big_a = torch.exp(ce), torch.exp(ca)
            w = w_m @ w_s  # M_t = A_t M0 + c_t S0 - 2 theta sum_r W(t, r) e_r k_r^T
            c = (w_m @ big_e[..., None])[..., 0]
            read = torch.einsum("bhij,bhtj->bhti", m, qc) * big_a[..., None] + \
                torch.einsum("bhij,bhtj->bhti", s, qc) * c[..., None]
            ys.append(read - 2 * th * ((w * (qc @ kc.transpose(-1, -2))) @ e))  # y_t = M_t q_t
            m, s = (big_a[..., -1, None, None] * m + c[..., -1, None, None] * s
                    - 2 * th * torch.einsum("bhr,bhri,bhrj->bhij", w[..., -1, :], e, kc),
                    big_e[..., -1, None, None] * s - 2 * th * torch.einsum("bhr,bhri,bhrj->bhij", w_s[..., -1, :], e, kc))
        y = torch.cat(ys, 2)
        return self.masked(self.out(self.merge(y)), mask)

    def reference(self, x, mask=None):
        """Token by token: ``grad l_t = 2 (M0 k_t - v_t) k_t^T`` at the chunk's start memory ``M0``, then the
        momentum and forgetting updates, then the read."""
        q, k, v = self._proj(x)
        b, h, n, d = q.shape
        eta, theta, alpha = self._gates()
        y = torch.zeros_like(q)
        for bi in range(b):
            for hh in range(h):
                m = torch.zeros(d, d, dtype=q.dtype)
                s = torch.zeros(d, d, dtype=q.dtype)
                for c0 in range(0, n, self.chunk):
                    m0 = m
                    for t in range(c0, min(n, c0 + self.chunk)):
                        if mask is not None and not bool(mask[bi, t]):
                            continue
                        kt, vt = k[bi, hh, t], v[bi, hh, t]
                        g = 2 * torch.outer(m0 @ kt - vt, kt)
                        s = eta[hh] * s - theta[hh] * g
                        m = (1 - alpha[hh]) * m + s
                        y[bi, hh, t] = m @ q[bi, hh, t]
        return self.masked(self.out(self.merge(y)), mask)

    def init_state(self, batch: int):
        return None

    def step(self, x_t, state):
        """One token (the ``chunk=1`` rule): ``(y_t [b, dim], (M, S))``."""
        q, k, v = self._proj(x_t[:, None])
        b, h, _, d = q.shape
        eta, theta, alpha = self._gates()
        if state is None:
            state = (torch.zeros(b, h, d, d, dtype=q.dtype), torch.zeros(b, h, d, d, dtype=q.dtype))
        m, s = state
        err = torch.einsum("bhij,bhj->bhi", m, k[:, :, 0]) - v[:, :, 0]
        grad = 2 * torch.einsum("bhi,bhj->bhij", err, k[:, :, 0])
        s = eta.view(1, h, 1, 1) * s - theta.view(1, h, 1, 1) * grad
        m = (1 - alpha).view(1, h, 1, 1) * m + s
        y = torch.einsum("bhij,bhj->bhi", m, q[:, :, 0])[:, :, None]
        return self.out(self.merge(y))[:, 0], (m, s)
