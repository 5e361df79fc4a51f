"""DuoAttention head identification by optimisation: one gate per (layer, kv head), trained by distillation.

Paper: "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads" (Xiao et al.,
ICLR 2025, https://arxiv.org/abs/2410.10819). Each kv head's output becomes ``a * full + (1 - a) * streaming``
(streaming = attention to ``sink`` first tokens + ``recent`` last tokens), with ``a`` in [0, 1]; the model is
frozen and the gates minimise ``||h_mixed - h_full||^2`` on the final hidden states at the answer positions of
synthetic multi-passkey samples, plus ``l1 * mean(a)`` to push heads towards streaming. Heads with high gates
are retrieval heads. Departures: far fewer steps (default 60, on CPU) and shorter samples (1K tokens) than the
paper (2000 steps at up to 32K on GPUs); Adam on the gates with clamping to [0, 1] after each step.
"""

from __future__ import annotations

import random
import sys

import torch
import torch.nn.functional as F

from ..hf import kv_heads

__all__ = ["multi_passkey_sample", "train_gates", "mixed_attention"]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def multi_passkey_sample(tokenizer, length: int, keys: int, seed: int) -> tuple[list[int], list[int]]:
    """``(prompt ids, answer ids)``: ``keys`` pass keys hidden in filler, the question asks for all of them."""
    rng = random.Random(f"duo:{seed}")
    vals = [str(rng.randint(10000, 99999)) for _ in range(keys)]
    per = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
    n = max((length - 60 * keys - 60) // per, keys + 1)
    spots = sorted(rng.sample(range(n), keys))
    parts = []
    for i in range(n):
        parts.append(FILLER)
        if i in spots:
            j = spots.index(i)
            parts.append(f"The pass key number {j + 1} is {vals[j]}. Remember it. ")
    text = "".join(parts) + "\n\nWhat are the pass keys, in order?"
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                               add_generation_prompt=True) + "The pass keys are"
    else:
        prompt = text + "\nThe pass keys are"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ans = tokenizer(" " + ", ".join(vals) + ".", add_special_tokens=False)["input_ids"]
    return ids, ans


def mixed_attention(q, k, v, gate, sink: int, recent: int, scale: float):
    """``gate [kv_heads]`` mixes full causal attention with sink + recent attention, per kv head."""
    b, hq, n, d = q.shape
    hk = k.shape[1]
    g = hq // hk
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=g > 1)
    pos = torch.arange(n, device=q.device)
    causal = pos[None, :] <= pos[:, None]
    stream_mask = causal & ((pos[None, :] < sink) | (pos[:, None] - pos[None, :] < recent))
    stream = F.scaled_dot_product_attention(q, k, v, attn_mask=stream_mask, scale=scale, enable_gqa=g > 1)
    a = gate.repeat_interleave(g).view(1, hq, 1, 1).to(q.dtype)
    return a * full + (1 - a) * stream


def train_gates(model, tokenizer, *, steps: int = 60, length: int = 1024, keys: int = 3, sink: int = 16,
                recent: int = 64, l1: float = 0.05, lr: float = 0.02, seed: int = 0,
                progress: bool = True) -> list[list[float]]:
    """Trained gates ``[layer][kv head]`` in [0, 1] (1 = retrieval head)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    cfg = model.config
    L, H = cfg.num_hidden_layers, kv_heads(cfg)
    gates = torch.nn.Parameter(torch.ones(L, H))
    opt = torch.optim.Adam([gates], lr=lr)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        return _train(model, tokenizer, gates, opt, steps, length, keys, sink, recent, l1, seed, progress)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)


def _train(model, tokenizer, gates, opt, steps, length, keys, sink, recent, l1, seed, progress):
    from tqdm.auto import tqdm

    from .. import api

    base = model.model  # the decoder stack: final hidden states

    def mix(layer_idx, q, k, v, key_valid, scale):
        return mixed_attention(q, k, v, gates[layer_idx], sink, recent, scale)

    bar = tqdm(range(steps), desc="duo gates", disable=not progress, file=sys.stderr)
    data = {}
    for step in bar:
        i = step % max(steps // 4, 1)  # a handful of samples, revisited
        if i not in data:
            ids, ans = multi_passkey_sample(tokenizer, length, keys, seed * 1000 + i)
            x = torch.tensor([ids + ans[:-1]], device=model.device)
            with torch.no_grad():
                target = base(input_ids=x, use_cache=False).last_hidden_state[0, len(ids) - 1 :]
            data[i] = (x, len(ids), target)
        x, n_prompt, target = data[i]
        with api.apply(model, "dense") as session, session.override_attention(mix):
            h = base(input_ids=x, use_cache=False).last_hidden_state[0, n_prompt - 1 :]
        distill = (h - target).pow(2).mean() / target.pow(2).mean()
        loss = distill + l1 * gates.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            gates.clamp_(0.0, 1.0)
        bar.set_postfix(distill=f"{distill.item():.4f}", mean_gate=f"{gates.mean().item():.3f}")
    return gates.detach().tolist()
