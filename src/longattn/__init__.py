"""longattn: training-free long-context attention methods behind one API, measured side by side.

Importing has no side effects: nothing is registered with transformers until ``apply()`` runs.
"""

from .api import Recipe, apply, parse, parse_method
from .cache import LongattnLayer, RaggedKV, cache_nbytes
from .kv import (
    H2O,
    TOVA,
    AdaptiveHeads,
    Chunked,
    Compose,
    Dense,
    DuoAttention,
    KNorm,
    KVPolicy,
    MoABudgets,
    Novelty,
    PyramidKV,
    QueryAware,
    RandomPolicy,
    SnapKV,
    StreamingLLM,
)
from .layout import BlockLayout, TokenRule
from .ops import block_sparse_attention, merge_attention
from .prefill import (
    BilevelRouting,
    BlockTopK,
    CoreContext,
    Hierarchical,
    LinearEstimate,
    LongRangeGrouping,
    LowBitTopK,
    Mixed,
    Neighborhood,
    PrefillPattern,
    ShiftedGroups,
    SinkWindow,
    StridedWindow,
    TriShape,
    VerticalSlash,
)
from .recall import attention_recall

__version__ = "0.1.0"

__all__ = [
    "BilevelRouting",
    "BlockTopK",
    "CoreContext",
    "Hierarchical",
    "LinearEstimate",
    "LongRangeGrouping",
    "LowBitTopK",
    "Mixed",
    "Neighborhood",
    "ShiftedGroups",
    "StridedWindow",
    "TriShape",
    "VerticalSlash",
    "TokenRule",
    "attention_recall",
    "TOVA",
    "AdaptiveHeads",
    "BlockLayout",
    "Chunked",
    "Compose",
    "Dense",
    "DuoAttention",
    "H2O",
    "KNorm",
    "MoABudgets",
    "Novelty",
    "PyramidKV",
    "QueryAware",
    "RandomPolicy",
    "KVPolicy",
    "LongattnLayer",
    "PrefillPattern",
    "RaggedKV",
    "Recipe",
    "SinkWindow",
    "SnapKV",
    "StreamingLLM",
    "apply",
    "block_sparse_attention",
    "cache_nbytes",
    "merge_attention",
    "parse",
    "parse_method",
]
