"""The attention map of one head, and what a prefill pattern keeps of it.

``attention_map`` computes the causal softmax of one query head of one layer on a calibration prompt (the
layer's own scale), pooled to at most ``size`` x ``size`` cells (the mean probability of each cell) and shown on
a log scale; with a recipe whose prefill slot is a pattern, the pattern's kept blocks for that layer and head are
outlined over it, and the attention mass they hold (the pattern's recall on this head) is reported.
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention_map", "heatmap_png"]


def _pool(x: torch.Tensor, size: int) -> torch.Tensor:
    n = x.shape[-1]
    cell = max(1, math.ceil(n / size))
    m = math.ceil(n / cell)
    pad = m * cell - n
    xp = torch.nn.functional.pad(x, (0, pad, 0, pad))
    return xp.view(m, cell, m, cell).mean((1, 3))


def attention_map(model, tokenizer, layer: int, head: int, length: int = 1024, recipe=None,
                  size: int = 256) -> dict:
    """``{"probs": pooled [m, m], "kept": pooled kept fraction or None, "recall": float or None, ...}``."""
    from .. import api
    from ..hf import module_logits
    from .capture import calibration_ids, capture_qkv

    n_layers, hq = model.config.num_hidden_layers, model.config.num_attention_heads
    if not 0 <= layer < n_layers:
        raise ValueError(f"--layer must be in [0, {n_layers}), got {layer}")
    if not 0 <= head < hq:
        raise ValueError(f"--head must be in [0, {hq}), got {head}")
    ids = calibration_ids(tokenizer, length)
    q, k, _ = capture_qkv(model, ids, [layer])[layer]
    mod = next((m for m in model.modules() if getattr(m, "layer_idx", None) == layer and hasattr(m, "scaling")), None)
    scale, softcap, _ = module_logits(mod, q.shape[-1])
    g = q.shape[1] // k.shape[1]
    s = (q[0, head].float() @ k[0, head // g].float().T) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    n = s.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    p = s.masked_fill(~causal, float("-inf")).softmax(-1)
    out = {"layer": layer, "head": head, "length": n, "probs": _pool(p, size), "kept": None, "recall": None,
           "pattern": None}
    pattern = api.parse(recipe).prefill if recipe is not None else None
    if pattern is not None:
        lay = pattern.for_layer(layer).layout(q, k)
        mask = lay.to_dense_mask(causal=True, heads=q.shape[1])[0, head] & causal
        out.update(kept=_pool(mask.float(), size), recall=float((p * mask).sum() / n),
                   density=float(mask.sum() / causal.sum()), pattern=str(api.parse(recipe)))
    return out


def heatmap_png(m: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    data = torch.log10(m["probs"].clamp_min(1e-8)).numpy()
    n = m["length"]
    im = ax.imshow(data, cmap="viridis", origin="upper", extent=(0, n, n, 0), vmin=-8, vmax=0)
    fig.colorbar(im, ax=ax, label="log10 attention (cell mean)")
    title = f"layer {m['layer']} head {m['head']}, {n} tokens"
    if m["kept"] is not None:
        kept = m["kept"].numpy()
        cells = kept.shape[0]
        ax.contour((torch.arange(cells) + 0.5).numpy() * n / cells, (torch.arange(cells) + 0.5).numpy() * n / cells,
                   kept, levels=[0.5], colors="red", linewidths=0.8)
        title += f"\n{m['pattern']}: recall {m['recall']:.3f} at density {m['density']:.3f} (red: kept)"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
