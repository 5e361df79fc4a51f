"""Sparse prefill patterns; each returns a BlockLayout."""

from .base import PrefillPattern
from .sink_window import SinkWindow

__all__ = ["PrefillPattern", "SinkWindow"]
