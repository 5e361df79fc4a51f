"""LServe: hierarchical page selection with a constant page budget, reused across steps, plus streaming heads.

Paper: "LServe: Efficient Long-sequence LLM Serving with Unified Sparse Attention" (Yang et al., MLSys 2025,
https://arxiv.org/abs/2502.14866). Physical pages of ``page`` tokens are what is loaded; each holds
``page / logical_page`` logical pages with Quest-style min/max key metadata (``cache.PageMeta``,
incremental). A physical page's score is the max of its logical pages' upper bounds (max over the group's query
heads); the best ``budget // page`` physical pages are attended — a constant budget whatever the length.
The selection is reused for ``reuse`` consecutive steps (the paper's reusable page selector), the pages
appended since being added. With ``streaming > 0`` that fraction of kv heads (those with the lowest retrieval
score in the ``profile``, as DuoAttention) are streaming heads: they attend to the first ``sink`` and the last
``recent`` tokens only.

Departure: the streaming heads come from our head profile (``longattn profile heads``) instead of trained
DuoAttention gates, unless the gates profile is given (``profile=smollm2-135m-gates``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache.state import DecodeState
from ..checks import check_float, check_int
from ..hf import kv_heads
from ..padding import first_real
from ..profiles import load_profile
from ..registry import register
from . import _slow
from .base import DecodeSelector, Step, page_bounds, pages_to_tokens, top_with_forced

__all__ = ["LServePages", "LServeState"]



@dataclass
class LServeState(DecodeState):
    """The last page selection, reused for ``reuse`` steps."""

    pages: torch.Tensor  # [b, hk, pages] selected physical pages
    n_pages: int  # pages of the cache when they were selected
    age: int = 0  # steps it has been reused

@register("lserve_pages", "decode", paper="LServe (Yang et al., MLSys 2025) https://arxiv.org/abs/2502.14866",
          summary="hierarchical (logical/physical) page selection, constant budget, reused; streaming heads")
@dataclass(frozen=True)
class LServePages(DecodeSelector):
    """Hierarchical page selection with a constant budget, reused across steps, optional streaming heads."""

    renamed = {"local": "recent", "page_size": "page"}  # old spellings, accepted with a FutureWarning

    examples = ({"budget": 64, "page": 32, "logical_page": 8},)
    full_example = {"budget": 4096, "page": 32, "logical_page": 8}

    page: int = 64
    logical_page: int = 16
    reuse: int = 4
    streaming: float = 0.0
    profile: str = "smollm2-135m"
    sink: int = 64
    recent: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.page, "page")
        check_int(self.logical_page, "logical_page")
        check_int(self.reuse, "reuse")
        check_int(self.sink, "sink", 0)
        check_int(self.recent, "recent", 1)
        check_float(self.streaming, "streaming", 0.0, 1.0, lo_open=False)
        if self.page % self.logical_page:
            raise ValueError(f"logical_page ({self.logical_page}) must divide page ({self.page})")
        if self.budget < self.page:
            raise ValueError(f"budget ({self.budget}) must be >= page ({self.page}): at least one page")
        if self.streaming > 0:
            object.__setattr__(self, "_profile", load_profile(self.profile))

    def prepare(self, model) -> None:
        super().prepare(model)
        if self.streaming > 0:
            cfg = model.config
            self._profile.check(cfg.num_hidden_layers, kv_heads(cfg), "lserve_pages")

    def streaming_heads(self, layer_idx: int) -> list[int]:
        """kv heads of ``layer_idx`` that stream: the ``streaming`` fraction of lowest-scored heads model-wide."""
        if self.streaming <= 0:
            return []
        p = self._profile
        order = sorted((p.scores[li][h], li, h) for li in range(p.num_layers) for h in range(p.num_kv_heads))
        count = round(self.streaming * len(order))
        return sorted(h for _, li, h in order[:count] if li == layer_idx)

    def reference_select(self, step: Step, prefill_q=None) -> dict:
        """Loop by loop (a fresh selection): a physical page scores the best Quest bound of its logical pages; the
        newest and the best others, ``budget // page``; a streaming head attends its sinks and recent tokens."""
        ub = _slow.page_upper_bounds(step, self.logical_page)
        r = self.page // self.logical_page
        streaming = set(self.streaming_heads(step.layer_idx))
        out = {}
        for bi, rows in enumerate(ub):
            f = _slow.first_real(step.key_valid, bi)
            for h, logical in enumerate(rows):
                if h in streaming:
                    sinks = set(range(f, min(f + self.sink, step.n)))
                    start = max(step.n - self.recent, f + self.sink, 0)
                    out[bi, h] = sinks | set(range(start, step.n))
                    continue
                phys = [max(logical[j : j + r]) for j in range(0, len(logical), r)]
                out[bi, h] = _slow.tokens_of(_slow.top(phys, self.budget // self.page, [len(phys) - 1]), self.page,
                                             step.n)
        return out

    def page_scores(self, step: Step) -> torch.Tensor:
        """``[b, hk, physical pages]``."""
        s = page_bounds(step, self.logical_page)  # [b, hk, logical pages]
        r = self.page // self.logical_page
        pad = -s.shape[-1] % r
        s = torch.nn.functional.pad(s, (0, pad), value=float("-inf"))
        return s.view(*s.shape[:2], -1, r).amax(-1)

    def select(self, step: Step):
        n, ps = step.n, self.page
        st = step.state.get("lserve")
        if st is not None and st.age < self.reuse - 1:
            st.age += 1
            last = st.pages[..., -1:]
            extra = torch.arange(st.n_pages, -(-n // ps), device=last.device).expand(*last.shape[:2], -1)
            pages = torch.cat([st.pages, extra], -1)
        else:
            s = self.page_scores(step)
            forced = torch.zeros_like(s, dtype=torch.bool)
            forced[..., -1] = True
            pages = top_with_forced(s, self.budget // ps, forced)
            st = step.state["lserve"] = LServeState(pages, s.shape[-1])
        idx, valid = pages_to_tokens(pages, ps, n)
        heads = self.streaming_heads(step.layer_idx)
        if heads:
            idx, valid = self._stream(step, idx, valid, heads)
        return idx, valid

    def _stream(self, step: Step, idx, valid, heads):
        """Replace the rows of streaming heads by sinks + local window (padded to the same slot count)."""
        b, hk, n, dev = step.k.shape[0], step.k.shape[1], step.n, step.k.device
        m = max(idx.shape[-1], self.sink + self.recent)
        if idx.shape[-1] < m:
            grow = m - idx.shape[-1]
            idx = torch.nn.functional.pad(idx, (0, grow))
            base = torch.ones(b, hk, idx.shape[-1] - grow, dtype=torch.bool, device=dev) if valid is None else valid
            valid = torch.cat([base, torch.zeros(b, hk, grow, dtype=torch.bool, device=dev)], -1)
        elif valid is None:
            valid = torch.ones_like(idx, dtype=torch.bool)
        first = first_real(step.key_valid, b, dev)
        sl = torch.arange(m, device=dev)
        sink_pos = first[:, None] + sl[None]  # [b, m]
        local_start = torch.clamp(torch.full_like(first, n - self.recent), min=0)
        local_start = torch.maximum(local_start, first + self.sink)  # no overlap with the sinks
        loc_pos = local_start[:, None] + sl[None] - self.sink
        pos = torch.where(sl[None] < self.sink, sink_pos, loc_pos)
        ok = torch.where(sl[None] < self.sink, sink_pos < torch.minimum(first + self.sink, torch.full_like(first, n))[:, None],
                         (sl[None] < self.sink + self.recent) & (loc_pos < n) & (loc_pos >= 0))
        idx, valid = idx.clone(), valid.clone()
        for h in heads:
            idx[:, h] = pos.clamp(0, n - 1)
            valid[:, h] = ok
        return idx, valid
