"""KV-cache policies applied at the end of prefill."""

from .adaptive_heads import AdaptiveHeads
from .base import KVPolicy, Wrapper
from .dense import Dense
from .duo_attention import DuoAttention
from .h2o import H2O
from .knorm import KNorm
from .moa_budgets import MoABudgets
from .novelty import Novelty
from .pyramidkv import PyramidKV
from .random import RandomPolicy
from .snapkv import SnapKV
from .streaming_llm import StreamingLLM
from .tova import TOVA
from .wrappers import Chunked, Compose, QueryAware

__all__ = [
    "TOVA", "AdaptiveHeads", "Chunked", "Compose", "Dense", "DuoAttention", "H2O", "KNorm", "KVPolicy",
    "MoABudgets", "Novelty", "PyramidKV", "QueryAware", "RandomPolicy", "SnapKV", "StreamingLLM",
    "Wrapper",
]
