"""InfLLM: attention sinks + a local window + memory blocks retrieved through representative keys.

Paper: "InfLLM: Training-Free Long-Context Extrapolation for LLMs with an Efficient Context Memory" (Xiao et
al., NeurIPS 2024, https://arxiv.org/abs/2402.04617). The cache is cut into blocks of ``block_size`` tokens.
Each token gets a *representative score*, the sum of ``q . k`` it receives from the ``block_size`` queries that
follow it (the paper uses the local-window queries); a block's ``reps`` best-scored keys are its
representatives, fixed once the block has left the local window (so they are computed once per block, kept in
the cache layer). At each step a memory block's relevance is the sum of ``q . r`` over its representatives and
over the query heads of the kv head's group; the ``(budget - sink - recent) // block_size`` most relevant blocks
are attended together with the first ``sink`` real tokens and the last ``recent`` tokens (extended back to a
block boundary, so sinks, memory blocks and the local window never overlap).

``offload=true``: once a memory block is complete it is moved out of the cache layer to a store on ``store``
(CPU memory; the layer frees it, so on an accelerator only sinks, the local window and the LRU stay there), and
the selected blocks are loaded back through an LRU of ``lru_blocks`` blocks on the cache's device; attention is
then the dense attention over the layer (sinks + local window) merged by log-sum-exp with the attention over the
loaded blocks, the same token set as without offload. Offload needs rows without padding, and after it started
a multi-token forward (which could not see the store) is refused.

Departures: the score horizon is ``block_size`` queries, not the whole local window; the decode queries also
score the keys before them, so blocks formed while generating get representatives the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..cache.offload import BlockStore
from ..cache.state import DecodeState
from ..checks import check_int
from ..padding import first_real
from ..registry import register
from . import _slow
from .base import DecodeSelector, Step, top_with_forced

__all__ = ["InfLLM", "InfLLMState", "representative_scores"]


def representative_scores(buf: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                          key_valid: torch.Tensor | None, horizon: int, chunk: int = 256) -> torch.Tensor:
    """Add to ``buf [b, hk, n]`` (grown with zeros to the cache length) the ``q . k_m`` of every new query ``i``
    (the last ``q.shape[2]`` positions) for the keys ``m`` with ``1 <= i - m <= horizon``, averaged over the
    group's query heads; padded queries add nothing."""
    b, hq, nq, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    g = hq // hk
    if buf is None:
        buf = torch.zeros(b, hk, n, device=k.device)
    elif buf.shape[-1] < n:
        buf = torch.nn.functional.pad(buf, (0, n - buf.shape[-1]))
    s0 = n - nq
    for c0 in range(0, nq, chunk):
        c1 = min(nq, c0 + chunk)
        qa, qb = s0 + c0, s0 + c1
        ka = max(0, qa - horizon)
        s = torch.matmul(q[:, :, c0:c1].float().reshape(b, hk, g, c1 - c0, d),
                         k[:, :, ka:qb].float().transpose(-1, -2).unsqueeze(2))  # [b, hk, g, c, kl]
        dist = torch.arange(qa, qb, device=k.device)[:, None] - torch.arange(ka, qb, device=k.device)[None, :]
        m = ((dist >= 1) & (dist <= horizon)).float()[None]  # [1, c, kl]
        if key_valid is not None:
            m = m * key_valid[:, qa:qb, None].float()
        buf[:, :, ka:qb] += torch.einsum("bhgck,bck->bhk", s, m.expand(b, -1, -1)) / g
    return buf



@dataclass
class InfLLMState(DecodeState):
    """Per cache layer: representative scores of every token, the representative keys of the complete blocks,
    and (``offload=true``) the store of offloaded blocks."""

    rep: torch.Tensor | None = None  # [b, hk, n] representative score of each token
    rep_k: torch.Tensor | None = None  # [b, hk, blocks, reps, d]
    blocks: int = 0  # blocks whose representatives are final
    store: BlockStore | None = None

@register("infllm", "decode", paper="InfLLM (Xiao et al., NeurIPS 2024) https://arxiv.org/abs/2402.04617",
          summary="sinks + local window + memory blocks retrieved by representative keys")
@dataclass(frozen=True)
class InfLLM(DecodeSelector):
    """Sinks + local window + top-k memory blocks by representative keys."""

    renamed = {"local": "recent"}  # old spellings, accepted with a FutureWarning

    examples = ({"budget": 84, "sink": 4, "recent": 32, "block_size": 16},)
    full_example = {"budget": 4096, "sink": 4, "recent": 32, "block_size": 16}

    sink: int = 64
    recent: int = 256
    block_size: int = 128
    reps: int = 4
    offload: bool = False
    lru_blocks: int = 64
    store: str = "cpu"

    needs_full_cache: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.sink, "sink", 0)
        check_int(self.block_size, "block_size")
        check_int(self.recent, "recent", self.block_size)  # representatives are final once out of the window
        check_int(self.reps, "reps")
        if self.reps > self.block_size:
            raise ValueError(f"reps ({self.reps}) must be <= block_size ({self.block_size})")
        check_int(self.lru_blocks, "lru_blocks")
        try:
            torch.device(self.store)
        except (RuntimeError, TypeError):
            raise ValueError(f"store must be a torch device like 'cpu', got {self.store!r}") from None
        if self.budget < self.sink + self.recent + self.block_size:
            raise ValueError(f"budget ({self.budget}) must be >= sink + recent + block_size "
                             f"({self.sink + self.recent + self.block_size}): room for one memory block")

    @property
    def topk(self) -> int:
        return (self.budget - self.sink - self.recent) // self.block_size

    def on_prefill(self, layer, layer_idx, q, k, key_valid) -> None:
        if self.is_dense(layer_idx):
            return
        st = layer.decode_state.setdefault("infllm", InfLLMState())
        if st.store is not None and len(st.store):
            raise ValueError("infllm offload: a multi-token forward after blocks were offloaded cannot see them; "
                             "feed tokens one at a time, or use offload=false")
        st.rep = representative_scores(st.rep, q, k, key_valid, self.block_size)

    def reference_select(self, step: Step, prefill_q=None) -> dict:
        """Loop by loop: a token's representative score is the sum of q . k it receives from the ``block_size``
        queries after it (the prefill's ``prefill_q`` and this step's query; real queries only), averaged over the
        group; a memory block's representatives are its ``reps`` best; its relevance, the sum of q . r over them
        and the group; attended: the first ``sink`` real tokens (to a block boundary), the last ``recent`` (back
        to one) and the ``(budget - sink - recent) // block_size`` most relevant blocks between."""
        b, hq = step.q.shape[:2]
        hk, n = step.k.shape[1], step.n
        g, bs = hq // hk, self.block_size
        queries = {}  # absolute position -> query [b, hq, d]
        if prefill_q is not None:
            for i in range(prefill_q.shape[2]):
                queries[i + n - 1 - prefill_q.shape[2]] = prefill_q[:, :, i]
        queries[n - 1] = step.q[:, :, 0]
        out = {}
        for bi in range(b):
            f = _slow.first_real(step.key_valid, bi)
            mstart = -(-(f + self.sink) // bs) * bs
            lstart = max(mstart, max(0, ((n - self.recent) // bs) * bs))
            for h in range(hk):
                rep = [0.0] * n
                for m in range(n):
                    for i in range(m + 1, min(n, m + bs + 1)):
                        if i in queries and _slow.real(step.key_valid, bi, i):
                            rep[m] += sum(float(queries[i][bi, hh].double() @ step.k[bi, h, m].double())
                                          for hh in range(h * g, (h + 1) * g)) / g
                rel = []
                for j in range(n // bs):
                    if j * bs < mstart or (j + 1) * bs > lstart:
                        rel.append(-math.inf)
                        continue
                    top = sorted(range(j * bs, (j + 1) * bs), key=lambda t: -rep[t])[: self.reps]
                    rel.append(sum(float(step.q[bi, hh, 0].double() @ step.k[bi, h, t].double())
                                   for hh in range(h * g, (h + 1) * g) for t in top))
                blocks = [j for j in _slow.top(rel, self.topk) if rel[j] > -math.inf]
                out[bi, h] = (set(range(f, min(mstart, lstart))) | set(range(lstart, n))
                              | _slow.tokens_of(blocks, bs, n))
        return out

    def _representatives(self, st: InfLLMState, k: torch.Tensor, blocks: int) -> torch.Tensor:
        """``[b, hk, blocks, reps, d]`` representative keys of the first ``blocks`` blocks (new ones computed)."""
        bs = self.block_size
        done = st.blocks
        if blocks > done:
            b, hk, _, d = k.shape
            sc = st.rep[:, :, done * bs : blocks * bs].reshape(b, hk, blocks - done, bs)
            top = sc.topk(self.reps, dim=-1).indices + (torch.arange(done, blocks, device=k.device) * bs)[:, None]
            new = k.gather(2, top.reshape(b, hk, -1, 1).expand(-1, -1, -1, d)).reshape(b, hk, -1, self.reps, d)
            st.rep_k = new if st.rep_k is None else torch.cat([st.rep_k, new], 2)
            st.blocks = blocks
        return st.rep_k[:, :, :blocks]

    def select(self, step: Step):
        b, hk, n = step.k.shape[0], step.k.shape[1], step.n
        bs, dev = self.block_size, step.k.device
        st = step.state.setdefault("infllm", InfLLMState())
        st.rep = representative_scores(st.rep, step.q, step.k, step.key_valid, bs)
        first = first_real(step.key_valid, b, dev)  # [b]
        mstart = -(-(first + self.sink) // bs) * bs  # memory starts at the first block boundary after the sinks
        lstart = max(0, ((n - self.recent) // bs) * bs)  # the local window, back to a block boundary
        lstart = torch.clamp(mstart, min=lstart)
        n_blocks = int(lstart.max()) // bs  # complete blocks before the local window (any row)
        parts, valids = [], []
        # sinks: [first, mstart)
        s_slots = first[:, None] + torch.arange(self.sink + bs - 1, device=dev)[None]
        parts.append(s_slots.clamp_max(n - 1))
        valids.append(s_slots < torch.minimum(mstart, lstart)[:, None])
        # local window: [lstart, n)
        l_slots = lstart[:, None] + torch.arange(self.recent + bs, device=dev)[None]
        parts.append(l_slots.clamp_max(n - 1))
        valids.append(l_slots < n)
        idx = torch.cat(parts, -1)[:, None].expand(b, hk, -1)
        valid = torch.cat(valids, -1)[:, None].expand(b, hk, -1)
        if n_blocks:
            reps = self._representatives(st, step.k, n_blocks)  # [b, hk, J, r, d]
            rel = torch.einsum("bhgd,bhjrd->bhj", step.grouped_q(), reps.float())
            j = torch.arange(n_blocks, device=dev)
            usable = (j[None] * bs >= mstart[:, None]) & ((j[None] + 1) * bs <= lstart[:, None])  # [b, J]
            rel = rel.masked_fill(~usable[:, None], float("-inf"))
            kb = min(self.topk, n_blocks)
            blocks = top_with_forced(rel, kb)  # [b, hk, kb]
            ok = torch.gather(usable[:, None].expand(-1, hk, -1), 2, blocks)
            tok = (blocks.unsqueeze(-1) * bs + torch.arange(bs, device=dev)).flatten(-2)
            idx = torch.cat([idx, tok], -1)
            valid = torch.cat([valid, ok.repeat_interleave(bs, -1)], -1)
        return idx, valid

    # ---- offload ------------------------------------------------------------------------------------------
    def attend(self, step: Step, stats: dict | None = None) -> torch.Tensor:
        if not self.offload:
            return super().attend(step, stats)
        return self._attend_offloaded(step, stats)

    def _attend_offloaded(self, step: Step, stats: dict | None) -> torch.Tensor:
        import time

        from ..ops.core import add_sinks, masked_attention
        from ..ops.merge import merge_attention

        t0 = time.perf_counter()
        if step.key_valid is not None:
            raise ValueError("infllm offload: needs rows without padding (one prompt, or prompts of one length)")
        layer = step.layer
        b, hk, p_len, d = step.k.shape
        bs, dev = self.block_size, step.k.device
        n = layer.get_seq_length()  # logical tokens (the new one included)
        st = step.state.setdefault("infllm", InfLLMState())
        if st.store is None:
            st.store = BlockStore(self.store, self.lru_blocks)
        store = st.store
        # the new query scores the keys before it: the last block_size + 1 tokens, all in the layer
        h = min(bs + 1, p_len)
        buf = st.rep if st.rep is not None else torch.zeros(b, hk, n, device=dev)
        if buf.shape[-1] < n:
            buf = torch.nn.functional.pad(buf, (0, n - buf.shape[-1]))
        buf[:, :, n - h : n] += representative_scores(None, step.q, step.k[:, :, -h:], None, bs)
        st.rep = buf
        mstart = -(-self.sink // bs) * bs
        lstart = max(mstart, ((n - self.recent) // bs) * bs)
        n_blocks = lstart // bs
        pos = layer.physical_positions()[0, 0].long() if layer.compressed else torch.arange(p_len, device=dev)
        if n_blocks > st.blocks:  # representatives of the newly complete blocks, from the layer's keys
            reps = []
            for j in range(st.blocks, n_blocks):
                ps = int(torch.searchsorted(pos, j * bs))
                top = buf[:, :, j * bs : (j + 1) * bs].topk(self.reps, -1).indices + ps
                reps.append(step.k.gather(2, top.unsqueeze(-1).expand(-1, -1, -1, d)))
            new = torch.stack(reps, 2)  # [b, hk, new blocks, r, d]
            st.rep_k = new if st.rep_k is None else torch.cat([st.rep_k, new], 2)
            st.blocks = n_blocks
        move = [j for j in range(mstart // bs, n_blocks) if j not in store]
        if move:  # out of the layer, into the store
            drop = torch.zeros(p_len, dtype=torch.bool, device=dev)
            for j in move:
                ps = int(torch.searchsorted(pos, j * bs))
                store.put(j, step.k[:, :, ps : ps + bs], step.v[:, :, ps : ps + bs])
                drop[ps : ps + bs] = True
            layer.keep_tokens(torch.nonzero(~drop).flatten())
        qg = step.grouped_q()  # [b, hk, g, d]
        outs, lses = [], []
        o, lz = masked_attention(qg, layer.keys, layer.values, None, step.scale, step.softcap)  # sinks + local window
        outs.append(o)
        lses.append(lz)
        selected = layer.keys.shape[2] * b * hk
        if len(store):
            rel = torch.einsum("bhgd,bhjrd->bhj", qg, st.rep_k[:, :, :n_blocks].float())
            usable = torch.tensor([j in store for j in range(n_blocks)], device=dev)
            rel = rel.masked_fill(~usable, float("-inf"))
            blocks = top_with_forced(rel, min(self.topk, int(usable.sum())))  # [b, hk, kb]
            uniq = sorted(set(blocks.flatten().tolist()))
            kk, vv = store.load(uniq, dev)  # [b, hk, U, bs, d], through the LRU of loaded blocks
            slot = torch.full((n_blocks,), -1, dtype=torch.long, device=dev)
            slot[torch.tensor(uniq, device=dev)] = torch.arange(len(uniq), device=dev)
            g_idx = slot[blocks][..., None, None].expand(-1, -1, -1, bs, d)
            km = kk.gather(2, g_idx).flatten(2, 3)
            vm = vv.gather(2, g_idx).flatten(2, 3)
            o, lz = masked_attention(qg, km, vm, None, step.scale, step.softcap)
            outs.append(o)
            lses.append(lz)
            selected += blocks.numel() * bs
        out, lse = merge_attention(outs, lses)
        out, _ = add_sinks(out, lse, None if step.sinks is None else step.sinks.float().view(1, hk, -1))
        if stats is not None:
            stats["select_s"] = stats.get("select_s", 0.0) + time.perf_counter() - t0
            stats["selected"] = stats.get("selected", 0) + selected
            stats["possible"] = stats.get("possible", 0) + b * hk * n
        b_, hq, _, _ = step.q.shape
        return out.reshape(b_, hq, 1, d).to(step.q.dtype)
