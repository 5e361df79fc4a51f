"""Trainable long-sequence token mixers, one file each (discovered: a new file registers itself), all behind one
interface: ``mixer(x [batch, seq, dim], mask [batch, seq] bool or None) -> [batch, seq, dim]``, causal or
bidirectional where the paper has both, and, for mixers with a recurrent form, ``init_state`` / ``step``.
``longattn train`` trains them on one task, one budget and one machine."""

from ..registry import discover

__all__ = discover(__name__, globals())
