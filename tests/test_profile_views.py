"""`longattn profile sinks` and `profile heatmap`: planted sinks are found, a head's map and a pattern's recall on it,
the command line (JSON + PNG, bad arguments named)."""

import json

import pytest
import torch

from longattn import cli
from longattn.models import tiny_model, tiny_tokenizer
from longattn.profile.heatmap import attention_map, heatmap_png
from longattn.profile.sinks import sink_png, sink_profile, sink_stats


def _planted(n=96, d=16):
    """Head 0 puts its attention on token 0 (a first-token sink), head 1 on token 30 (a hidden sink) as well as on
    token 0 less strongly; head 2 attends by content (random)."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(d, generator=g)
    u = u / u.norm()
    q = torch.randn(1, 3, n, d, generator=g) * 0.3
    k = torch.randn(1, 3, n, d, generator=g) * 0.3
    v = torch.randn(1, 3, n, d, generator=g)
    q[0, :2] += 4 * u
    k[0, 0, 0] = 6 * u
    k[0, 1, 30] = 6 * u
    k[0, 1, 0] = 2 * u
    return q, k, v


def test_planted_first_token_and_hidden_sinks_are_found():
    q, k, v = _planted()
    st = sink_stats(q, k, v, alpha=5.0, frequency=0.5)
    assert st[0]["first_mass"] > 0.5 and not st[0]["hidden"]
    assert [s["pos"] for s in st[1]["hidden"]][:1] == [30]
    assert st[1]["hidden"][0]["key_norm"] == pytest.approx(6.0, rel=1e-4) and st[1]["hidden"][0]["share"] >= 0.5
    assert st[2]["first_mass"] < 0.5 and all(s["pos"] != 30 for s in st[2]["hidden"])


def test_sink_profile_and_heatmap_on_a_tiny_model(tmp_path):
    m, tok = tiny_model("llama", num_hidden_layers=2), tiny_tokenizer(chat_template=True)
    prof = sink_profile(m, tok, length=128, samples=2, progress=False)
    assert len(prof["first_mass"]) == 2 and len(prof["first_mass"][0]) == m.config.num_attention_heads
    assert all(0.0 <= x <= 1.0 for layer in prof["first_mass"] for x in layer)
    assert all(set(h) >= {"sample", "layer", "head", "pos", "mass", "token"} for h in prof["hidden"])
    sink_png(prof, tmp_path / "s.png")
    mp = attention_map(m, tok, 1, 2, length=128, recipe="sink_window:sink=4:window=32:block_size=16", size=64)
    assert mp["probs"].shape == (64, 64) and 0.0 < mp["recall"] <= 1.0 + 1e-6 and 0.0 < mp["density"] < 1.0
    full = attention_map(m, tok, 1, 2, length=128, recipe="sink_window:sink=4:window=4096:block_size=16", size=64)
    assert full["recall"] == pytest.approx(1.0, abs=1e-5) and full["density"] == pytest.approx(1.0)
    heatmap_png(mp, tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000 and (tmp_path / "s.png").stat().st_size > 1000


@pytest.mark.parametrize("argv,match", [
    (["profile", "heatmap", "--out", "x.png", "--head", "0"], "--layer"),
    (["profile", "heatmap", "--out", "x.json", "--layer", "0", "--head", "0"], ".png"),
    (["profile", "heatmap", "--out", "x.png", "--layer", "0", "--head", "0", "--recipe", "snapkv:ratio=0.5"],
     "no prefill pattern"),
    (["profile", "sinks", "--out", "s.json", "--alpha", "0.5"], "--alpha"),
])
def test_bad_profile_arguments_exit_2(argv, match, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    assert match in capsys.readouterr().err


@pytest.mark.model
def test_profile_sinks_and_heatmap_from_the_command_line(smollm2, tmp_path, capsys):
    out = tmp_path / "sinks.json"
    assert cli.main(["profile", "sinks", "--out", str(out), "--length", "256"]) == 0
    prof = json.loads(out.read_text())
    assert prof["summary"]["heads"] == 30 * 9 and (tmp_path / "sinks.png").exists()
    # many of SmolLM2's heads put most of their attention on the first token (the visible sink)
    assert prof["summary"]["first_token_sink_heads"] > 50  # measured: 88 of 270 at 256 tokens
    png = tmp_path / "h.png"
    assert cli.main(["profile", "heatmap", "--out", str(png), "--layer", "14", "--head", "0", "--length", "256",
                     "--recipe", "vertical_slash:vertical=64:slash=64:sink=16:window=16:block_size=32"]) == 0
    assert "recall" in capsys.readouterr().out and png.exists()
