"""Head scores (AttentionInfluence, CAM, AMP) on a tiny model with planted structure: a head whose output
projection is zero changes nothing (influence 0, AMP 0), one with a large projection leads AMP; Spearman by hand;
the profile JSON the head-budget methods read, written from the command line."""

import json

import pytest
import torch

from longattn import cli
from longattn.models import tiny_model, tiny_tokenizer
from longattn.profile.head_scores import amp_scores, attention_influence, cam_scores, spearman


def _planted():
    m = tiny_model("llama", num_hidden_layers=2)
    d = m.config.head_dim
    with torch.no_grad():
        w = m.model.layers[1].self_attn.o_proj.weight  # [hidden, heads * d]
        w[:, 2 * d : 3 * d] = 0.0  # layer 1, query head 2 writes nothing
        w[:, 0:d] *= 25.0  # layer 1, query head 0 writes a lot
    return m


def test_a_silent_head_has_no_influence_and_no_amp_and_a_loud_one_leads_amp():
    m, tok = _planted(), tiny_tokenizer()
    kv, per_q = attention_influence(m, tok, samples=1, length=160, progress=False)
    assert per_q[1][2] == pytest.approx(0.0, abs=1e-6) and len(kv) == 2 and len(kv[0]) == 2
    assert any(abs(x) > 1e-4 for row in per_q for x in row)
    _, amp = amp_scores(m, tok, samples=1, length=160, progress=False)
    assert amp[1][2] == pytest.approx(0.0, abs=1e-6)
    assert max(range(4), key=lambda h: amp[1][h]) == 0


def test_cam_is_a_rank_correlation():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486832980505138)
    m, tok = tiny_model("llama", num_hidden_layers=2), tiny_tokenizer()
    kv, per_q = cam_scores(m, tok, samples=1, length=160, segments=4, progress=False)
    assert all(-1.0 <= x <= 1.0 for row in per_q for x in row) and len(kv[0]) == 2


@pytest.mark.model
def test_profile_heads_amp_from_the_command_line(smollm2, tmp_path):
    out = tmp_path / "amp.json"
    assert cli.main(["profile", "heads", "--method", "amp", "--out", str(out), "--samples", "1",
                     "--length", "256"]) == 0
    d = json.loads(out.read_text())
    assert d["method"] == "amp" and d["num_layers"] == 30 and d["num_kv_heads"] == 3
    assert len(d["query_head_scores"][0]) == 9


def test_act_head_filtering_gain_is_the_loss_drop_of_one_calibrated_head():
    """A silent head (zero o_proj) gains nothing from calibration; the gain of head (1, 1) equals the answer's
    loss with dense minus the loss with ACT on that head alone, recomputed here by hand."""
    from longattn import api
    from longattn.calibrate.act import ACT
    from longattn.profile.head_scores import _answer_loss, _samples, act_gains

    m, tok = _planted(), tiny_tokenizer()
    kv, per_q = act_gains(m, tok, samples=1, length=160, task="passkey", alpha=1.5, beta=0.2, progress=False)
    assert per_q[1][2] == pytest.approx(0.0, abs=1e-6) and len(kv) == 2 and len(per_q[0]) == 4
    ctx, rest, ans = next(_samples(tok, 1, 160, 1234, "passkey"))
    with torch.no_grad():
        base = _answer_loss(m, ctx, rest, ans)
        act = ACT(alpha=1.5, beta=0.2)
        with api.apply(m, act):
            object.__setattr__(act, "_mask", [[False] * 4, [False, True, False, False]])  # head (1, 1) alone
            one = _answer_loss(m, ctx, rest, ans)
    assert per_q[1][1] == pytest.approx(base - one, abs=1e-6)
    assert any(abs(x) > 1e-5 for row in per_q for x in row)


def test_profile_heads_act_names_bad_task_and_beta_before_loading(tmp_path, capsys):
    out = str(tmp_path / "a.json")
    assert cli.main(["profile", "heads", "--method", "act", "--task", "perplexity", "--out", out]) == 2
    assert "--task must be one of" in capsys.readouterr().err
    assert cli.main(["profile", "heads", "--method", "act", "--beta", "2", "--out", out]) == 2
    assert "--beta" in capsys.readouterr().err
