"""longattn: training-free long-context attention methods behind one API, measured side by side.

The public API is built from the method families' ``__all__`` (``prefill``, ``kv``, ``decode``, ``calibrate``: every method
class, discovered from its file) plus the core below. Importing has no side effects: nothing is registered with
transformers until ``apply()`` runs.
"""

from . import calibrate, decode, kv, prefill
from .api import Recipe, apply, parse, parse_method
from .cache import LongattnLayer, RaggedKV, cache_nbytes
from .layout import BlockLayout, TokenRule
from .ops import block_sparse_attention, merge_attention
from .recall import attention_recall

__version__ = "0.1.0"

_CORE = ["BlockLayout", "LongattnLayer", "RaggedKV", "Recipe", "TokenRule", "apply", "attention_recall",
         "block_sparse_attention", "cache_nbytes", "merge_attention", "parse", "parse_method"]
for _family in (prefill, kv, decode, calibrate):
    globals().update({_n: getattr(_family, _n) for _n in _family.__all__})
__all__ = sorted(set(_CORE + prefill.__all__ + kv.__all__ + decode.__all__ + calibrate.__all__))
del _family
