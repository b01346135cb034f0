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


# ---------------------------------------------------------------------------------------------------------
# Attention sinks (gpt-oss): a learned logit per head in every softmax's denominator
# ---------------------------------------------------------------------------------------------------------

def _sink_by_hand(q, k, v, sink, keep):
    """Σ_j exp(s_ij) v_j / (exp(sink_h) + Σ_j exp(s_ij)) over the kept keys, written out in float64 loops."""
    b, heads, tq, d = q.shape
    group = heads // k.shape[1]
    out = torch.zeros_like(q)
    for n in range(b):
        for h in range(heads):
            for i in range(tq):
                scores = [(q[n, h, i] @ k[n, h // group, j]) / d ** 0.5 for j in range(k.shape[2]) if keep[n, h, i, j]]
                values = [v[n, h // group, j] for j in range(k.shape[2]) if keep[n, h, i, j]]
                weights = torch.exp(torch.stack(scores)) if scores else torch.zeros(0, dtype=q.dtype)
                denominator = torch.exp(sink[h]) + weights.sum()
                out[n, h, i] = sum((w * value for w, value in zip(weights, values)), torch.zeros(d, dtype=q.dtype)) / denominator
    return out


@pytest.mark.parametrize("case", ["causal", "bidirectional", "causal-cached", "window-mask", "grouped-decode"])
def test_sinks_are_the_formula_written_out(case):
    """Fast path and reference against a per-row loop, in float64: dense causal and bidirectional without a
    mask (the fused kernels, through an extra channel and a dummy query), causal with a cache (bottom-right
    alignment), an explicit window mask with grouped heads, and a grouped-query decoding step (an explicit
    bias column)."""
    g = torch.Generator().manual_seed(5)
    heads, kv_heads, tq, tk = {"causal": (2, 2, 5, 5), "bidirectional": (4, 2, 5, 5), "causal-cached": (2, 1, 3, 6),
                               "window-mask": (4, 2, 6, 6), "grouped-decode": (4, 2, 1, 7)}[case]
    q = torch.randn(2, heads, tq, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, kv_heads, tk, 8, generator=g, dtype=torch.float64) for _ in range(2))
    sink = torch.randn(heads, generator=g, dtype=torch.float64) * 2
    causal = case not in ("window-mask", "bidirectional")
    mask = None
    keep = torch.ones(2, heads, tq, tk, dtype=torch.bool)
    if causal:
        keep &= causal_mask(tq, tk)
    if case == "window-mask":
        rows, cols = torch.arange(tq)[:, None], torch.arange(tk)[None, :]
        mask = ((cols <= rows) & (cols > rows - 3))[None, None].expand(2, 1, tq, tk).clone()
        mask[1, :, :, 0] = False  # a padded first key in row 1
        mask[1, :, 0, :] = False  # and a query that sees nothing: the sink takes all its mass (output 0)
        keep &= mask
    expected = _sink_by_hand(q, k, v, sink, keep)
    for op in (attention, attention_reference):
        assert_close(op(q, k, v, mask=mask, causal=causal, sink=sink), expected, torch.float64)


@pytest.mark.parametrize("masked", [False, True])
def test_sinks_gradients_agree_and_limits_hold(masked):
    """Both fast paths (fused with the extra channel; an explicit bias column) against the reference."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    sink = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    mask = causal_mask(5, 5) & ~torch.eye(5, dtype=torch.bool).roll(1, 0) if masked else None  # one link cut
    grads = []
    for op in (attention, attention_reference):
        out = op(q, k, v, causal=True, sink=sink, mask=mask)
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), (q, k, v, sink)))
    for fast, ref in zip(*grads):
        assert_close(fast, ref, torch.float64)
    assert grads[0][3].abs().min() > 0
    # a sink at -inf is no sink; a very large one takes all the mass
    with torch.no_grad():
        plain = attention_reference(q, k, v, causal=True)
        assert_close(attention(q, k, v, causal=True, sink=torch.full((2,), -1e4, dtype=torch.float64)), plain, torch.float64)
        assert attention(q, k, v, causal=True, sink=torch.full((2,), 60.0, dtype=torch.float64)).abs().max() < 1e-20
