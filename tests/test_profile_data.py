"""profile data: samples ranked by AttentionInfluence (answer-loss rise with the top heads masked, checked against
zeroing those heads' o_proj columns by hand) and by GATEAU's CAM; errors named; on SmolLM2, samples whose answer
sits far back rank above those whose answer is next to the question."""

import copy
import json
import random

import pytest
import torch

from longattn import cli
from longattn.bench.prompts import encode
from longattn.bench.tasks.base import Sample
from longattn.models import tiny_model, tiny_tokenizer
from longattn.profile.data import masked_heads, rank_data
from longattn.profile.head_scores import _answer_loss


def _samples(n=4, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        key = str(rng.randint(100, 999))
        out.append(Sample(id=f"s{i}", context=f"code {key}. " + "grass is green. " * (3 + i), question="code?",
                          answer_prefix="", answers=[key]))
    return out


def _profile(tmp_path, L, hk, hq, top_head):
    scores = [[0.0] * hk for _ in range(L)]
    per_q = [[0.0] * hq for _ in range(L)]
    per_q[top_head[0]][top_head[1]] = 1.0
    p = tmp_path / "heads.json"
    p.write_text(json.dumps({"num_layers": L, "num_kv_heads": hk, "scores": scores, "query_head_scores": per_q}))
    return str(p)


def test_attention_influence_score_is_the_relative_loss_rise_with_the_heads_zeroed(tmp_path):
    m, tok = tiny_model("llama", num_hidden_layers=2), tiny_tokenizer()
    cfg = m.config
    prof = _profile(tmp_path, 2, cfg.num_key_value_heads, cfg.num_attention_heads, (1, 3))
    assert masked_heads(prof, 2, cfg.num_attention_heads, cfg.num_key_value_heads, 0.01) == [(1, 3)]
    samples = _samples()
    out = rank_data(m, tok, samples, "attention_influence", profile=prof, top=0.01, progress=False)
    assert out["heads"] == [[1, 3]] and [r["rank"] for r in out["ranking"]] == [1, 2, 3, 4]
    assert [r["score"] for r in out["ranking"]] == sorted((r["score"] for r in out["ranking"]), reverse=True)
    # by hand: head 3 of layer 1 silenced through its o_proj columns
    ref = copy.deepcopy(m)
    d = cfg.head_dim
    with torch.no_grad():
        ref.model.layers[1].self_attn.o_proj.weight[:, 3 * d : 4 * d] = 0
    for r in out["ranking"]:
        s = samples[r["index"]]
        ctx, rest = encode(tok, s)
        ans = tok(" " + s.answers[0], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            base, masked = _answer_loss(m, ctx, rest, ans), _answer_loss(ref, ctx, rest, ans)
        assert r["base_loss"] == pytest.approx(base, rel=1e-5)
        assert r["score"] == pytest.approx((masked - base) / base, rel=1e-4, abs=1e-6)


def test_cam_ranks_by_difficulty_and_errors_are_named(tmp_path, capsys):
    m, tok = tiny_model("llama", num_hidden_layers=2), tiny_tokenizer()
    out = rank_data(m, tok, _samples(3), "cam", segments=3, progress=False)
    for r in out["ranking"]:
        assert -1 <= r["cam"] <= 1 and r["score"] == pytest.approx((1 - r["cam"]) / 2)
    with pytest.raises(ValueError, match="--profile"):
        rank_data(m, tok, _samples(1), "attention_influence", progress=False)
    with pytest.raises(ValueError, match="--method must be one of attention_influence, cam"):
        rank_data(m, tok, _samples(1), "amp", progress=False)
    data = tmp_path / "d.jsonl"
    data.write_text('{"context": "a", "question": "b", "answers": ["c"]}\nnot json\n')
    for argv, msg in [(["profile", "data", "--out", str(tmp_path / "r.json")], "--data"),
                      (["profile", "data", "--data", str(data), "--out", str(tmp_path / "r.json")], ":2"),
                      (["profile", "data", "--method", "amp", "--data", str(data), "--out", str(tmp_path / "r.json")],
                       "--method"),
                      ]:
        assert cli.main(argv) == 2
        assert msg in capsys.readouterr().err
    data.write_text('{"context": "a", "question": "b", "answers": ["c"]}\n')
    assert cli.main(["profile", "data", "--method", "attention_influence", "--data", str(data),
                     "--out", str(tmp_path / "r.json")]) == 2
    assert "--profile" in capsys.readouterr().err


def _far_near(tok, n=8, filler=60, seed=3):
    rng = random.Random(seed)
    sentences = ["The grass is green.", "The sky is blue.", "The sun is warm.", "Here we go again."]
    out = []
    for i in range(n):
        key = str(rng.randint(10000, 99999))
        hay = " ".join(rng.choice(sentences) for _ in range(filler))
        fact = f"The pass key is {key}. Remember it."
        ctx = f"{fact} {hay}" if i % 2 == 0 else f"{hay} {fact}"
        out.append(Sample(id="far" if i % 2 == 0 else "near", context=ctx, question="What is the pass key?",
                          answer_prefix="The pass key is", answers=[key]))
    return out


@pytest.mark.model
def test_on_smollm2_far_answers_rank_above_near_ones(smollm2, tmp_path):
    model, tok = smollm2
    samples = _far_near(tok)
    out = rank_data(model, tok, samples, "attention_influence", profile="smollm2-135m", top=0.05, progress=False)
    top_half = [r["id"] for r in out["ranking"][:4]]
    assert top_half.count("far") >= 3, out["ranking"]
