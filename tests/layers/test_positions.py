import math

import pytest
import torch

from scaleformer.layers.positions import Rotary, RelativePositionBias, relative_position_bucket, sinusoidal_positions
from tests.conftest import assert_close


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rope_is_complex_rotation(dtype):
    b, h, t, d = 2, 3, 5, 8
    x = torch.randn(b, h, t, d, dtype=dtype)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 30, 31]])
    out = Rotary(d, base=10000.0)(x, positions, is_query=True)
    theta = 10000.0 ** (-torch.arange(d // 2, dtype=torch.float64) * 2 / d)
    z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    rotated = z * torch.exp(1j * positions.double()[:, None, :, None] * theta)
    expected = torch.view_as_real(rotated).flatten(-2)
    assert_close(out.double(), expected, dtype)
    assert out.dtype == dtype


def test_xpos_scales_queries_up_and_keys_down_per_pair():
    d, base = 8, 16.0
    rot = Rotary(d, scale_base=base)
    x = torch.randn(1, 1, 3, d, dtype=torch.float64)
    positions = torch.tensor([[0, 5, 40]])
    zeta = (torch.arange(d // 2, dtype=torch.float64) / (d // 2) + 0.4) / 1.4
    norm_in = x.unflatten(-1, (-1, 2)).norm(dim=-1)
    for is_query, sign in ((True, 1), (False, -1)):
        out = rot(x, positions, is_query=is_query)
        norm_out = out.unflatten(-1, (-1, 2)).norm(dim=-1)
        expected = norm_in * zeta ** (sign * positions.double()[..., None] / base)
        assert_close(norm_out, expected, torch.float64)


def test_xpos_scores_depend_only_on_distance():
    d = 16
    rot = Rotary(d, scale_base=32.0)
    q, k = torch.randn(1, 1, 1, d, dtype=torch.float64), torch.randn(1, 1, 1, d, dtype=torch.float64)

    def score(n, m):
        return (rot(q, torch.tensor([[n]]), is_query=True) * rot(k, torch.tensor([[m]]), is_query=False)).sum()

    assert_close(score(9, 4), score(109, 104), torch.float64)
    assert_close(score(3, 3), score(250, 250), torch.float64)
    assert not torch.isclose(score(9, 4), score(9, 5))


def _t5_bucket(relative: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """T5's bucketing written with Python scalars, from the paper's description."""
    bucket, n = 0, -relative
    if bidirectional:
        num_buckets //= 2
        if n < 0:
            bucket += num_buckets
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return bucket + n
    large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    return bucket + min(large, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_buckets_match_scalar_formula(bidirectional):
    relative = torch.arange(-300, 301)
    got = relative_position_bucket(relative, bidirectional=bidirectional, num_buckets=32, max_distance=128)
    expected = [_t5_bucket(r, bidirectional, 32, 128) for r in relative.tolist()]
    assert got.tolist() == expected
    # A few values by hand: the key itself is bucket 0; one step back is 1; one step ahead is 17 (bidirectional).
    zero = relative.tolist().index(0)
    assert got[zero] == 0 and got[zero - 1] == 1
    assert got[zero + 1] == (17 if bidirectional else 0)
    assert got.max() == 31


def test_relative_bias_gathers_table_per_head():
    bias = RelativePositionBias(heads=2, bidirectional=False, num_buckets=8, max_distance=16)
    q_pos, k_pos = torch.tensor([[3]]), torch.tensor([[0, 1, 2, 3]])
    out = bias(q_pos, k_pos)  # (1, 2, 1, 4)
    buckets = relative_position_bucket(k_pos - 3, bidirectional=False, num_buckets=8, max_distance=16)
    assert buckets.tolist() == [[3, 2, 1, 0]]
    assert torch.equal(out[0, :, 0, :], bias.table.weight[buckets[0]].T)


def test_sinusoidal_values():
    out = sinusoidal_positions(torch.tensor([[0, 3]]), 8, torch.float64)
    assert torch.equal(out[0, 0], torch.tensor([0.0] * 4 + [1.0] * 4, dtype=torch.float64))
    freqs = torch.exp(torch.arange(4, dtype=torch.float64) * -(math.log(10000.0) / 3))
    assert_close(out[0, 1], torch.cat([torch.sin(3 * freqs), torch.cos(3 * freqs)]), torch.float64)
