"""Attention sinks, visible and hidden: where each head puts attention that no content asks for.

Papers: "When Attention Sink Emerges in Language Models: An Empirical View" (Gu et al., ICLR 2025,
https://arxiv.org/abs/2410.10781) measures the sink on the first token as the share of attention it receives;
"Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large Language Models without Training through
Attention Calibration" (Yu et al., ICML 2024, https://arxiv.org/abs/2406.15765) finds *hidden* sinks later in the
sequence: tokens that receive far more than their share of attention from most queries.

Per layer and query head, over the real queries: ``first_mass`` is the mean attention on the first real token;
a later token ``j`` is a hidden sink when its attention exceeds ``alpha`` times the uniform share (``1 / keys the
query sees``) for at least ``frequency`` of the queries after it, and its ``mass`` (mean attention over those
queries) is reported with its key and value norms. ``alpha = 5`` and ``frequency = 0.5`` by default (Yu et al.
use a relative threshold on the attention received; departures: the uniform share as the reference, and the
frequency condition standing for "most queries").
"""

from __future__ import annotations

import torch

__all__ = ["sink_stats", "sink_profile", "sink_png"]


def sink_stats(q, k, v, alpha: float = 5.0, frequency: float = 0.5, scale: float | None = None,
               chunk: int = 256, max_sinks: int = 8) -> list[dict]:
    """Per query head of ``q [1, hq, n, d]`` over ``k, v [1, hk, n, d]`` (causal, one unpadded row):
    ``{"first_mass", "hidden": [{"pos", "mass", "share", "key_norm", "value_norm"}...]}``, the hidden sinks
    best first (at most ``max_sinks``)."""
    import math

    _, hq, n, d = q.shape
    hk = k.shape[1]
    g = hq // hk
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = []
    pos = torch.arange(n)
    for h in range(hq):
        kh, vh = k[0, h // g].float(), v[0, h // g].float()
        mass = torch.zeros(n)
        over = torch.zeros(n)
        for lo in range(0, n, chunk):
            qi = q[0, h, lo : lo + chunk].float()
            s = (qi @ kh.T) * scale
            rows = pos[lo : lo + chunk]
            s = s.masked_fill(pos[None, :] > rows[:, None], float("-inf"))
            p = s.softmax(-1)
            mass += p.sum(0)
            over += (p * (rows[:, None] + 1).float() >= alpha).float().sum(0)
        seen = (n - pos).float()  # queries that see each key
        mean = mass / seen
        freq = over / seen
        cand = [(float(mean[j]), j) for j in range(1, n) if float(freq[j]) >= frequency and n - j >= 2]
        cand.sort(reverse=True)
        out.append({"first_mass": float(mean[0]),
                    "hidden": [{"pos": j, "mass": m, "share": float(freq[j]), "key_norm": float(kh[j].norm()),
                                "value_norm": float(vh[j].norm())} for m, j in cand[:max_sinks]]})
    return out


def sink_profile(model, tokenizer, length: int = 1024, samples: int = 1, alpha: float = 5.0,
                 frequency: float = 0.5, progress: bool = True) -> dict:
    """Sink statistics of every layer and query head on ``samples`` calibration prompts of ``length`` tokens
    (stdlib-haystack NIAH, as ``profile heads``): per layer and head the mean first-token mass over the samples and
    the hidden sinks of each sample with the token text. Scales and softcaps are the layers' own (their
    ``scaling``); the sinks' positions are in the prompt."""
    from tqdm.auto import tqdm

    from .. import api
    from ..hf import module_logits
    from .capture import calibration_ids

    mods = {m.layer_idx: m for m in model.modules() if getattr(m, "layer_idx", None) is not None
            and hasattr(m, "scaling")}
    n_layers = model.config.num_hidden_layers
    first = None
    hidden: list = []
    for si in tqdm(range(samples), desc="profile sinks", disable=not progress):
        ids = calibration_ids(tokenizer, length, seed=0, index=si)
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is not None and ids[0] != bos:  # the prompt starts where a document starts (Gemma sinks on <bos>)
            ids = [bos] + ids[1 - length:]
        per_layer: dict[int, list] = {}

        def observe(layer_idx, q, k, v, key_valid, per_layer=per_layer):
            scale, _, _ = module_logits(mods.get(layer_idx), q.shape[-1])
            per_layer[layer_idx] = sink_stats(q, k, v, alpha, frequency, scale)

        with torch.no_grad(), api.apply(model, "dense") as s, s.observe(observe):
            model(input_ids=torch.tensor([ids]), use_cache=False)
        rows = [per_layer[i] for i in range(n_layers) if i in per_layer]
        fm = [[hd["first_mass"] for hd in layer] for layer in rows]
        first = fm if first is None else [[a + b for a, b in zip(x, y)] for x, y in zip(first, fm)]
        for li, layer in enumerate(rows):
            for h, hd in enumerate(layer):
                for sk in hd["hidden"]:
                    hidden.append({"sample": si, "layer": li, "head": h, **sk,
                                   "token": tokenizer.decode([ids[sk["pos"]]])})
    first = [[x / samples for x in layer] for layer in first]
    return {"length": length, "samples": samples, "alpha": alpha, "frequency": frequency,
            "first_mass": first, "hidden": hidden,
            "summary": {"heads": sum(len(x) for x in first),
                        "first_token_sink_heads": sum(1 for layer in first for x in layer if x >= 0.5),
                        "hidden_sinks": len(hidden),
                        "top_hidden_tokens": _top_tokens(hidden)}}


def _top_tokens(hidden: list[dict], k: int = 10) -> list[tuple[str, int]]:
    from collections import Counter

    return Counter(h["token"] for h in hidden).most_common(k)


def sink_png(profile: dict, path) -> None:
    """Sink mass by layer x head: the first token's mass, and each head's largest hidden sink mass beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = torch.tensor(profile["first_mass"])
    hid = torch.zeros_like(first)
    for h in profile["hidden"]:
        hid[h["layer"], h["head"]] = max(float(hid[h["layer"], h["head"]]), h["mass"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    for ax, data, title in zip(axes, (first, hid), ("first-token mass", "largest hidden sink mass")):
        im = ax.imshow(data.numpy(), aspect="auto", cmap="magma", vmin=0, vmax=1, origin="lower")
        ax.set_title(title)
        ax.set_xlabel("query head")
        fig.colorbar(im, ax=ax)
    axes[0].set_ylabel("layer")
    fig.suptitle(f"attention sinks, {profile['length']} tokens, {profile['samples']} sample(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
