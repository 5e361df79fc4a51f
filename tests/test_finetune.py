"""`longattn finetune`: S2-Attn / SF-Attn against the loop-by-loop definition (groups, shifted half of the heads,
causal by position, sinks), no look-ahead, and an end-to-end LoRA fine-tune of a tiny random model (loss falls,
LoRA weights change, RoPE interpolated past the trained positions, full-attention evaluation, a loadable merged
model); bad arguments exit 2 and an existing run is not replaced."""

import json

import pytest
import torch

from longattn import cli
from longattn.finetune import (
    FinetuneConfig,
    finetune,
    reference_shifted_group_attention,
    scale_rope,
    shifted_group_attention,
)


@pytest.mark.parametrize("n,group,sink,hq,hk", [(32, 8, 0, 4, 2), (30, 8, 0, 4, 4), (29, 6, 3, 4, 2), (16, 16, 2, 2, 1),
                                                (21, 4, 0, 1, 1)],
                         ids=["s2-gqa", "s2-odd", "sf-odd-gqa", "sf-one-group", "s2-one-head"])
def test_shifted_group_attention_equals_its_definition(n, group, sink, hq, hk):
    g = torch.Generator().manual_seed(n)
    q = torch.randn(2, hq, n, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, hk, n, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, hk, n, 8, generator=g, dtype=torch.float64)
    got = shifted_group_attention(q, k, v, group, sink)
    torch.testing.assert_close(got, reference_shifted_group_attention(q, k, v, group, sink), rtol=1e-10, atol=1e-10)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 20:] += 3.0
    v2[:, :, 20:] -= 2.0
    later = shifted_group_attention(q, k2, v2, group, sink)
    torch.testing.assert_close(later[:, :, :20], got[:, :, :20], rtol=0, atol=1e-12)  # no future leaks


@pytest.mark.parametrize("sink", [0, 2], ids=["s2attn", "sfattn"])
def test_shifted_group_attention_gradients_equal_the_definitions(sink):
    """Training goes through the fused causal blocks (S2) or the masked blocks (SF): their gradients w.r.t. q, k, v
    are the loop reference's (the wrapped group of the shifted heads included: 14 tokens, groups of 4)."""
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, h, 14, 4, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    w = torch.randn(1, 4, 14, 4, generator=g, dtype=torch.float64)
    grads = []
    for fn in (shifted_group_attention, reference_shifted_group_attention):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        (fn(*leaves, 4, sink) * w).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_the_shifted_heads_connect_neighbouring_groups_and_sinks_reach_everyone():
    n, G = 32, 8
    q = torch.zeros(1, 2, n, n, dtype=torch.float64)  # uniform scores ...
    k = torch.zeros(1, 1, n, n, dtype=torch.float64)
    v = torch.eye(n, dtype=torch.float64)[None, None]  # ... and one-hot values: an output row says which keys it read
    s2 = shifted_group_attention(q, k, v, G)
    read = s2[0, :, 13] > 0  # query 13: head 0 reads its group 8..13, head 1 (shifted by 4) reads 12..13
    assert read[0].nonzero().flatten().tolist() == list(range(8, 14))
    assert read[1].nonzero().flatten().tolist() == [12, 13]
    assert (s2[0, 1, 10] > 0).nonzero().flatten().tolist() == list(range(4, 11))  # 4..11 is a shifted group
    sf = shifted_group_attention(q, k, v, G, sink=2)
    assert (sf[0, 1, 13] > 0).nonzero().flatten().tolist() == [0, 1, 12, 13]


def test_a_tiny_model_is_fine_tuned_past_its_positions_and_evaluated_with_full_attention(tmp_path):
    from transformers import AutoModelForCausalLM

    from longattn.models import tiny_model, tiny_tokenizer

    model, tok = tiny_model("llama", max_position_embeddings=32), tiny_tokenizer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    s = finetune(FinetuneConfig(method="sfattn", length=64, group=16, sink=2, steps=12, lr=1e-2, lora_r=4,
                                eval_buckets=4), tmp_path, progress=False, model=model, tok=tok)
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 12 and sum(r["loss"] for r in steps[-3:]) < sum(r["loss"] for r in steps[:3])
    assert s["lora_abs_change"] > 0 and s["rope_factor"] == 2.0
    assert len(s["ppl_before"]) == len(s["ppl_after"]) == 4 and all(b["ppl"] > 0 for b in s["ppl_after"])
    assert s["ppl_after"][-1]["ppl"] < s["ppl_before"][-1]["ppl"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert loaded.config.max_position_embeddings == 64 and loaded.config.rope_parameters["rope_type"] == "linear"
    assert model.config._attn_implementation == "sdpa"  # restored after training
    changed = [n for n, p in loaded.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any("q_proj" in n for n in changed) and any("embed_tokens" in n for n in changed)


def test_yarn_keeps_the_fast_dimensions_and_interpolates_the_slow_ones():
    """YaRN's definition (NTK-by-parts, arXiv 2309.00071 sec. 3.2): with r = L / wavelength over the original
    context L, dimensions with r > beta = 32 keep their frequency, r < alpha = 1 are divided by the factor s, the
    rest lie between; softmax temperature sqrt(1/t) = 0.1 ln s + 1. Position interpolation divides them all."""
    import math

    from longattn.models import tiny_model

    L, s_ = 1024, 4.0
    theta = {}
    for kind in ("yarn", "linear"):
        model = tiny_model("llama", max_position_embeddings=L)
        dim = model.config.head_dim
        base = model.config.rope_parameters["rope_theta"]
        orig = [base ** (-2 * d / dim) for d in range(dim // 2)]
        assert scale_rope(model, int(L * s_), kind) == s_
        rot = model.model.rotary_emb
        theta[kind] = rot.inv_freq.double().tolist()
        assert model.config.max_position_embeddings == L * s_ and model.config.rope_parameters["rope_type"] == kind
        scale = getattr(rot, "attention_scaling", 1.0)
        assert scale == pytest.approx(0.1 * math.log(s_) + 1 if kind == "yarn" else 1.0)
    r = [L * t / (2 * math.pi) for t in orig]
    assert any(x > 32 for x in r) and any(x < 1 for x in r) and any(1 < x < 32 for x in r)  # all three regimes
    for t, t_yarn, t_lin, x in zip(orig, theta["yarn"], theta["linear"], r):
        assert t_lin == pytest.approx(t / s_, rel=1e-6)
        if x > 32:
            assert t_yarn == pytest.approx(t, rel=1e-6)
        elif x < 1:
            assert t_yarn == pytest.approx(t / s_, rel=1e-6)
        else:
            assert t / s_ * (1 - 1e-6) <= t_yarn <= t * (1 + 1e-6)


def test_a_yarn_fine_tune_saves_a_yarn_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from longattn.models import tiny_model, tiny_tokenizer

    model, tok = tiny_model("llama", max_position_embeddings=32), tiny_tokenizer()
    s = finetune(FinetuneConfig(method="s2attn", length=64, group=16, steps=2, lr=1e-2, lora_r=4, eval_buckets=2,
                                rope="yarn"), tmp_path, progress=False, model=model, tok=tok)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    rope = loaded.config.rope_parameters
    assert s["rope"] == "yarn" and s["rope_factor"] == 2.0 and loaded.config.max_position_embeddings == 64
    assert rope["rope_type"] == "yarn" and rope["factor"] == 2.0 and rope["original_max_position_embeddings"] == 32


def test_yarn_is_refused_on_an_already_scaled_rope():
    from longattn.models import tiny_model

    model = tiny_model("llama", max_position_embeddings=32)
    scale_rope(model, 64, "linear")
    with pytest.raises(ValueError, match="--rope yarn"):
        scale_rope(model, 256, "yarn")


@pytest.mark.parametrize("argv,match", [
    (["finetune", "--method", "nope", "--length", "64", "--out", "o"], "--method must be one of"),
    (["finetune", "--method", "s2attn", "--length", "64", "--group", "7", "--out", "o"], "--group"),
    (["finetune", "--method", "s2attn", "--length", "0", "--out", "o"], "--length"),
    (["finetune", "--method", "s2attn", "--length", "64", "--rope", "ntk", "--out", "o"], "--rope must be one of linear, yarn"),
])
def test_bad_finetune_arguments_exit_2(argv, match, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    assert match in capsys.readouterr().err


def test_an_existing_finetune_run_is_not_replaced(tmp_path, capsys):
    (tmp_path / "summary.json").write_text("{}")
    assert cli.main(["finetune", "--method", "s2attn", "--length", "64", "--out", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err
