"""Sequence-parallel attention (not implemented yet)."""
