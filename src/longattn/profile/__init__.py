"""Head analysis: retrieval-head profiles for DuoAttention / MoA budgets."""

from .heads import retrieval_scores, write_profile

__all__ = ["retrieval_scores", "write_profile"]
