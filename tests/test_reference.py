import pytest
import torch
import torch.nn.functional as F

from longattn import reference


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("hq,hk", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa2", "mqa"])
@pytest.mark.parametrize("nq,nk", [(33, 33), (7, 50), (1, 19)], ids=["self", "cross", "decode"])
def test_reference_matches_sdpa_float64(causal, hq, hk, nq, nk):
    q = torch.randn(2, hq, nq, 8, dtype=torch.float64)
    k = torch.randn(2, hk, nk, 8, dtype=torch.float64)
    v = torch.randn(2, hk, nk, 8, dtype=torch.float64)
    out, lse = reference.attention(q, k, v, causal=causal)
    m = reference.dense_mask(nq, nk, causal=causal)
    kk, vv = k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)
    ref = F.scaled_dot_product_attention(q, kk, vv, attn_mask=m)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    s = (q @ kk.transpose(-1, -2)) / 8**0.5
    torch.testing.assert_close(lse, s.masked_fill(~m, float("-inf")).logsumexp(-1))


def test_reference_empty_rows_and_window():
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    mask[..., 2, :] = False
    out, lse = reference.attention(q, k, v, mask=mask, window=2)
    assert torch.all(out[:, :, 2] == 0) and torch.all(torch.isinf(lse[:, :, 2]))
    m = reference.dense_mask(5, 5, window=2)
    assert m.sum(-1).tolist() == [1, 2, 2, 2, 2]


def test_reference_bad_shapes():
    with pytest.raises(ValueError, match="multiple of kv heads"):
        reference.attention(torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
    with pytest.raises(ValueError, match="window"):
        reference.dense_mask(4, 4, window=0)
