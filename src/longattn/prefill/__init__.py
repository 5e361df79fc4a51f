"""Sparse prefill patterns; each returns a BlockLayout (one file per pattern)."""

from .base import PrefillPattern
from .bilevel_routing import BilevelRouting
from .block_topk import BlockTopK
from .core_context import CoreContext
from .hierarchical import Hierarchical
from .linear_estimate import LinearEstimate
from .long_range_grouping import LongRangeGrouping
from .lowbit_topk import LowBitTopK
from .mixed import Mixed
from .neighborhood import Neighborhood
from .shifted_groups import ShiftedGroups
from .sink_window import SinkWindow
from .strided_window import StridedWindow
from .tri_shape import TriShape
from .vertical_slash import VerticalSlash

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
    "PrefillPattern",
    "ShiftedGroups",
    "SinkWindow",
    "StridedWindow",
    "TriShape",
    "VerticalSlash",
]
