"""Head analysis: retrieval-head profiles (DuoAttention / MoA budgets), per-head prefill pattern search, q/k
capture."""

from .capture import calibration_ids, capture_qkv
from .heads import retrieval_scores, write_profile
from .search import search_patterns

__all__ = ["calibration_ids", "capture_qkv", "retrieval_scores", "search_patterns", "write_profile"]
