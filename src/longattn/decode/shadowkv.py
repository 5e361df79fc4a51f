"""ShadowKV: low-rank pre-RoPE keys and offloaded values; chunk landmarks pick what to reconstruct each step.

Paper: "ShadowKV: KV Cache in Shadows for High-Throughput Long-Context LLM Inference" (Sun et al., ICML 2025,
https://arxiv.org/abs/2410.21465). At the first decode step of a layer its prompt is split into the first
``sink`` real tokens, the last ``recent`` and, between them, chunks of ``chunk`` tokens. For the chunks:

* the keys before RoPE (un-rotated with the model's own rotary embedding, ``hf.Rope``), all kv heads side by
  side, are replaced by a rank-``rank`` SVD ``A B`` per batch row (``A [n, r]``, ``B [r, heads x dim]``);
* each chunk's *landmark* is the mean of its post-RoPE keys; the ``outliers`` fraction of chunks whose keys are
  least like their landmark (lowest minimum cosine) stay exact in the cache, as the sinks and recent tokens do;
* the values go to the store device (``store``, CPU memory: the paper's offload), one tensor of chunks; the keys
  and values leave the cache.

Each step, a query head's softmax over the landmarks (a chunk's score: the sum over the kv head's group) picks
the ``budget // chunk`` best chunks per kv head; their keys are rebuilt from ``A B`` and rotated back to their
positions, their values fetched, and the head attends exactly to the exact part plus the rebuilt chunks.

Departures: the batch shares one chunk grid (from the most padded row's sinks) and keeps exact, for every row,
the union of the rows' outlier chunks (a row reads only its own); tokens appended while decoding stay exact; the
SVD is recomputed per layer at the first step, not overlapped with prefill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..cache.state import DecodeState
from ..checks import check_float, check_int
from ..registry import register
from . import _slow
from .base import DecodeSelector, Step

__all__ = ["ShadowKV", "ShadowState"]


@dataclass
class ShadowState(DecodeState):
    """What replaced the prompt's chunks: the factors ``a [b, n_mid, r]`` and ``bmat [b, r, hk * d]`` of the
    pre-RoPE keys, the landmarks ``[b, hk, C, d]``, the chunk grid start and size, each row's outlier chunks
    ``[b, C]`` bool, the positions the keys were rotated at ``[b, n_mid]`` and the chunks' values ``[b, hk, C,
    chunk, d]`` on the store device (read back, the selected chunks only, by one ``index_select`` per step)."""

    a: torch.Tensor
    bmat: torch.Tensor
    landmarks: torch.Tensor
    outlier: torch.Tensor
    positions: torch.Tensor
    first: torch.Tensor  # [b] each row's first real token (left padding)
    start: int
    chunks: int
    values: torch.Tensor


@register("shadowkv", "decode", paper="ShadowKV (Sun et al., ICML 2025) https://arxiv.org/abs/2410.21465",
          summary="low-rank pre-RoPE keys + offloaded values; landmarks pick chunks to rebuild; outliers exact")
@dataclass(frozen=True)
class ShadowKV(DecodeSelector):
    """Low-rank keys, offloaded values, chunks rebuilt by landmark scores."""

    examples = ({"budget": 32, "chunk": 8, "rank": 8, "sink": 4, "recent": 8, "outliers": 0.1},
                {"budget": 48, "chunk": 4, "rank": 16, "sink": 2, "recent": 16, "outliers": 0.0})
    full_example = {"budget": 100000, "chunk": 8, "rank": 100000, "sink": 4, "recent": 8, "outliers": 0.0}

    needs_full_cache = True

    chunk: int = 8
    rank: int = 160
    sink: int = 4
    recent: int = 64
    outliers: float = 0.01
    store: str = "cpu"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.chunk, "chunk", 1)
        check_int(self.rank, "rank", 1)
        check_int(self.sink, "sink", 0)
        check_int(self.recent, "recent", 1)
        check_float(self.outliers, "outliers", 0.0, 1.0, lo_open=False)
        try:
            torch.device(self.store)
        except (RuntimeError, TypeError):
            raise ValueError(f"store must be a torch device (cpu, cuda, ...), got {self.store!r}") from None

    @property
    def topk(self) -> int:
        return max(self.budget // self.chunk, 1)

    # ---- the plan: grid, landmarks, outliers (from the full keys; select() and the build share it) ---------
    def grid(self, key_valid, b: int, n: int, device) -> tuple[int, int]:
        """``(start, chunks)``: the chunk grid after the most padded row's sinks, before the recent tokens."""
        first = 0 if key_valid is None else int((~key_valid.bool()).sum(-1).max())
        start = first + self.sink
        return start, max((n - self.recent - start) // self.chunk, 0)

    def landmarks_of(self, k: torch.Tensor, start: int, chunks: int) -> torch.Tensor:
        b, hk, _, d = k.shape
        seg = k[:, :, start : start + chunks * self.chunk].float().view(b, hk, chunks, self.chunk, d)
        return seg.mean(3)

    def outlier_chunks(self, k: torch.Tensor, lm: torch.Tensor, start: int, chunks: int) -> torch.Tensor:
        """``[b, C]`` bool: per row, the ``ceil(outliers x C)`` chunks with the lowest min cosine to the landmark."""
        b, hk, _, d = k.shape
        count = math.ceil(self.outliers * chunks) if chunks else 0
        out = torch.zeros(b, chunks, dtype=torch.bool, device=k.device)
        if count == 0:
            return out
        seg = k[:, :, start : start + chunks * self.chunk].float().view(b, hk, chunks, self.chunk, d)
        cos = torch.nn.functional.cosine_similarity(seg, lm.unsqueeze(3), dim=-1)  # [b, hk, C, chunk]
        worst = cos.amin(dim=(1, 3))  # [b, C]
        idx = torch.sort(worst, dim=-1, stable=True).indices[:, :count]
        return out.scatter_(1, idx, True)

    def chunk_scores(self, q: torch.Tensor, lm: torch.Tensor, scale: float, usable: torch.Tensor) -> torch.Tensor:
        """``[b, hk, C]``: per query head the softmax over the usable chunks' landmarks, summed over the group."""
        b, hq, _, d = q.shape
        hk = lm.shape[1]
        qg = q.reshape(b, hk, hq // hk, d).float()
        s = torch.einsum("bhgd,bhcd->bhgc", qg, lm) * scale
        s = s.masked_fill(~usable[:, None, None, :], float("-inf"))
        return s.softmax(-1).nan_to_num(0.0).sum(2)

    def pick(self, scores: torch.Tensor, usable: torch.Tensor) -> torch.Tensor:
        """``[b, hk, C]`` bool: the ``topk`` best usable chunks per kv head."""
        k = min(self.topk, scores.shape[-1])
        chosen = torch.zeros_like(scores, dtype=torch.bool)
        if k == 0:
            return chosen
        s = scores.masked_fill(~usable[:, None, :], -1.0)
        idx = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]
        chosen.scatter_(2, idx, True)
        return chosen & usable[:, None, :]

    def select(self, step: Step):
        """The tokens a step attends (over the full cache, before anything left it): every exact token (sinks,
        the row's outlier chunks, the tail) and the picked chunks; ``[b, hk, m]`` with a validity mask."""
        b, hk, n, _ = step.k.shape
        start, chunks = self.grid(step.key_valid, b, n, step.k.device)
        lm = self.landmarks_of(step.k, start, chunks)
        out = self.outlier_chunks(step.k, lm, start, chunks)
        picked = self.pick(self.chunk_scores(step.q, lm, step.scale, ~out), ~out)
        tok = torch.ones(b, hk, n, dtype=torch.bool, device=step.k.device)
        mid = (picked | out[:, None, :]).repeat_interleave(self.chunk, -1)  # [b, hk, C * chunk]
        tok[:, :, start : start + chunks * self.chunk] = mid
        if step.key_valid is not None:
            tok &= step.key_valid.bool()[:, None, :]
        m = max(int(tok.sum(-1).max()), 1)
        idx = torch.sort(tok.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :m]
        return idx, torch.gather(tok, 2, idx)

    # ---- the build and the step ----------------------------------------------------------------------------
    def _rope(self, step: Step, b: int, positions: torch.Tensor, like: torch.Tensor):
        from ..hf import rope_of

        rope = rope_of(step.module) if getattr(step, "module", None) is not None else None
        if rope is None:
            return None, None, None
        cos, sin = rope.cos_sin(positions, like)
        return rope, cos, sin

    def _build(self, step: Step) -> ShadowState:
        layer = step.layer
        if layer.compressed:
            raise ValueError("shadowkv: needs the cache as the prompt filled it (no KV policy before it)")
        b, hk, n, d = step.k.shape
        kv = step.key_valid
        start, chunks = self.grid(kv, b, n, step.k.device)  # the step's own token falls in the recent tail
        mid = chunks * self.chunk
        k = step.k
        lm = self.landmarks_of(k, start, chunks)
        out = self.outlier_chunks(k, lm, start, chunks)
        first = torch.zeros(b, dtype=torch.long, device=k.device) if kv is None else (~kv.bool()).sum(-1)
        positions = (torch.arange(start, start + mid, device=k.device)[None] - first[:, None]).clamp(min=0)
        kmid = k[:, :, start : start + mid].float()
        rope, cos, sin = self._rope(step, b, positions, kmid)
        pre = kmid if rope is None else rope.unrotate(kmid, cos, sin)
        flat = pre.permute(0, 2, 1, 3).reshape(b, mid, hk * d)  # [b, n_mid, hk * d]
        r = min(self.rank, mid, hk * d)
        if mid:
            u, s, vh = torch.linalg.svd(flat.double(), full_matrices=False)
            a, bmat = (u[..., :r] * s[:, None, :r]).float(), vh[:, :r].float()
        else:
            a, bmat = flat.new_zeros(b, 0, r), flat.new_zeros(b, r, hk * d)
        values = step.v[:, :, start : start + mid].reshape(b, hk, chunks, self.chunk, d).to(self.store, copy=True)
        values = values.contiguous()
        drop = torch.zeros(n, dtype=torch.bool, device=k.device)
        keep_chunk = out.any(0)  # the union of the rows' outliers stays exact
        for c in range(chunks):
            if not bool(keep_chunk[c]):
                drop[start + c * self.chunk : start + (c + 1) * self.chunk] = True
        if bool(drop.any()):
            layer.keep_tokens(torch.nonzero(~drop).flatten())
        st = ShadowState(a, bmat, lm, out, positions, first, start, chunks, values)
        layer.decode_state["shadowkv"] = st
        return st

    def attend(self, step: Step, stats: dict | None = None) -> torch.Tensor:
        import time

        from ..ops.core import add_sinks, masked_attention
        from ..ops.merge import merge_attention

        t0 = time.perf_counter()
        st = step.state.get("shadowkv")
        if st is None:
            st = self._build(step)
        layer = step.layer
        b, hq, _, d = step.q.shape
        hk = layer.keys.shape[1]
        g = hq // hk
        qg = step.q.reshape(b, hk, g, d)
        # the exact part: the layer's tokens, less the other rows' outlier chunks and each row's padding
        pos = layer.physical_positions()[0, 0].long() if layer.compressed else torch.arange(layer.keys.shape[2])
        pos = pos.to(step.q.device)
        in_grid = (pos >= st.start) & (pos < st.start + st.chunks * self.chunk)
        cidx = ((pos - st.start) // self.chunk).clamp(0, max(st.chunks - 1, 0))
        own = ~in_grid[None] if not st.chunks else st.outlier[:, cidx] | ~in_grid[None]  # [b, p]
        allowed = (own & (pos[None] >= st.first[:, None]))[:, None, None, :]
        o1, l1 = masked_attention(qg.float(), layer.keys, layer.values, allowed, step.scale, step.softcap)
        outs, lses = [o1], [l1]
        selected = int(allowed.expand(b, hk, 1, -1).sum())
        if st.chunks:
            picked = self.pick(self.chunk_scores(step.q, st.landmarks, step.scale, ~st.outlier), ~st.outlier)
            k_sel = min(self.topk, st.chunks)
            sel = torch.sort(picked.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :k_sel]
            ok = torch.gather(picked, 2, sel)  # [b, hk, k]
            tok = (sel.unsqueeze(-1) * self.chunk + torch.arange(self.chunk, device=sel.device)).flatten(2)
            # rebuild the keys: A rows of the chosen tokens times the head's slice of B, rotated back
            a_rows = torch.gather(st.a[:, None].expand(b, hk, -1, -1), 2,
                                  tok.unsqueeze(-1).expand(-1, -1, -1, st.a.shape[-1]))  # [b, hk, m, r]
            bh = st.bmat.view(b, -1, hk, d).permute(0, 2, 1, 3)  # [b, hk, r, d]
            kpre = torch.matmul(a_rows, bh)  # [b, hk, m, d]
            ppos = torch.gather(st.positions[:, None].expand(b, hk, -1), 2, tok)  # [b, hk, m]
            rope, cos, sin = self._rope(step, b, ppos.reshape(b * hk, -1), kpre)
            if rope is not None:
                kk = rope.rotate(kpre.reshape(b * hk, 1, -1, d), cos, sin).view(b, hk, -1, d)
            else:
                kk = kpre
            # the chosen chunks' values from the store: one index_select over its (row, head, chunk) blocks
            C = st.chunks
            blocks = ((torch.arange(b, device=sel.device).view(b, 1, 1) * hk
                       + torch.arange(hk, device=sel.device).view(1, hk, 1)) * C + sel).view(-1)
            vm = st.values.view(b * hk * C, self.chunk * d).index_select(0, blocks.to(st.values.device))
            vm = vm.to(step.q.device).view(b, hk, k_sel * self.chunk, d)
            ok_tok = ok.repeat_interleave(self.chunk, -1)[:, :, None, :]
            o2, l2 = masked_attention(qg.float(), kk, vm, ok_tok, step.scale, step.softcap)
            outs.append(o2)
            lses.append(l2)
            selected += int(ok_tok.sum())
        out, lse = merge_attention(outs, lses)
        out, _ = add_sinks(out, lse, None if step.sinks is None else step.sinks.float().view(1, hk, -1))
        if stats is not None:
            stats["select_s"] = stats.get("select_s", 0.0) + time.perf_counter() - t0
            stats["selected"] = stats.get("selected", 0) + selected * g
            stats["possible"] = stats.get("possible", 0) + b * hq * layer.get_seq_length()
        return out.reshape(b, hq, 1, d).to(step.q.dtype)

    def reference_select(self, step: Step, prefill_q=None) -> dict:
        """Loop by loop: the grid after the most padded row's sinks; each chunk's mean key; per row the chunks
        whose least similar key (cosine, over heads and tokens) is lowest, ``ceil(outliers x C)`` of them; per kv
        head the sum over its query heads of the softmax over the other chunks' landmarks, the ``budget // chunk``
        best; with every exact token (sinks and padding before the grid, outliers, the tail after it)."""
        b, hq = step.q.shape[:2]
        hk, n, d = step.k.shape[1], step.n, step.q.shape[-1]
        g = hq // hk
        pads = [0 if step.key_valid is None else sum(1 for j in range(n) if not bool(step.key_valid[bi, j]))
                for bi in range(b)]
        start = max(pads) + self.sink
        chunks = max((n - self.recent - start) // self.chunk, 0)
        out = {}
        for bi in range(b):
            lms = [[[sum(float(step.k[bi, h, start + c * self.chunk + t, x]) for t in range(self.chunk)) / self.chunk
                     for x in range(d)] for c in range(chunks)] for h in range(hk)]

            def cos(a, c):
                na, nc = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in c))
                return sum(x * y for x, y in zip(a, c)) / max(na * nc, 1e-8)

            worst = []
            for c in range(chunks):
                worst.append(min(cos([float(x) for x in step.k[bi, h, start + c * self.chunk + t]], lms[h][c])
                                 for h in range(hk) for t in range(self.chunk)))
            count = math.ceil(self.outliers * chunks) if chunks else 0
            outl = set(sorted(range(chunks), key=lambda c: worst[c])[:count])
            others = [c for c in range(chunks) if c not in outl]
            for h in range(hk):
                score = {c: 0.0 for c in others}
                for qh in range(h * g, (h + 1) * g):
                    lg = {c: sum(float(step.q[bi, qh, 0, x]) * lms[h][c][x] for x in range(d)) * step.scale
                          for c in others}
                    if not lg:
                        continue
                    top = max(lg.values())
                    z = sum(math.exp(v - top) for v in lg.values())
                    for c in others:
                        score[c] += math.exp(lg[c] - top) / z
                picked = sorted(others, key=lambda c: -score[c])[: self.topk]
                chosen = {j for j in range(n) if not (start <= j < start + chunks * self.chunk)}
                for c in set(picked) | outl:
                    chosen |= set(range(start + c * self.chunk, start + (c + 1) * self.chunk))
                out[bi, h] = {j for j in chosen if _slow.real(step.key_valid, bi, j)}
        return out
