"""Attention kernels, one backend per file: block-sparse prefill (``flex``, ``gather``, ``dense``, chosen in
``dispatch``), attention over a compressed ragged cache (``ragged``), decode (``decode``), chunked linear
attention (``linear``), the log-sum-exp merge (``merge``)."""

from .dispatch import BACKENDS, FLEX_MIN_Q, block_sparse_attention, can_run, choose_backend
from .merge import merge_attention

__all__ = ["BACKENDS", "FLEX_MIN_Q", "block_sparse_attention", "can_run", "choose_backend", "merge_attention"]
