"""Sequence-parallel attention on torch.distributed (gloo on CPU, NCCL on GPU): ring / zigzag ring, all-gather
K/V, Ulysses, DistAttention decode, LASP-2 for linear attention."""

from .allgather import allgather_kv
from .blocks import LAYOUTS, rank_ranges, shard, unshard
from .comm import STATS, PeerLostError
from .dist_decode import dist_decode
from .lasp2 import hybrid_attention, lasp2
from .ring import ring_attention
from .ulysses import ulysses

__all__ = ["LAYOUTS", "STATS", "PeerLostError", "allgather_kv", "dist_decode", "hybrid_attention", "lasp2",
           "rank_ranges", "ring_attention", "shard", "ulysses", "unshard"]
