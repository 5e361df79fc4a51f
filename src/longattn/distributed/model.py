"""A Hugging Face model's prefill split across processes (sequence parallel), and decoding from the split cache.

For a prompt too long for one process: every rank runs the whole model on its shard of the prompt (embeddings,
norms and MLPs are per token; RoPE gets the shard's global ``position_ids``), and at every attention layer the
ranks exchange keys and values by one of the sequence-parallel methods of this package:

- ``ring``: ring attention, contiguous shards (``ring.ring_attention``);
- ``zigzag``: ring attention over the zigzag layout (chunks ``r`` and ``2P - 1 - r``: equal causal work);
- ``ulysses``: DeepSpeed-Ulysses head all-to-all (``ulysses.ulysses``; query heads divisible by the ranks),
  through DeepSpeed's ``DistributedAttention`` with ``backend="deepspeed"`` when that package is installed.

Each rank's cache keeps only its shard (``1/P`` of the context's keys and values: the memory the split saves
stays saved while decoding). Decoding runs the model on every rank (the new token is the same everywhere); at
each attention layer every rank attends the new queries over its slice and one all-gather merges the partial
outputs by log-sum-exp (DistAttention, ``dist_decode``): exactly the attention over the whole cache. The decoded
tokens' keys are appended to every rank's cache by the model (a few tokens) but count on one rank only (the
last); the logits of the prompt's last token come from the rank holding it, and each greedy token is broadcast
from rank 0, so every rank decodes the same tokens.

Sliding-window layers (Gemma 3, Mistral with a window, gpt-oss): one all-gather of that layer's keys and values
(freed after the layer) and each local query attends its window; every rank then holds the prompt's last
``window - 1`` tokens for that layer, as one process does, and decodes it locally. Sink logits (gpt-oss) are
added to the merged log-sum-exp (ring and zigzag). Refused by name: logit softcapping (Gemma 2), and Ulysses
with sinks. Batch 1, no padding, no recipe (dense attention).
"""

from __future__ import annotations

import time

import torch

from .. import hf
from ..ops.core import add_sinks
from ..ops.dense import masked_grouped
from .blocks import positions, rank_ranges, split_lengths, unshard
from .comm import all_gather_equal, all_gather_var, compute_timer, guard, world
from .dist_decode import dist_decode
from .ring import ring_attention
from .ulysses import ulysses

__all__ = ["MODES", "check_model", "local_lengths", "sp_generate"]

MODES = ("ring", "zigzag", "ulysses")
NAME = "longattn_sp"
_STATES: dict[int, _State] = {}


def check_model(model, mode: str, nproc: int) -> None:
    """Refuse, before any work, what the sequence-parallel prefill cannot run exactly (one clear line each)."""
    if mode not in MODES:
        raise ValueError(f"--dist must be one of {', '.join(MODES)}, got {mode!r}")
    hf.check_model(model)
    cfg = hf.text_config(model.config)
    feats = hf.model_features(model)
    if "softcap" in feats:
        raise ValueError(f"--dist {mode}: {cfg.model_type!r} caps its attention logits (softcap), which the "
                         "sequence-parallel prefill does not run")
    if "sinks" in feats and mode == "ulysses":
        raise ValueError(f"--dist ulysses: {cfg.model_type!r} has sink logits, which need the merged log-sum-exp; "
                         "use ring or zigzag")
    if mode == "ulysses" and cfg.num_attention_heads % nproc:
        raise ValueError(f"--dist ulysses: the model's {cfg.num_attention_heads} query heads are not divisible by "
                         f"{nproc} ranks; use ring or zigzag, or a rank count that divides the heads")


def local_lengths(n: int, mode: str, nproc: int) -> list[int]:
    """Every rank's share of an ``n``-token prompt (the layout of ``mode``)."""
    if mode == "zigzag":
        if n < 2 * nproc:
            raise ValueError(f"--dist zigzag: a {n}-token prompt cannot be cut into {2 * nproc} chunks")
        sizes = split_lengths(n, 2 * nproc)
        return [sizes[r] + sizes[2 * nproc - 1 - r] for r in range(nproc)]
    if n < nproc:
        raise ValueError(f"--dist {mode}: a {n}-token prompt is shorter than the {nproc} ranks")
    return split_lengths(n, nproc)


class _State:
    def __init__(self, mode, group, lengths, kernel, backend):
        self.mode, self.group, self.lengths, self.kernel, self.backend = mode, group, lengths, kernel, backend
        self.layout = "zigzag" if mode == "zigzag" else "contiguous"
        self.rank, self.world = world(group)
        self.decoding = False
        self.cache = None


def _attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    st = _STATES.get(id(module))
    if st is None:
        raise RuntimeError("the 'longattn_sp' attention implementation is only usable inside sp_generate()")
    feats = hf.call_features(module, kwargs)
    if feats.softcap:
        raise ValueError("--dist: logit softcapping reached the sequence-parallel attention")
    if attention_mask is not None:
        raise ValueError("--dist: padded inputs are not supported (batch 1, no padding)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    n_local = st.lengths[st.rank]
    if not st.decoding and (key.shape[2] != n_local or query.shape[2] != n_local):
        raise RuntimeError(f"sequence-parallel prefill: expected {n_local} local tokens in an empty cache, got "
                           f"{query.shape[2]} queries over {key.shape[2]} keys")
    lse = None
    if feats.window:  # a sliding-window layer: every rank holds the window itself
        if st.decoding:
            out, lse = _window_decode(query, key, value, feats.window, scale)
        else:
            out, lse = _window_prefill(query, key, value, feats.window, scale, st, module.layer_idx)
    elif st.decoding:
        out, lse = _decode(query, key, value, n_local, st.rank == st.world - 1, scale, st.group)
    elif st.mode == "ulysses":
        out = ulysses(query, key, value, group=st.group, causal=True, layout=st.layout, scale=scale,
                      kernel=st.kernel, lengths=st.lengths, backend=st.backend)
    else:
        out, lse = ring_attention(query, key, value, group=st.group, causal=True, layout=st.layout, scale=scale,
                                  kernel=st.kernel, lengths=st.lengths, return_lse=True)
    if feats.sinks is not None:  # one more softmax entry per head, no value: exact on the merged lse
        if lse is None:
            raise ValueError("--dist ulysses: sink logits need the log-sum-exp; use ring or zigzag")
        out, _ = add_sinks(out.float(), lse.float(), feats.sinks.float().view(1, -1, 1))
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _window_prefill(q, k, v, window: int, scale: float, st, layer_idx: int, chunk: int = 1024):
    """A sliding-window layer's prefill: one all-gather of every rank's keys and values (this layer's, freed after
    it), each local query attends the ``window`` positions up to its own (in query chunks), and the layer's cache
    is set to the prompt's last ``window - 1`` tokens on every rank (what one process's cache holds)."""
    with compute_timer():
        kv = torch.stack([k, v])  # [2, b, hk, n_local, d]
    parts = all_gather_var(kv, st.lengths, 3, "dist window prefill", st.group)
    with compute_timer():
        full = unshard(parts, st.layout, dim=3)  # [2, b, hk, N, d], global order
        n = full.shape[3]
        outs, lses, off = [], [], 0
        for s, e in rank_ranges(st.lengths, st.layout)[st.rank]:
            for c0 in range(s, e, chunk):
                c1 = min(e, c0 + chunk)
                k0 = max(0, c0 - window + 1)
                qpos = torch.arange(c0, c1, device=q.device)[:, None]
                kpos = torch.arange(k0, c1, device=q.device)[None, :]
                allowed = (kpos <= qpos) & (kpos > qpos - window)
                qc = q[:, :, off + c0 - s : off + c1 - s]
                o, lz = masked_grouped(qc, full[0][:, :, k0:c1], full[1][:, :, k0:c1], allowed, scale, return_lse=True)
                outs.append(o)
                lses.append(lz)
            off += e - s
        layer = st.cache.layers[layer_idx]
        keep = max(0, n - (window - 1))
        layer.keys, layer.values = full[0][:, :, keep:].clone(), full[1][:, :, keep:].clone()
        layer.cumulative_length = n
    return torch.cat(outs, 2), torch.cat(lses, 2)


def _window_decode(q, k, v, window: int, scale: float):
    """A sliding-window layer while decoding: the cache (the same on every rank) already is the window."""
    nq, nk = q.shape[2], k.shape[2]
    if nq != 1 or nk > window:
        raise RuntimeError(f"sequence-parallel decode: one query over at most {window} window keys, got {nq} over {nk}")
    with compute_timer():
        return masked_grouped(q, k, v, None, scale, return_lse=True)


def _decode(q, k, v, n_local: int, owner: bool, scale: float, group):
    """New queries ``q [1, hq, nq, d]`` over this rank's cache ``k, v [1, hk, n_local + t, d]`` (its prompt shard
    and the ``t`` tokens decoded so far, the last ``nq`` of them the queries' own): the prompt shard is all
    allowed, the decoded tokens only on the owner and causally; ``dist_decode`` merges every rank's part.
    Returns ``(out, lse)``."""
    nq, nk = q.shape[2], k.shape[2]
    t = nk - n_local
    allowed = torch.zeros(nq, nk, dtype=torch.bool, device=q.device)
    allowed[:, :n_local] = True
    if owner:
        qpos = torch.arange(t - nq, t, device=q.device)[:, None]
        allowed[:, n_local:] = torch.arange(t, device=q.device)[None, :] <= qpos
    return dist_decode(q, k, v, group=group, scale=scale, return_lse=True, allowed=allowed)


def _broadcast(x: torch.Tensor, src: int, group) -> torch.Tensor:
    import torch.distributed as dist

    with guard("dist generate", group):
        dist.broadcast(x, src, group=group)
    return x


def sp_generate(model, ids: list[int], mode: str, max_new_tokens: int, *, eos=(), group=None,
                kernel: str = "flash", backend: str = "torch", keep_logits: bool = False) -> dict:
    """Greedy generation with the prompt ``ids`` prefilled sequence parallel over the process group (every rank
    calls it with the same arguments). Returns, the same on every rank: ``tokens``, ``prefill_s`` /
    ``decode_s`` (this rank's), ``local_tokens`` (this rank's share of the prompt), ``cache_bytes`` (this
    rank's cache storage after generating) and ``cache_bytes_per_rank`` (every rank's),
    ``prefill_cache_bytes_per_rank`` (every rank's cache storage after the prefill), ``lengths`` (every
    rank's share), and with ``keep_logits`` the float32 ``logits`` of every generated position."""
    from transformers import DynamicCache

    from ..cache import cache_nbytes

    rank, nproc = world(group)
    check_model(model, mode, nproc)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if any(i in hf._SESSIONS for i in (id(m) for m in model.modules())):
        raise ValueError("--dist: the model is inside longattn.apply(); the sequence-parallel prefill runs dense")
    n = len(ids)
    lengths = local_lengths(n, mode, nproc)
    layout = "zigzag" if mode == "zigzag" else "contiguous"
    ranges = rank_ranges(lengths, layout)
    holder = next(r for r, rr in enumerate(ranges) if any(s <= n - 1 < e for s, e in rr))
    pos = positions(ranges[rank])
    x = torch.tensor(ids, dtype=torch.long)[pos][None]
    st = _State(mode, group, lengths, kernel, backend)
    hf.register_attention(NAME, _attention)
    prev = model.config._attn_implementation
    mods = [id(m) for m in model.modules()]
    model.set_attn_implementation(NAME)
    for i in mods:
        _STATES[i] = st
    kw = hf.cache_kwarg_name(model)
    cache = st.cache = DynamicCache(config=model.config)
    dev = next(model.parameters()).device
    logits_kept = []
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model(input_ids=x.to(dev), position_ids=pos[None].to(dev), use_cache=True, logits_to_keep=1,
                        **{kw: cache})
            last = out.logits[0, -1].float() if rank == holder else torch.empty(out.logits.shape[-1], device=dev)
            last = _broadcast(last.contiguous(), holder, group)
            prefill_s = time.perf_counter() - t0
            own_prefill = cache_nbytes(cache)
            st.decoding = True
            tokens, logits = [], last
            t0 = time.perf_counter()
            for step in range(max_new_tokens):
                if keep_logits:
                    logits_kept.append(logits.cpu())
                tok = _broadcast(logits.argmax().reshape(1), 0, group)
                tokens.append(int(tok))
                if int(tok) in eos or step == max_new_tokens - 1:
                    break
                out = model(input_ids=tok.view(1, 1).to(dev), position_ids=torch.tensor([[n + step]], device=dev),
                            use_cache=True, **{kw: cache})
                logits = out.logits[0, -1].float()
            decode_s = time.perf_counter() - t0
    finally:
        for i in mods:
            _STATES.pop(i, None)
        model.set_attn_implementation(prev)
    own = cache_nbytes(cache)
    per_rank = all_gather_equal(torch.tensor([[own_prefill, own]], dtype=torch.int64), "dist generate", group)
    per_rank = per_rank.view(nproc, 2).tolist()
    res = {"tokens": tokens, "prefill_s": prefill_s, "decode_s": decode_s, "local_tokens": lengths[rank],
           "cache_bytes": own, "cache_bytes_per_rank": [int(b) for _, b in per_rank],
           "prefill_cache_bytes_per_rank": [int(b) for b, _ in per_rank],
           "lengths": lengths, "mode": mode, "nproc": nproc}
    if keep_logits:
        res["logits"] = torch.stack(logits_kept)
    return res
