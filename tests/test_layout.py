import pytest
import torch

from longattn.layout import BlockLayout
from longattn.reference import dense_mask


@pytest.mark.parametrize("nq,nk,bs", [(100, 100, 16), (40, 130, 32), (64, 64, 64)], ids=["odd", "cross", "one"])
def test_block_mask_roundtrip_and_dense_mask(nq, nk, bs):
    nqb, nkb = -(-nq // bs), -(-nk // bs)
    m = torch.rand(2, 3, nqb, nkb) < 0.5
    lay = BlockLayout.from_block_mask(m, block_size=bs, q_len=nq, kv_len=nk)
    assert torch.equal(lay.to_block_mask(), m)
    assert torch.equal(lay.kv_counts, m.sum(-1).int())
    dm = lay.to_dense_mask(causal=True)
    # slow obvious way
    slow = torch.zeros(2, 3, nq, nk, dtype=torch.bool)
    causal = dense_mask(nq, nk)
    for b in range(2):
        for h in range(3):
            for i in range(nq):
                for j in range(nk):
                    slow[b, h, i, j] = bool(m[b, h, i // bs, j // bs]) and bool(causal[i, j])
    assert torch.equal(dm, slow)
    # density = chosen causal pairs / all causal pairs
    expect = (slow.sum((-1, -2)).double() / causal.sum()).mean().item()
    assert lay.density() == pytest.approx(expect, rel=1e-12)


def test_from_indices_dedups_and_sorts():
    idx = torch.tensor([[[[3, 1, 1, 0]]]])
    lay = BlockLayout.from_indices(idx, torch.tensor([[[[True, True, True, False]]]]), block_size=16, q_len=10,
                                   kv_len=64)
    assert lay.kv_counts.item() == 2
    assert lay.kv_indices[0, 0, 0, :2].tolist() == [1, 3]


@pytest.mark.parametrize("bs", [0, 24, 100, 8], ids=["zero", "24", "100", "too-small"])
def test_block_size_must_be_power_of_two(bs):
    with pytest.raises(ValueError, match="block_size"):
        BlockLayout.from_block_mask(torch.ones(1, 1, 1, 1, dtype=torch.bool), block_size=bs, seq_len=8)


def test_block_count_mismatch():
    with pytest.raises(ValueError, match="block"):
        BlockLayout.from_block_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), block_size=16, seq_len=100)
