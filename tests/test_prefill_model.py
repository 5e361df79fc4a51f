"""Prefill patterns through ``longattn.apply`` on tiny random models: full budgets give dense logits, sparse
ones generate with a padded batch exactly like each prompt alone, mixed profiles are checked against the
model, and the CLI's search/ops-bench paths run."""

import json

import pytest
import torch

import longattn
from _helpers import ids_batch
from longattn.models import tiny_model
from longattn.prefill.mixed import write_mixed

FULL = [
    "sink_window:window=512:block_size=16", "tri_shape:window=512:block_size=16",
    "vertical_slash:vertical=512:slash=512:block_size=16", "block_topk:topk=64:block_size=16",
    "lowbit_topk:rel=1e-30:block_size=16", "linear_estimate:topk=64:block_size=16",
    "hierarchical:topk=64:block_size=16", "bilevel_routing:region=16:topk=64:block_size=16",
    "neighborhood:kernel_size=512:block_size=16", "strided_window:stride=1:block_size=16",
    "shifted_groups:group=1024:block_size=16", "long_range_grouping:segment=512:chunk=512:block_size=16",
    "core_context:window=512:block_size=16",
]


@pytest.mark.parametrize("recipe", FULL, ids=[r.split(":")[0] for r in FULL])
def test_full_budget_gives_dense_logits(recipe):
    m = tiny_model("llama")
    ids, _ = ids_batch(b=1, n=150, pad=(0,), seed=1)
    with torch.no_grad():
        ref = m(ids).logits
        with longattn.apply(m, recipe):
            got = m(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


SPARSE = [
    "sink_window:sink=16:window=32:block_size=16", "vertical_slash:vertical=24:slash=24:obs_window=16:block_size=16",
    "block_topk:topk=2:sink=16:block_size=16", "hierarchical:topk=2:sink=16:block_size=16",
    "strided_window:sink=16:window=32:stride=3:block_size=16", "shifted_groups:group=32:sink=16:block_size=16",
    "long_range_grouping:segment=48:chunk=16:block_size=16", "neighborhood:kernel_size=24:dilation=2:block_size=16",
]


@pytest.mark.parametrize("recipe", SPARSE, ids=[r.split(":")[0] for r in SPARSE])
def test_sparse_prefill_batched_with_left_padding_equals_unbatched(recipe):
    """Padding is a whole number of blocks (32 tokens), so every pattern sees the same tokens per row."""
    m = tiny_model("llama")
    for layer in m.model.layers:
        layer.self_attn.q_proj.weight.data *= 8
    ids, am = ids_batch(b=2, n=120, pad=(0, 32), seed=3)
    kw = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), longattn.apply(m, recipe) as session:
        both = m.generate(ids, attention_mask=am, **kw)
        alone = [m.generate(ids[i : i + 1, am[i].bool()], **kw) for i in range(2)]
        assert session.method_s > 0
    for i in range(2):
        assert torch.equal(both.sequences[i, -5:], alone[i].sequences[0, -5:])
        torch.testing.assert_close(torch.stack(both.logits, 1)[i], torch.stack(alone[i].logits, 1)[0],
                                   rtol=0, atol=1e-4)


def test_sparse_prefill_changes_the_logits():
    """A sparse pattern is really applied (the logits move away from dense)."""
    m = tiny_model("llama")
    ids, _ = ids_batch(b=1, n=150, pad=(0,), seed=1)
    with torch.no_grad():
        ref = m(ids).logits
        with longattn.apply(m, "sink_window:sink=0:window=16:block_size=16"):
            got = m(ids).logits
    assert (got - ref).abs().max() > 1e-3


def test_mixed_profile_through_apply(tmp_path):
    m = tiny_model("llama")
    L, H = m.config.num_hidden_layers, m.config.num_attention_heads
    specs = ["sink_window:window=512:block_size=16"] * H
    path = tmp_path / "mix.json"
    write_mixed(path, [specs] * L, block_size=16)
    ids, _ = ids_batch(b=1, n=100, pad=(0,), seed=2)
    with torch.no_grad():
        ref = m(ids).logits
        with longattn.apply(m, f"mixed:profile={path}:block_size=16"):
            got = m(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    write_mixed(path, [specs] * (L + 1), block_size=16)
    with pytest.raises(ValueError, match="layers"):
        with longattn.apply(m, f"mixed:profile={path}:block_size=16"):
            pass


def test_search_assigns_per_head_and_fits_the_budget(tmp_path):
    from longattn.profile.search import fit_budget

    rec = torch.tensor([[0.5, 0.9, 1.0], [0.8, 0.85, 1.0], [0.2, 0.95, 1.0]])
    den = torch.tensor([[0.1, 0.3, 1.0], [0.1, 0.3, 1.0], [0.1, 0.3, 1.0]])
    ch = fit_budget(rec, den, 0.24)
    assert float(den.gather(1, ch[:, None]).mean()) <= 0.24
    # the head that gains least from the denser candidate stays sparse
    assert ch.tolist() == [1, 0, 1]
    assert fit_budget(rec, den, 1.0).tolist() == [2, 2, 2]


def test_profile_search_cli_on_a_tiny_model(tmp_path, monkeypatch, smollm2):
    """The real tokenizer and calibration prompt, a tiny random model (fast): a valid mixed profile comes out
    and loads through apply()."""
    from longattn import cli, models

    _, tok = smollm2
    m = tiny_model("llama", vocab_size=len(tok))
    monkeypatch.setattr(models, "load", lambda name: (m, tok))
    out = tmp_path / "heads.json"
    rc = cli.main(["profile", "search", "--out", str(out), "--length", "512", "--samples", "1", "--density", "0.7",
                   "--candidates", "sink_window:window=64,sink_window:window=256,block_topk:topk=2"])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["format"] == "longattn.mixed/1" and len(d["layers"]) == m.config.num_hidden_layers
    assert all(len(r) == m.config.num_attention_heads for r in d["layers"])
    assert d["chosen"]["density"] <= 0.7 + 1e-9 and d["chosen"]["recall"] >= d["uniform"]["recall"] - 1e-9
    ids, _ = ids_batch(b=1, n=100, pad=(0,), seed=2)
    with torch.no_grad(), longattn.apply(m, f"mixed:profile={out}"):
        m(ids)
