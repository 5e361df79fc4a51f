"""``longattn finetune``: context extension by LoRA fine-tuning under shifted sparse attention (LongLoRA, SinkLoRA).

LongLoRA (Chen et al., ICLR 2024, https://arxiv.org/abs/2309.12307): fine-tune with LoRA on the attention
projections, the embeddings and the norms trainable too ("LoRA+"), position interpolation of RoPE for the target
length, and **S2-Attn** while training: the tokens are cut into groups of ``group`` tokens and attend causally
within their group; in half of the heads the groups are shifted by half a group, so that information flows between
neighbouring groups. Evaluation uses full attention (the fine-tuned model is an ordinary model).

SinkLoRA (Zhang, 2024, https://arxiv.org/abs/2406.05678), **SF-Attn**: S2-Attn whose shifted groups are
reassembled (no group wraps the end of the sequence around to its start) plus global attention of every query to
the first ``sink`` tokens (the attention sinks).

Departure (both methods): causality is by original positions. LongLoRA's reference code shifts the shifted heads'
tokens with a roll, so its last group holds the sequence's last and first half groups, and a causal mask by rolled
index lets the first tokens see the last ones (future tokens; SinkLoRA's criticism). Here the same groups are used
but a token attends only to earlier positions, so the wrapped group is two causal halves (the last tokens may read
the first half group, which is past) - the reassembly SF-Attn asks for. ``s2attn`` and ``sfattn`` differ by the sinks.

Outputs of a run: ``summary.json`` (settings, time, perplexity by position before and after with full attention,
the LoRA weights' change), ``steps.jsonl`` (loss per step) and ``model/`` (the merged model: ``longattn bench
--model DIR/model`` evaluates it, e.g. passkey by length).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["METHODS", "FinetuneConfig", "shifted_group_attention", "reference_shifted_group_attention",
           "ROPE_SCALINGS", "scale_rope", "perplexity_by_position", "finetune"]

METHODS = ("s2attn", "sfattn")


def _groups(n_pad: int, group: int, shifted: bool) -> torch.Tensor:
    """Group id of every position ``0..n_pad-1`` (``n_pad`` a multiple of ``group``): ``pos // group``, or for the
    shifted heads ``((pos - group // 2) mod n_pad) // group`` (LongLoRA's roll by half a group)."""
    pos = torch.arange(n_pad)
    return (((pos - group // 2) % n_pad) // group) if shifted else pos // group


def shifted_group_attention(q, k, v, group: int, sink: int = 0, scaling: float | None = None) -> torch.Tensor:
    """S2-Attn (``sink=0``) / SF-Attn: ``q [b, hq, n, d]``, ``k, v [b, hk, n, d]`` (GQA: ``hq`` a multiple of
    ``hk``) -> ``[b, hq, n, d]``. The first half of the query heads use groups ``pos // group``, the second half
    groups shifted by ``group // 2``; a query attends to the keys of its group at positions ``<=`` its own, and
    (``sink``) to the first ``sink`` positions outside its group. Cost per query: ``group + sink`` keys."""
    b, hq, n, d = q.shape
    hk = k.shape[1]
    if hq % hk:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hk})")
    if group < 2 or group % 2:
        raise ValueError(f"group must be an even number >= 2, got {group}")
    scaling = d ** -0.5 if scaling is None else scaling
    k, v = k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)
    n_pad = -(-n // group) * group
    pad = n_pad - n  # padded positions come last: no real query sees them (causal by position)
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    out = torch.empty_like(q)
    halves = [(slice(0, hq // 2), False), (slice(hq // 2, hq), True)] if hq > 1 else [(slice(0, 1), False)]
    for heads, shifted in halves:
        s = group // 2 if shifted else 0
        # gather the positions of every group: rolled index r holds position (r + s) mod n_pad
        pos = (torch.arange(n_pad) + s) % n_pad
        ng = n_pad // group
        # [ng, G] positions in each group, ascending: causal by position is then SDPA's lower triangle (the group
        # that wraps around the end, in the shifted heads, is its two halves in position order)
        pos_g = pos.view(ng, group).sort(1).values
        qg, kg, vg = (t[:, heads][:, :, pos_g] for t in (q, k, v))  # [b, h, ng, G, d]
        h = qg.shape[1]
        if sink:
            allowed = pos_g[:, None, :] <= pos_g[:, :, None]  # [ng, G(query), G(key)] causal by position
            sp = torch.arange(min(sink, n))
            in_group = (pos_g[:, :, None] == sp[None, None, :]).any(1)  # [ng, S]: sink already in the group
            sink_ok = (sp[None, None, :] <= pos_g[:, :, None]) & ~in_group[:, None, :]
            kg = torch.cat([k[:, heads][:, :, sp][:, :, None].expand(-1, -1, ng, -1, -1), kg], 3)
            vg = torch.cat([v[:, heads][:, :, sp][:, :, None].expand(-1, -1, ng, -1, -1), vg], 3)
            allowed = torch.cat([sink_ok, allowed], 2)
            y = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=allowed.to(q.device), scale=scaling)
        else:  # every group a causal block: the fused kernel skips the upper triangle (no mask tensor)
            y = F.scaled_dot_product_attention(*(t.reshape(b, h * ng, group, d) for t in (qg, kg, vg)),
                                               is_causal=True, scale=scaling)
        out[:, heads] = torch.zeros_like(out[:, heads]).index_copy_(2, pos_g.reshape(-1).to(q.device),
                                                                    y.reshape(b, h, n_pad, d))
    return out[:, :, :n]


def reference_shifted_group_attention(q, k, v, group: int, sink: int = 0, scaling: float | None = None):
    """The definition loop by loop (float64): query ``i`` of head ``h`` attends to the keys ``j <= i`` with the
    same group id (``_groups``, shifted for the second half of the heads) and, with ``sink``, to ``j < sink``."""
    b, hq, n, d = q.shape
    rep = hq // k.shape[1]
    scaling = d ** -0.5 if scaling is None else scaling
    n_pad = -(-n // group) * group
    out = torch.zeros(b, hq, n, d, dtype=torch.float64)
    for h in range(hq):
        gid = _groups(n_pad, group, shifted=hq > 1 and h >= hq // 2)
        for bi in range(b):
            for i in range(n):
                keys = [j for j in range(i + 1) if gid[j] == gid[i] or j < sink]
                s = torch.stack([q[bi, h, i].double() @ k[bi, h // rep, j].double() * scaling for j in keys])
                p = torch.softmax(s, 0)
                out[bi, h, i] = sum(p[t] * v[bi, h // rep, j].double() for t, j in enumerate(keys))
    return out


# the transformers attention function used while training (an unpadded batch of fixed-length chunks) ---------------
_ACTIVE: dict = {}


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    cfg = _ACTIVE["cfg"]
    for name in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"finetune: {cfg['method']} does not support {name} (a layer of this model has it)")
    y = shifted_group_attention(query, key, value, cfg["group"], cfg["sink"], scaling)
    return y.transpose(1, 2).contiguous(), None


def _register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register("longattn_shifted", _attention)
    AttentionMaskInterface.register("longattn_shifted", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return "longattn_shifted"


ROPE_SCALINGS = ("linear", "yarn")


def scale_rope(model, length: int, kind: str = "linear") -> float:
    """Stretch the model's RoPE to ``length`` tokens when longer than its positions (factor ``length /
    max_position_embeddings``; 1.0 and nothing changed otherwise); the rotary modules are rebuilt from the new
    config. Returns the factor.

    ``linear``: position interpolation (Chen et al., 2023, https://arxiv.org/abs/2306.15595), LongLoRA's choice:
    every frequency divided by the factor. ``yarn``: YaRN (Peng et al., ICLR 2024, https://arxiv.org/abs/2309.00071):
    "NTK-by-parts" - the dimensions that turn many times over the original context keep their frequency, those that
    turn less than once are interpolated, a ramp between - and the attention temperature ``0.1 ln(factor) + 1``;
    transformers' ``yarn`` rope type (its ramp is linear in the dimension index between the paper's alpha=1 and
    beta=32, as in the YaRN reference code). Linear interpolation also halves the high frequencies that tell
    neighbouring tokens apart: on SmolLM2 x2 it loses the passkey's digits at 4K, where YaRN keeps them
    (docs/results/mixers.md)."""
    from .checks import check_choice

    check_choice(kind, "--rope", ROPE_SCALINGS)
    cfg = model.config
    base = int(cfg.max_position_embeddings)
    factor = max(length / base, 1.0)
    if factor == 1.0:
        return 1.0
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    old = params.get("rope_type", "default")
    takes = ("default",) if kind == "yarn" else ("default", "linear")  # YaRN is not stacked on another scaling
    if any(isinstance(x, dict) for x in params.values()) or old not in takes:
        raise ValueError(f"finetune: the model's RoPE ({old if isinstance(old, str) else 'per layer type'}) is not "
                         f"supported by --rope {kind}; it needs one {' or '.join(takes)} RoPE")
    if kind == "linear":
        params["factor"] = factor * float(params.get("factor", 1.0)) if old == "linear" else factor
    else:
        params["factor"] = factor
        params["original_max_position_embeddings"] = base
    params["rope_type"] = kind
    cfg.rope_parameters = params
    cfg.max_position_embeddings = int(math.ceil(base * factor))
    for name, mod in list(model.named_modules()):
        if name.endswith("rotary_emb"):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], type(mod)(config=cfg).to(next(model.parameters()).device))
    return factor


@torch.no_grad()
def perplexity_by_position(model, ids: torch.Tensor, buckets: int = 8) -> list[dict]:
    """Teacher-forced NLL of ``ids [1, n]`` under the model's own (full) attention, averaged per position bucket:
    ``[{"from", "to", "ppl"}]``."""
    from .train import bucket_perplexity

    logits = model(ids).logits[0, :-1].float()
    return bucket_perplexity(F.cross_entropy(logits, ids[0, 1:], reduction="none"), buckets)


@dataclass
class FinetuneConfig:
    method: str = "s2attn"
    model: str = "smollm2-135m"
    length: int = 16384
    lora_r: int = 8
    lora_alpha: int = 16
    group: int | None = None  # None: length // 4 (LongLoRA)
    sink: int = 4  # sfattn only
    steps: int = 20
    lr: float = 2e-4  # LongLoRA's 2e-5 is for 1000 steps on 7B-70B models; a short run of a small one needs more
    seed: int = 0
    eval_buckets: int = 8
    rope: str = "linear"  # linear (LongLoRA's position interpolation) or yarn


def _text_ids(tok, need: int) -> torch.Tensor:
    """Token ids of the stdlib source text (repeated if shorter than ``need``)."""
    from .bench.tasks.niah import stdlib_text

    ids = tok(stdlib_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < need:
        ids = ids.repeat(-(-need // ids.numel()))
    return ids


def finetune(cfg: FinetuneConfig, out: str | Path, progress: bool = True, model=None, tok=None, log=print) -> dict:
    """Fine-tune, evaluate before/after with full attention, save the merged model; returns the summary."""
    from tqdm.auto import tqdm

    from .checks import check_choice, check_int

    check_choice(cfg.method, "--method", METHODS)
    check_choice(cfg.rope, "--rope", ROPE_SCALINGS)
    for name in ("length", "lora_r", "steps", "eval_buckets"):
        check_int(getattr(cfg, name), f"--{name.replace('_', '-')}", 1)
    check_int(cfg.sink, "--sink", 0)
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")
    group = cfg.group if cfg.group is not None else max(2, (cfg.length // 4) // 2 * 2)
    if group < 2 or group % 2 or group > cfg.length:
        raise ValueError(f"--group must be an even number in 2..--length ({cfg.length}), got {group}")
    try:
        import peft
    except ImportError as e:  # pragma: no cover - peft is a dev dependency
        raise ValueError("finetune needs peft (pip install 'longattn[finetune]')") from e
    outdir = Path(out)
    torch.manual_seed(cfg.seed)
    if model is None:
        from .models import load

        model, tok = load(cfg.model)
    factor = scale_rope(model, cfg.length, cfg.rope)
    ids = _text_ids(tok, (cfg.steps + 1) * cfg.length)
    held_out = ids[: cfg.length][None]  # evaluated before and after; training reads the chunks after it
    before = perplexity_by_position(model.eval(), held_out, cfg.eval_buckets)
    lcfg = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    pm = peft.get_peft_model(model, lcfg)
    for name, p in pm.named_parameters():  # LongLoRA+: embeddings and norms trained too
        if "embed_tokens" in name or "norm" in name:
            p.requires_grad_(True)
    lora0 = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}
    trainable = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    impl = model.config._attn_implementation
    _ACTIVE["cfg"] = {"method": cfg.method, "group": group, "sink": cfg.sink if cfg.method == "sfattn" else 0}
    model.set_attn_implementation(_register())
    if hasattr(model, "gradient_checkpointing_enable"):  # LongLoRA trains with it: activations of one layer at a time
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    steps = []
    t0 = time.perf_counter()
    logf = (outdir / "steps.jsonl").open("w")
    try:
        pm.train()
        bar = tqdm(range(cfg.steps), desc=f"finetune {cfg.method} L={cfg.length}", disable=not progress)
        for s in bar:
            a = cfg.length * (s + 1)
            chunk = ids[a : a + cfg.length][None]
            loss = pm(input_ids=chunk, labels=chunk).loss  # the model shifts the labels
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            rec = {"step": s + 1, "loss": loss.item(), "s": time.perf_counter() - t0}
            steps.append(rec)
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
    finally:
        logf.close()
        model.set_attn_implementation(impl)
        if hasattr(model, "gradient_checkpointing_disable"):
            model.gradient_checkpointing_disable()
        _ACTIVE.clear()
    train_s = time.perf_counter() - t0
    change = sum(float((p.detach() - lora0[n]).abs().sum()) for n, p in pm.named_parameters() if n in lora0)
    merged = pm.merge_and_unload().eval()
    after = perplexity_by_position(merged, held_out, cfg.eval_buckets)
    (outdir / "model").mkdir(exist_ok=True)
    merged.save_pretrained(outdir / "model")
    if tok is not None:
        tok.save_pretrained(outdir / "model")
    summary = {**asdict(cfg), "group": group, "rope_factor": factor, "train_s": train_s,
               "s_per_step": train_s / cfg.steps, "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"],
               "lora_abs_change": change, "ppl_before": before, "ppl_after": after,
               "trainable_params": sum(p.numel() for p in trainable),
               "evaluate": f"longattn bench --model {outdir / 'model'} --task passkey --lengths {cfg.length}"}
    (outdir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
