"""Decode-time selectors: at each generated token, pick the cached tokens (pages, blocks, clusters) to attend."""

from .base import DecodeSelector, Step
from .infllm import InfLLM
from .landmark import Landmark
from .longheads import LongHeads
from .lserve_pages import LServePages
from .quest import Quest
from .squeezed import Squeezed
from .tidal_decode import TidalDecode
from .token_select import TokenSelect

__all__ = ["DecodeSelector", "InfLLM", "LServePages", "Landmark", "LongHeads", "Quest", "Squeezed", "Step",
           "TidalDecode", "TokenSelect"]
