"""Quest: query-aware page selection from per-page element-wise min/max keys.

Paper: "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference" (Tang et al., ICML 2024,
https://arxiv.org/abs/2406.10774). The cache keeps, per page of ``page`` tokens, the element-wise min and
max of the keys (``cache.PageMeta``, updated incrementally as tokens are appended). A page's score is the upper
bound ``sum_d max(q_d * max_d, q_d * min_d)`` of ``q . k`` over its keys; the ``budget // page`` best pages
are attended exactly. The first layers are dense (the paper skips the first two; ``dense_layers``).

Departures: GQA — a page's score for a kv head is the max over the group's query heads, so each kv page is
loaded once for the whole group (the paper's models are MHA); the page holding the newest tokens is always
selected (it is partial and holds the current token); pages holding only padding are never selected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int
from ..registry import register
from . import _slow
from .base import DecodeSelector, Step, page_bounds, top_with_forced

__all__ = ["Quest"]


@register("quest", "decode", paper="Quest (Tang et al., ICML 2024) https://arxiv.org/abs/2406.10774",
          summary="pages scored by per-page min/max keys (upper bound of q.k); top pages within the budget")
@dataclass(frozen=True)
class Quest(DecodeSelector):
    """Query-aware page selection (min/max page metadata)."""

    renamed = {"page_size": "page"}  # old spellings, accepted with a FutureWarning

    examples = ({"budget": 48, "dense_layers": "0"},)
    full_example = {"budget": 4096, "dense_layers": ""}

    page: int = 16
    dense_layers: str = "0,1"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.page, "page")
        if self.budget < self.page:
            raise ValueError(f"budget ({self.budget}) must be >= page ({self.page}): at least one page")

    def reference_select(self, step: Step, prefill_q=None) -> dict:
        """Loop by loop: Quest's page upper bounds; the newest page and the best others, ``budget // page``."""
        ub = _slow.page_upper_bounds(step, self.page)
        out = {}
        for bi, rows in enumerate(ub):
            for h, pages in enumerate(rows):
                out[bi, h] = _slow.tokens_of(_slow.top(pages, self.budget // self.page, [len(pages) - 1]), self.page,
                                             step.n)
        return out

    def page_scores(self, step: Step) -> torch.Tensor:
        """``[b, hk, pages]``: max over the group's query heads of the page upper bound; -inf for padding pages."""
        return page_bounds(step, self.page)

    def select_pages(self, step: Step):
        s = self.page_scores(step)
        forced = torch.zeros_like(s, dtype=torch.bool)
        forced[..., -1] = True
        return top_with_forced(s, self.budget // self.page, forced), self.page
