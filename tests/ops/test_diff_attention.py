"""Differential attention: the fast path (two fused calls) against the reference (both maps written out),
and the reference against the definition, map by map."""

import pytest
import torch

from scaleformer.ops.diff_attention import components, diff_attention, diff_attention_reference
from tests.conftest import assert_close

DTYPES = [torch.float32, torch.float64]


def _inputs(dtype, b=2, heads=3, kv=3, t=7, s=7, d=4):
    q = torch.randn(b, 2 * heads, t, d, dtype=dtype)
    k, v = (torch.randn(b, 2 * kv, s, d, dtype=dtype) for _ in range(2))
    return q, k, v, torch.tensor(0.37, dtype=torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv", [(3, 3), (4, 2), (4, 1)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t,s", [(7, 7), (1, 9), (5, 11)])
def test_fast_path_matches_reference(dtype, heads, kv, causal, t, s):
    q, k, v, lam = _inputs(dtype, heads=heads, kv=kv, t=t, s=s)
    mask = torch.rand(2, 1, t, s) > 0.3
    mask[..., torch.arange(t), torch.arange(t) + s - t] = True  # every query sees its own slot (the contract)
    bias = torch.randn(1, heads, t, s, dtype=dtype)
    for m, b in ((None, None), (mask, None), (mask, bias)):
        fast = diff_attention(q, k, v, lam, mask=m, bias=b, causal=causal)
        reference = diff_attention_reference(q, k, v, lam, mask=m, bias=b, causal=causal)
        assert fast.shape == (2, heads, t, 8)
        assert_close(fast, reference, dtype)


def test_reference_is_the_difference_of_two_softmax_maps():
    # One differential head, written out from the paper: (softmax(q1 k1ᵀ/√d) − λ softmax(q2 k2ᵀ/√d)) [v_a | v_b].
    q, k, v, lam = _inputs(torch.float64, b=1, heads=1, kv=1, t=3, s=3, d=2)
    got = diff_attention_reference(q, k, v, lam)[0, 0]
    first = torch.softmax(q[0, 0] @ k[0, 0].T / 2**0.5, -1)
    second = torch.softmax(q[0, 1] @ k[0, 1].T / 2**0.5, -1)
    values = torch.cat([v[0, 0], v[0, 1]], dim=-1)
    assert_close(got, (first - 0.37 * second) @ values, torch.float64)


def test_grouped_heads_read_the_keys_the_papers_code_repeats():
    # 4 differential heads over 1 key/value head: component head m reads key component head m // 4, and
    # every differential head reads value head 0 (both of its components).
    q, k, v, _ = _inputs(torch.float64, heads=4, kv=1)
    q1, q2, k1, k2, values = components(q, k, v)
    assert torch.equal(k1[:, 0], k[:, 0]) and torch.equal(k2[:, 0], k[:, 0])  # heads 0, 1 -> key 0
    assert torch.equal(k1[:, 2], k[:, 1]) and torch.equal(k2[:, 3], k[:, 1])  # heads 4..7 -> key 1
    assert torch.equal(values[:, 3], torch.cat([v[:, 0], v[:, 1]], dim=-1))


def test_gradients_agree():
    q, k, v, _ = _inputs(torch.float64, heads=2, kv=1)
    lam = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    grads = []
    for op in (diff_attention, diff_attention_reference):
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        lam_copy = lam.detach().clone().requires_grad_()
        out = op(*inputs, lam_copy, causal=True)
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                         [*inputs, lam_copy]))
    for fast, reference in zip(*grads):
        assert_close(fast, reference, torch.float64)


def test_bad_head_counts_raise():
    q, k, v, lam = _inputs(torch.float32)
    with pytest.raises(ValueError, match="2h query and 2g key/value component heads"):
        diff_attention(q[:, :5], k, v, lam)
