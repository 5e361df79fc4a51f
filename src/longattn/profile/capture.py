"""Capture real attention inputs: the q, k, v a model's layers see on a long calibration prompt.

The prompt is made by the library (a needle-in-a-haystack sample over CPython standard-library source, the
question at the end), so it is real text on every machine and needs no download. The forward pass stops right
after the deepest requested layer, so capturing early layers of a long prompt is cheap.
"""

from __future__ import annotations

import torch

from ..checks import check_int

__all__ = ["calibration_ids", "capture_qkv"]


class _Stop(Exception):
    pass


def calibration_ids(tokenizer, length: int, seed: int = 0, index: int = 0) -> list[int]:
    """``length`` token ids: the end of a stdlib-haystack NIAH context + question (chat template applied)."""
    from ..bench.prompts import encode
    from ..bench.tasks.niah import Niah

    check_int(length, "length", 64)
    extra = 0
    while True:  # the sample lands a little short of its target; ask for more and keep the last tokens
        s = Niah(haystack="stdlib").make(tokenizer, length + extra, index, seed)
        ctx, rest = encode(tokenizer, s)
        ids = ctx + rest
        if len(ids) >= length or extra > length:
            return ids[-length:]
        extra += max(64, length // 16)


def capture_qkv(model, ids: list[int] | torch.Tensor, layers) -> dict[int, tuple[torch.Tensor, ...]]:
    """``{layer: (q, k, v)}`` as the attention function receives them (after RoPE, GQA unrepeated,
    ``[1, heads, n, dim]``) for a dense forward of ``ids``."""
    from .. import api

    layers = sorted({int(x) for x in layers})
    n_layers = model.config.num_hidden_layers
    if not layers or layers[0] < 0 or layers[-1] >= n_layers:
        raise ValueError(f"layers must be in [0, {n_layers}), got {layers}")
    got: dict[int, tuple[torch.Tensor, ...]] = {}
    last = layers[-1]

    def observe(layer_idx, q, k, v, key_valid):
        if layer_idx in layers:
            got[layer_idx] = (q.detach().clone(), k.detach().clone(), v.detach().clone())
        if layer_idx == last:
            raise _Stop

    ids_t = ids if isinstance(ids, torch.Tensor) else torch.tensor([ids])
    with torch.no_grad(), api.apply(model, "dense") as session, session.observe(observe):
        try:
            model(input_ids=ids_t.to(model.device), use_cache=False)
        except _Stop:
            pass
    return got
