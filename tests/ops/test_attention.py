import pytest
import torch

from scaleformer.ops.attention import attention, attention_reference, causal_mask
from tests.conftest import assert_close

DTYPES = [torch.float32, torch.float64]


def _inputs(dtype, b=2, h=3, tq=7, tk=7, d=8):
    q = torch.randn(b, h, tq, d, dtype=dtype, requires_grad=True)
    k = torch.randn(b, h, tk, d, dtype=dtype, requires_grad=True)
    v = torch.randn(b, h, tk, d, dtype=dtype, requires_grad=True)
    return q, k, v


def _random_mask(b, tq, tk):
    mask = torch.rand(b, 1, tq, tk) > 0.4
    mask[..., 0] = True  # every query sees at least one key (the contract)
    return mask


CASES = {
    "plain": dict(tq=7, tk=7),
    "causal": dict(tq=7, tk=7, causal=True),
    "causal_with_past": dict(tq=3, tk=9, causal=True),
    "mask": dict(tq=5, tk=9, mask=True),
    "bias": dict(tq=5, tk=6, bias=True),
    "mask_bias_causal": dict(tq=6, tk=6, mask=True, bias=True, causal=True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_sdpa_matches_reference_outputs_and_gradients(case, dtype):
    spec = CASES[case]
    q, k, v = _inputs(dtype, tq=spec["tq"], tk=spec["tk"])
    kwargs = dict(causal=spec.get("causal", False))
    if spec.get("mask"):
        kwargs["mask"] = _random_mask(2, spec["tq"], spec["tk"])
    if spec.get("bias"):
        kwargs["bias"] = torch.randn(2, 3, spec["tq"], spec["tk"], dtype=dtype)
    fast, ref = attention(q, k, v, **kwargs), attention_reference(q, k, v, **kwargs)
    assert_close(fast, ref, dtype)
    grad_out = torch.randn_like(ref)
    fast_grads = torch.autograd.grad(fast, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for fast_grad, ref_grad in zip(fast_grads, ref_grads):
        assert_close(fast_grad, ref_grad, dtype)


def test_reference_is_the_softmax_formula():
    q, k, v = (t.detach() for t in _inputs(torch.float64, b=1, h=1, tq=4, tk=4, d=2))
    out = attention_reference(q, k, v, causal=True)
    # Row 0 sees only key 0; row 1 averages keys 0 and 1 with softmax weights.
    assert_close(out[0, 0, 0], v[0, 0, 0], torch.float64)
    s = (q[0, 0, 1] @ k[0, 0, :2].T) / 2**0.5
    w = torch.exp(s) / torch.exp(s).sum()
    assert_close(out[0, 0, 1], w @ v[0, 0, :2], torch.float64)


def test_causal_mask_is_bottom_right_aligned():
    mask = causal_mask(2, 4)
    assert mask.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_uninitialised_memory_is_poisoned_in_op_tests():
    """The autouse fixture of tests/ops/conftest.py is active: a forgotten write shows up as NaN."""
    assert torch.isnan(torch.empty(3)).all() and torch.isnan(torch.empty_like(torch.ones(2))).all()
    assert torch.isnan(torch.ones(1).new_empty(4)).all() and torch.isnan(torch.empty_strided((2,), (1,))).all()
    assert torch.empty(2, dtype=torch.long).shape == (2,)  # integer buffers are left alone
