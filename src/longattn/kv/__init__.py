"""KV-cache policies applied at the end of prefill."""

from .base import KVPolicy, ScorerPolicy
from .dense import Dense
from .snapkv import SnapKV
from .streaming_llm import StreamingLLM

__all__ = ["Dense", "KVPolicy", "ScorerPolicy", "SnapKV", "StreamingLLM"]
