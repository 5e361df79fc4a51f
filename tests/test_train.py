"""`longattn train`: the task generators ask what they claim, a mixer learns (loss falls) on a tiny budget, the run
directory holds steps.jsonl / summary.json / curves.png, and bad arguments are refused by name."""

import json

import pytest
import torch

from longattn import cli
from longattn.train import TrainConfig, make_batch, train


def test_mqar_asks_the_values_of_the_keys_seen_before():
    x, y = make_batch("mqar", 4, 30, 64, torch.Generator().manual_seed(0))
    for b in range(4):
        pairs = dict(zip(x[b, 0:20:2].tolist(), x[b, 1:20:2].tolist()))
        asked = [(int(x[b, i]), int(y[b, i])) for i in range(20, 30)]
        assert all(pairs[k] == v for k, v in asked) and sorted(k for k, _ in asked) == sorted(pairs)
        assert (y[b, :20] == -100).all() and all(v >= 32 for _, v in asked) and all(k < 32 for k, _ in asked)


def test_selective_copy_asks_the_data_tokens_in_order():
    x, y = make_batch("selective_copy", 3, 40, 64, torch.Generator().manual_seed(1))
    for b in range(3):
        data = [t for t in x[b, :35].tolist() if t > 2]
        assert y[b, 35:].tolist() == data and (x[b, 35:] == 2).all()


def test_a_mixer_learns_and_the_run_is_written(tmp_path):
    s = train(TrainConfig(task="mqar", mixer="softmax", seq=24, steps=120, dim=32, layers=2, vocab=32, batch=16,
                          lr=3e-3, eval_every=60), tmp_path, progress=False)
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 120 and "acc" in steps[59] and "acc" in steps[-1]
    first = sum(r["loss"] for r in steps[:10]) / 10
    last = sum(r["loss"] for r in steps[-10:]) / 10
    assert last < 0.8 * first
    assert json.loads((tmp_path / "summary.json").read_text())["final_acc"] == s["final_acc"]
    assert (tmp_path / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize("argv,match", [
    (["train", "--mixer", "nope", "--out", "o"], "--mixer must be one of"),
    (["train", "--mixer", "titans:depth=3", "--out", "o"], "unknown argument"),
    (["train", "--mixer", "softmax", "--task", "sorting", "--out", "o"], "--task"),
    (["train", "--mixer", "titans", "--bidirectional", "--out", "o"], "bidirectional is not a form"),
    (["train", "--mixer", "softmax", "--steps", "0", "--out", "o"], "--steps"),
])
def test_bad_train_arguments_exit_2(argv, match, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    assert match in capsys.readouterr().err


def test_an_existing_run_is_not_overwritten_unless_asked(tmp_path, capsys):
    argv = ["train", "--mixer", "lightning", "--seq", "12", "--steps", "2", "--dim", "16", "--vocab", "32",
            "--batch", "4", "--eval-every", "1", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    assert cli.main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert cli.main(argv + ["--overwrite"]) == 0


def _eval_listops(tokens):
    """An independent evaluator of a ListOps token string (recursive descent, statistics.median)."""
    import statistics

    names = {13: "MAX", 14: "MIN", 15: "MED", 16: "SM"}

    def expr(i):
        t = tokens[i]
        if 3 <= t <= 12:
            return t - 3, i + 1
        assert t in names, t
        args, i = [], i + 1
        while tokens[i] != 17:
            v, i = expr(i)
            args.append(v)
        op = names[t]
        val = {"MAX": max, "MIN": min, "SM": lambda a: sum(a) % 10,
               "MED": lambda a: int(statistics.median(a))}[op](args)
        return val, i + 1

    val, end = expr(0)
    assert end == len(tokens)
    return val


def test_listops_asks_the_value_of_a_nested_expression_at_the_last_position():
    x, y = make_batch("listops", 8, 200, 32, torch.Generator().manual_seed(3))
    lengths = []
    for b in range(8):
        toks = [t for t in x[b, :-1].tolist() if t != 1]
        assert (x[b, : 199 - len(toks)] == 1).all() and int(x[b, -1]) == 18
        assert int(y[b, -1]) - 3 == _eval_listops(toks) and (y[b, :-1] == -100).all()
        lengths.append(len(toks))
    assert max(lengths) > 40  # nested, not single digits
    assert any(t in x[:, :-1] for t in (13, 14, 15, 16)) and 17 in x


def test_an_auxiliary_loss_of_a_mixer_is_trained(tmp_path):
    s = train(TrainConfig(task="listops", mixer="longvq:codes=8:chunk=8", seq=32, steps=3, dim=16, layers=1,
                          vocab=32, batch=4, eval_every=3), tmp_path, progress=False)
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert all(r["aux"] > 0 for r in steps) and 0 <= s["final_acc"] <= 1


def test_lm_predicts_the_next_byte_of_the_stdlib_source_held_out_windows_for_evaluation(tmp_path):
    from longattn.bench.tasks.niah import stdlib_text

    text = stdlib_text().encode("utf-8")
    x, y = make_batch("lm", 3, 40, 256, torch.Generator().manual_seed(0))
    xe, _ = make_batch("lm", 3, 40, 256, torch.Generator().manual_seed(0), held_out=True)
    cut = int(0.9 * len(text))
    for b in range(3):
        window = bytes(x[b].tolist())
        assert bytes(y[b, :-1].tolist()) == window[1:]
        i = text.find(window)
        assert 0 <= i < cut and text[i + 40] == int(y[b, -1])
        assert text.find(bytes(xe[b].tolist()), cut) >= cut  # evaluation windows come from the held-out tail
    s = train(TrainConfig(task="lm", mixer="softmax", seq=32, steps=2, dim=16, layers=1, vocab=256, batch=4,
                          eval_every=2), tmp_path, progress=False)
    assert len(s["ppl_by_position"]) == 8 and all(r["ppl"] > 1 for r in s["ppl_by_position"])
    with pytest.raises(ValueError, match="causal"):
        train(TrainConfig(task="lm", mixer="ponet", seq=32, steps=1, dim=16, vocab=256), None, progress=False)


def _mixer_table():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "mixer_table.py"
    spec = importlib.util.spec_from_file_location("mixer_table", path)
    mt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mt)
    return mt


def test_mixer_table_lm_refuses_bidirectional_mixers_and_weights_the_perplexity_by_positions(tmp_path, capsys):
    import math

    mt = _mixer_table()
    assert mt.main(["--task", "lm", "--mixers", "softmax,ponet", "--out", str(tmp_path / "t")]) == 2
    assert "ponet" in capsys.readouterr().err and not (tmp_path / "t").exists()
    s = {"ppl_by_position": [{"from": 1, "to": 16, "ppl": 8.0}, {"from": 17, "to": 64, "ppl": 2.0}]}
    assert mt._ppl(s) == pytest.approx(math.exp((16 * math.log(8) + 48 * math.log(2)) / 64))
    assert mt._ends(s) == "8.00 / 2.00"
