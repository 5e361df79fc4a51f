"""The transformers cache layer that a KV policy can compress, really freeing the dropped tokens.

``LongattnLayer`` behaves like transformers' ``DynamicLayer`` until a KV policy compresses it at the end of
prefill. With the same budget for every row and kv head it becomes a smaller dense cache; with per-head
budgets it holds a ``RaggedKV`` prefix (each (batch row, kv head)'s kept tokens *packed* one after another,
``[total_kept, dim]``, no padding back to the longest head) plus a uniform tail of the tokens appended since.
Both keep the original positions of the kept tokens (int32).

``get_seq_length()`` reports the *logical* length (tokens seen, compressed or not), so that transformers'
positions, masks and ``generate`` bookkeeping stay those of the uncompressed sequence. ``nbytes()`` is what
the layer really holds (storages, deduplicated). The base class and the version shims come from ``hf.py``.
"""

from __future__ import annotations

import torch

from ..hf import BaseLayer, mask_query_length
from ..ops.core import buffer_capacity
from .nbytes import storage_nbytes
from .pages import PageMeta
from .ragged import RaggedKV

__all__ = ["LongattnLayer", "APPEND_MAX"]

#: appends of at most this many tokens (decode steps) go into reserved room instead of a copy of the whole cache
APPEND_MAX = 16
#: room reserved when an append finds none: max(GROW_MIN, tokens // GROW_DIV) tokens (6% of a long cache)
GROW_MIN, GROW_DIV = 16, 16
#: a grown buffer of a long cache (room >= GROW_ALIGN tokens, from 4096 tokens on) holds a multiple of
#: GROW_ALIGN tokens, so page selectors (pages of 16-256 tokens) gather whole pages from it
#: (``ops.decode.gather_pages``); shorter caches get exactly their room (there rounding would cost more than
#: the page gather saves)
GROW_ALIGN = 256


def grown_capacity(n: int, m: int) -> int:
    """Tokens of the buffer an append of ``m`` tokens to ``n`` allocates when it finds no room: ``n + m`` plus
    ``room = max(GROW_MIN, n // GROW_DIV)``, rounded up to a multiple of ``GROW_ALIGN`` when ``room >= GROW_ALIGN``."""
    cap = n + m + max(GROW_MIN, n // GROW_DIV)
    return -(-cap // GROW_ALIGN) * GROW_ALIGN if n // GROW_DIV >= GROW_ALIGN else cap


def _append(t: torch.Tensor, new: torch.Tensor, n: int, owned: int | None) -> tuple[torch.Tensor, int]:
    """``cat([t, new], 2)`` without copying ``t`` when it is the head of a buffer this layer made (``owned``: its
    data pointer) with room left: plain transformers copies the whole cache of every layer at every decode step
    (``torch.cat``), ~20% of a step at 4K tokens on SmolLM2. Otherwise one copy into a new buffer with
    ``max(GROW_MIN, n // GROW_DIV)`` tokens of room, rounded to whole pages from 4096 tokens on
    (``grown_capacity``; its storage is what ``nbytes`` counts: at most ~12% more than the tokens held, during
    decode only). Never writes into storage it did not allocate. Returns the new view and its buffer's data
    pointer."""
    b, h, _, d = t.shape
    m = new.shape[-2]
    if t.data_ptr() != owned or buffer_capacity(t) < n + m:
        buf = t.new_empty(b, h, grown_capacity(n, m), d)
        buf[:, :, :n] = t
        t = buf[:, :, :n]
    full = t.as_strided((b, h, n + m, d), t.stride())
    full[:, :, n:] = new
    return full, full.data_ptr()


class LongattnLayer(BaseLayer):
    """A ``DynamicLayer`` that a KV policy can compress, really freeing the dropped tokens.

    States:
    - uncompressed: ``keys``/``values`` hold every token (as ``DynamicLayer``);
    - compressed, uniform budgets (every batch row and kv head keeps ``n`` tokens): ``keys``/``values`` hold
      the kept tokens followed by the tokens appended since; it is an ordinary (smaller) dense cache, attended
      by plain SDPA. ``kept_positions [b, h, n]`` (int32) say where the kept tokens were;
    - compressed, per-head budgets: ``prefix`` is a packed ``RaggedKV``; ``keys``/``values`` hold only the
      tokens appended since (the uniform tail).

    ``window`` (a sliding-window layer of a hybrid model): uncompressed, the layer holds at most the last
    ``window - 1`` tokens, as transformers' ``DynamicSlidingWindowLayer`` (``dropped`` counts those gone; the
    current forward still sees its full states). A KV policy compresses a sliding layer only when nothing has
    left its window yet (the prompt fits in it); attention over a compressed sliding layer then applies the
    window by the kept tokens' original positions (departure: those tokens stay stored until the cache ends).
    """

    def __init__(self, window: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.window = window
        self.dropped = 0  # tokens that left an uncompressed sliding window (logical start of physical token 0)
        self.prefix: RaggedKV | None = None  # ragged compressed prefix
        self.kept_positions: torch.Tensor | None = None  # uniform compressed prefix: [b, h, n] int32
        self.prefix_logical_len = 0  # tokens of the prefix before compression (0 if uncompressed)
        self.scores: torch.Tensor | None = None  # [b, h, physical] accumulated attention (H2O decode eviction)
        #: state of the decode-time selector (page metadata, selection caches), keyed by name; it describes the
        #: physical tokens, so every operation that rewrites them (compress, evict, crop, reset) clears it
        self.decode_state: dict = {}
        #: set when the apply() block that compressed this layer ended: the layer refuses further use
        self.detached = False
        self._room = (None, None)  # data pointers of the key/value buffers with room that this layer allocated

    def page_meta(self, page_size: int) -> PageMeta:
        """Min/max/sum metadata of pages of ``page_size`` physical tokens, updated incrementally to the current
        length (``PageMeta``)."""
        key = ("pages", page_size)
        meta = self.decode_state.get(key)
        if meta is None:
            meta = self.decode_state[key] = PageMeta(page_size)
        return meta.update(self.keys)

    @property
    def is_sliding(self) -> bool:  # read by transformers' mask creation
        return self.window is not None

    @classmethod
    def adopt(cls, layer: BaseLayer, window: int | None = None) -> LongattnLayer:
        """Take over a transformers layer's tensors (no copy): a ``DynamicLayer`` or, with ``window``, a
        ``DynamicSlidingWindowLayer`` (whose ``cumulative_length`` says how many tokens left the window)."""
        new = cls(window=window)
        if layer.is_initialized:
            new.lazy_initialization(layer.keys, layer.values)
            new.keys, new.values = layer.keys, layer.values
            if window is not None:
                new.dropped = max(int(getattr(layer, "cumulative_length", 0)) - new.physical_len, 0)
        return new

    # --- sizes ---------------------------------------------------------------------------------------
    @property
    def compressed(self) -> bool:
        return self.prefix is not None or self.kept_positions is not None

    @property
    def physical_len(self) -> int:
        """Tokens held in ``keys`` (uniform part)."""
        if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
            return 0
        return self.keys.shape[-2]

    @property
    def prefix_physical_len(self) -> int:
        """Kept prefix tokens stored at the start of ``keys`` (uniform compression), else 0."""
        return 0 if self.kept_positions is None else self.kept_positions.shape[-1]

    @property
    def tail_len(self) -> int:
        """Tokens appended after compression (all tokens if uncompressed)."""
        return self.physical_len - self.prefix_physical_len

    def get_seq_length(self) -> int:
        """The logical length: every token seen, kept or dropped (positions and masks follow it)."""
        return self.prefix_logical_len + self.tail_len if self.compressed else self.dropped + self.physical_len

    def get_mask_sizes(self, query_length, *args, **kwargs) -> tuple[int, int]:
        q = mask_query_length(query_length)
        if self.window is not None and not self.compressed:  # as DynamicSlidingWindowLayer
            past = self.get_seq_length()
            return min(past, self.window - 1) + q, max(past - (self.window - 1), 0)
        return self.get_seq_length() + q, 0

    def held_tensors(self) -> list:
        """The key/value storage and its bookkeeping (not the decode selector's state: ``decode_state``)."""
        return [self.prefix, self.keys, self.values, self.kept_positions, self.scores]

    def nbytes(self, seen: set | None = None) -> int:
        """Bytes of the storages behind the cached keys/values and their bookkeeping (not the decode selectors'
        state: ``decode_nbytes()``); a view that keeps a larger tensor alive counts that tensor's storage."""
        return storage_nbytes(*self.held_tensors(), seen=seen)

    def decode_nbytes(self, seen: set | None = None) -> int:
        """Bytes held by the decode selector's state (page metadata, centroids, representatives, offload store)."""
        return storage_nbytes(*self.decode_state.values(), seen=seen)

    def physical_key_valid(self, key_valid: torch.Tensor | None) -> torch.Tensor | None:
        """Map a logical ``[b, logical_len]`` key validity onto the uniform ``keys`` (kept prefix: all valid)."""
        if key_valid is None or not self.compressed:
            return key_valid
        tail = key_valid[:, self.prefix_logical_len :]
        if self.prefix is not None:
            return tail
        b = key_valid.shape[0]
        ones = torch.ones(b, self.prefix_physical_len, dtype=torch.bool, device=key_valid.device)
        return torch.cat([ones, tail], 1)

    def kept(self, b: int, h: int) -> torch.Tensor:
        """Original positions (int32, ascending) of the prefix tokens kept for batch row ``b``, kv head ``h``."""
        if self.prefix is not None:
            return self.prefix.row(b, h)[2]
        if self.kept_positions is not None:
            return self.kept_positions[b, h]
        raise ValueError("kept: this cache layer is not compressed")

    def kept_lengths(self) -> torch.Tensor:
        """``[b, h]`` number of prefix tokens kept per batch row and kv head."""
        if self.prefix is not None:
            return self.prefix.lengths.clone()
        if self.kept_positions is not None:
            b, h, n = self.kept_positions.shape
            return torch.full((b, h), n, dtype=torch.long)
        raise ValueError("kept_lengths: this cache layer is not compressed")

    # --- compression ---------------------------------------------------------------------------------
    def compress(self, idx: torch.Tensor, lengths: torch.Tensor) -> None:
        """Keep, per (batch, kv head), the tail tokens at ``idx`` (first ``lengths`` entries; indices into the
        tail, i.e. into every token on the first call) and free the rest of the tail. A compressed prefix from
        earlier calls (chunked prefill) is kept as it is."""
        self.decode_state.clear()
        t = self.tail_len
        if t == 0:
            raise ValueError("nothing to compress: no token was added since the last compression")
        lengths = lengths.to(torch.long)
        start = self.get_seq_length() - t  # logical position of the first tail token
        k0 = self.prefix_physical_len
        tail_k, tail_v = self.keys[..., k0:, :], self.values[..., k0:, :]
        uniform_new = bool((lengths == lengths.view(-1)[0]).all())
        if self.prefix is None and uniform_new:
            keep = int(lengths.view(-1)[0])
            sel = idx[..., :keep].long()
            gidx = sel.unsqueeze(-1).expand(-1, -1, -1, self.keys.shape[-1])
            new_k, new_v = torch.gather(tail_k, 2, gidx), torch.gather(tail_v, 2, gidx)
            pos = (sel + start).to(torch.int32)
            if k0:
                self.keys = torch.cat([self.keys[..., :k0, :], new_k], 2)
                self.values = torch.cat([self.values[..., :k0, :], new_v], 2)
                self.kept_positions = torch.cat([self.kept_positions, pos], -1)
            else:
                self.keys, self.values, self.kept_positions = new_k, new_v, pos
        else:
            new = RaggedKV.gather(tail_k, tail_v, idx, lengths, offset=start)
            old = self.prefix
            if old is None and self.kept_positions is not None:
                old = RaggedKV.from_uniform(self.keys[..., :k0, :], self.values[..., :k0, :], self.kept_positions)
            self.prefix = new if old is None else RaggedKV.concat(old, new)
            self.kept_positions = None
            # drop the full tensors: from here on keys/values are the uniform tail
            self.keys = self.keys[..., :0, :].clone()
            self.values = self.values[..., :0, :].clone()
        if self.prefix is not None:
            self.prefix.logical_len = start + t
        self.prefix_logical_len = start + t

    def physical_positions(self) -> torch.Tensor:
        """``[b, h, physical_len]`` original positions of the tokens in ``keys`` (uniform layers only)."""
        if self.prefix is not None:
            raise ValueError("physical_positions: per-head ragged layers have no uniform keys")
        b, h = self.keys.shape[:2]
        dev = self.keys.device
        start = self.prefix_logical_len if self.compressed else self.dropped
        tail = (torch.arange(self.tail_len, device=dev, dtype=torch.int32) + start).expand(b, h, -1)
        if self.kept_positions is None:
            return tail
        return torch.cat([self.kept_positions.to(dev), tail], -1)

    def keep_tokens(self, keep: torch.Tensor) -> None:
        """Keep only the physical tokens at ``keep [m]`` (ascending, the same for every row and kv head) and free
        the others: the layer becomes (stays) a uniform compressed cache with the kept tokens' logical positions.
        Used by a decode selector that moves tokens elsewhere (InfLLM's offload); its own state is kept, page
        metadata (which indexes physical tokens) is dropped."""
        if self.prefix is not None:
            raise ValueError("keep_tokens: not supported on per-head ragged layers")
        keep = keep.to(self.keys.device).long()
        pos = self.physical_positions()[..., keep]
        logical = self.get_seq_length()
        self.keys, self.values = self.keys[:, :, keep].contiguous(), self.values[:, :, keep].contiguous()
        self.kept_positions = pos.to(torch.int32).contiguous()
        self.prefix_logical_len = logical
        self.scores = None
        for key in [k for k in self.decode_state if isinstance(k, tuple) and k[0] == "pages"]:
            del self.decode_state[key]

    def evict(self, budget: int, protect: int) -> None:
        """Keep ``budget`` tokens per (batch, kv head): the ``protect`` most recent ones and the best
        ``scores`` among the others (H2O's greedy eviction while generating)."""
        if self.prefix is not None:
            raise ValueError("evict: not supported on per-head ragged layers")
        p = self.physical_len
        if p <= budget:
            return
        if self.scores is None or self.scores.shape[-1] != p:
            raise ValueError("evict: the layer has no accumulated scores for all its tokens")
        self.decode_state.clear()
        s = self.scores.clone()
        s[..., max(p - protect, 0) :] = float("inf")
        keep = torch.topk(s, budget, dim=-1).indices.sort(-1).values  # [b, h, budget]
        pos = torch.gather(self.physical_positions(), -1, keep.to(torch.int64))
        g = keep.unsqueeze(-1).expand(-1, -1, -1, self.keys.shape[-1])
        logical = self.get_seq_length()
        self.keys, self.values = torch.gather(self.keys, 2, g), torch.gather(self.values, 2, g)
        self.scores = torch.gather(self.scores, -1, keep)
        self.kept_positions = pos.to(torch.int32)
        self.prefix_logical_len = logical

    # --- transformers hooks ------------------------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        if self.detached:
            raise ValueError("this cache was compressed inside `with longattn.apply(...)` (per-head budgets, logical "
                             "positions) and is only valid there; use it inside an apply() block, or keep a plain "
                             "DynamicCache for use outside")
        if self.window is None and key_states.shape[-2] <= APPEND_MAX and self.physical_len > 0:
            n = self.physical_len
            self.keys, pk = _append(self.keys, key_states, n, self._room[0])
            self.values, pv = _append(self.values, value_states, n, self._room[1])
            self._room = (pk, pv)  # the buffers this layer allocated (only those are written past their tokens)
            return self.keys, self.values
        full_k, full_v = super().update(key_states, value_states, *args, **kwargs)
        if self.window is not None and not self.compressed and self.physical_len > self.window - 1:
            cut = self.physical_len - (self.window - 1)  # keep the last window - 1 tokens, as transformers does
            self.keys, self.values = full_k[..., cut:, :], full_v[..., cut:, :]
            if cut > self.physical_len:  # a long forward (the prefill): do not keep its whole storage alive
                self.keys, self.values = self.keys.clone(), self.values.clone()
            self.dropped += cut
            self.decode_state.clear()
        return full_k, full_v

    def crop(self, tokens_to_remove: int) -> None:
        if self.compressed and tokens_to_remove < 0 and -tokens_to_remove > self.tail_len:
            raise ValueError(
                f"crop: can remove at most the {self.tail_len} tokens appended after compression, "
                f"got {-tokens_to_remove}"
            )
        self.decode_state.clear()
        super().crop(tokens_to_remove)

    def select_rows(self, idx: torch.Tensor, what: str = "batch_select_indices") -> None:
        """Keep batch rows ``idx`` (new row ``i`` = old row ``idx[i]``; repeats allowed): the uniform keys, the
        ragged prefix, the kept positions and the H2O scores alike. Page metadata is recomputed from the keys;
        another decode selector's state (clusters, representatives) cannot follow and is refused."""
        if not self.is_initialized or self.keys is None:
            return
        others = [k for k in self.decode_state if not (isinstance(k, tuple) and k[0] == "pages")]
        if others:
            raise ValueError(f"{what}: the decode selector state {others} of this cache cannot follow reordered or "
                             "repeated batch rows (beam search / several return sequences); decode greedily or "
                             "sample one sequence per prompt")
        self.decode_state.clear()
        idx = idx.to(self.keys.device).long()
        if self.keys.numel():
            self.keys = self.keys.index_select(0, idx)
            self.values = self.values.index_select(0, idx)
        if self.kept_positions is not None:
            self.kept_positions = self.kept_positions.index_select(0, idx.to(self.kept_positions.device))
        if self.scores is not None:
            self.scores = self.scores.index_select(0, idx.to(self.scores.device))
        if self.prefix is not None:
            self.prefix = self.prefix.select_rows(idx.cpu())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self.compressed and not self.decode_state:
            return super().batch_repeat_interleave(repeats)
        b = self.prefix.batch if self.prefix is not None else self.keys.shape[0]
        self.select_rows(torch.arange(b).repeat_interleave(repeats), "batch_repeat_interleave (num_return_sequences)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.compressed and not self.decode_state:
            return super().batch_select_indices(indices)
        b = self.prefix.batch if self.prefix is not None else self.keys.shape[0]
        self.select_rows(torch.arange(b)[indices.cpu()] if indices.dtype == torch.bool else indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.compressed and not self.decode_state:
            return super().reorder_cache(beam_idx)
        self.select_rows(beam_idx, "reorder_cache (beam search)")

    def reset(self) -> None:
        self.detached = False
        self.dropped = 0
        self.prefix = None
        self.kept_positions = None
        self.scores = None
        self.prefix_logical_len = 0
        self.decode_state.clear()
        super().reset()
