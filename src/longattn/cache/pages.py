"""Decode page metadata: per-page element-wise min / max / sum of the keys, updated incrementally.

Quest, LServe and Landmark score pages of consecutive physical tokens by these summaries; they live in the
cache layer (``LongattnLayer.page_meta``) and grow with it.
"""

from __future__ import annotations

import torch

from .state import DecodeState

__all__ = ["PageMeta"]


class PageMeta(DecodeState):
    """Element-wise min, max and sum of the keys of every page of ``page_size`` consecutive physical tokens,
    ``[b, kv_heads, pages, d]`` (min/max in the keys' dtype, sum in float32), kept up to date incrementally:
    ``update(keys)`` recomputes only the last (partial) page and the pages appended since the previous call, in
    preallocated buffers that grow by doubling (no copy of all pages per step). The last page may be partial;
    ``counts()`` gives each page's token count."""

    def __init__(self, page_size: int) -> None:
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
        self.page_size = page_size
        self.n = 0  # tokens covered
        self._min = self._max = self._sum = None
        self.recomputed_pages = 0  # pages (re)computed in total: the test of incrementality reads it

    @property
    def pages(self) -> int:
        return -(-self.n // self.page_size)

    @property
    def kmin(self) -> torch.Tensor:
        return self._min[:, :, : self.pages]

    @property
    def kmax(self) -> torch.Tensor:
        return self._max[:, :, : self.pages]

    @property
    def ksum(self) -> torch.Tensor:
        return self._sum[:, :, : self.pages]

    def counts(self) -> torch.Tensor:
        """``[pages]`` tokens in each page (``page_size`` except maybe the last)."""
        dev = self._sum.device if self._sum is not None else None
        c = torch.full((self.pages,), self.page_size, dtype=torch.float32, device=dev)
        if self.pages and self.n % self.page_size:
            c[-1] = self.n % self.page_size
        return c

    def kmean(self) -> torch.Tensor:
        return self.ksum / self.counts().view(1, 1, -1, 1)

    def update(self, keys: torch.Tensor) -> PageMeta:
        """Cover ``keys [b, h, n, d]``, of which the first ``self.n`` tokens are unchanged since the last call."""
        b, h, n, d = keys.shape
        if n < self.n:
            raise ValueError(f"PageMeta.update: the cache shrank from {self.n} to {n} tokens; rebuild the metadata")
        if n == self.n and self._min is not None:
            return self
        p = self.page_size
        first = self.n // p  # the first page that changed (the partial one, or the first new one)
        pages = -(-n // p)
        if n == self.n + 1 and self._min is not None and self._min.shape[2] >= pages:
            # one decode step: fold the new key into its page (3 element-wise ops instead of re-reducing the page)
            k = keys[:, :, n - 1]
            i = pages - 1
            if self.n % p == 0:  # the key opens a new page
                self._min[:, :, i], self._max[:, :, i], self._sum[:, :, i] = k, k, k.float()
            else:
                self._min[:, :, i] = torch.minimum(self._min[:, :, i], k)
                self._max[:, :, i] = torch.maximum(self._max[:, :, i], k)
                self._sum[:, :, i] += k.float()
            self.recomputed_pages += 1
            self.n = n
            return self
        if self._min is None or self._min.shape[2] < pages:
            cap = max(pages, 2 * (self._min.shape[2] if self._min is not None else 0), 16)
            new = [torch.empty(b, h, cap, d, dtype=dt, device=keys.device)
                   for dt in (keys.dtype, keys.dtype, torch.float32)]
            if self._min is not None:
                for dst, src in zip(new, (self._min, self._max, self._sum)):
                    dst[:, :, :first] = src[:, :, :first]
            self._min, self._max, self._sum = new
        seg = keys[:, :, first * p : n]
        m = seg.shape[2]
        full = pages - first
        pad = full * p - m
        if pad:
            big = torch.finfo(keys.dtype).max
            seg_lo = torch.nn.functional.pad(seg, (0, 0, 0, pad), value=big)
            seg_hi = torch.nn.functional.pad(seg, (0, 0, 0, pad), value=-big)
            seg_0 = torch.nn.functional.pad(seg.float(), (0, 0, 0, pad), value=0.0)
        else:
            seg_lo = seg_hi = seg
            seg_0 = seg.float()
        self._min[:, :, first:pages] = seg_lo.reshape(b, h, full, p, d).amin(3)
        self._max[:, :, first:pages] = seg_hi.reshape(b, h, full, p, d).amax(3)
        self._sum[:, :, first:pages] = seg_0.reshape(b, h, full, p, d).sum(3)
        self.recomputed_pages += full
        self.n = n
        return self

    def held_tensors(self) -> list:
        """The preallocated buffers (their whole capacity is memory held)."""
        return [self._min, self._max, self._sum]
