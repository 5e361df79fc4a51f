"""Attention calibration (``calibrate`` slot): methods that change how much attention each token receives, on
the dense attention of the full-attention layers, in prefill and decode (one file per method, discovered)."""

from ..registry import discover

__all__ = discover(__name__, globals())
