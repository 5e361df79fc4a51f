"""Attention kernels: block-sparse prefill, lse merge."""

from .block_sparse import BACKENDS, block_sparse_attention, can_run, choose_backend
from .merge import merge_attention

__all__ = ["BACKENDS", "block_sparse_attention", "can_run", "choose_backend", "merge_attention"]
