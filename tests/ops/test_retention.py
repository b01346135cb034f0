import math

import pytest
import torch

from scaleformer.ops.retention import retention, retention_reference
from tests.conftest import assert_close

FORMS = ["parallel", "chunkwise", "recurrent"]
DTYPES = [torch.float32, torch.float64]


def _inputs(dtype, b=2, h=3, t=11, dk=4, dv=5, scale=1.0):
    q, k = (torch.randn(b, h, t, dk, dtype=dtype) * scale for _ in range(2))
    v = torch.randn(b, h, t, dv, dtype=dtype) * scale
    log_decay = torch.log(1 - 2.0 ** (-1 - torch.arange(h, dtype=torch.float64)))  # strong decays: 0.5, 0.75, ..
    return q, k, v, log_decay


def _mask(b, t):
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    mask[0, 5] = False  # a hole in the middle
    return mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_every_form_matches_the_reference(form, dtype, with_mask, with_state):
    q, k, v, log_decay = _inputs(dtype)
    mask = _mask(2, 11) if with_mask else None
    s0 = torch.randn(2, 3, 4, 5, dtype=dtype) if with_state else None
    expected, expected_state = retention_reference(q, k, v, log_decay=log_decay, mask=mask, initial_state=s0)
    o, state = retention(q, k, v, log_decay=log_decay, form=form, chunk_size=4, mask=mask, initial_state=s0,
                         output_final_state=True)
    assert_close(o, expected, dtype)
    assert_close(state, expected_state, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,chunk", [(1, 4), (7, 4), (16, 4), (13, 64), (33, 8)])
def test_forms_agree_on_outputs_states_and_gradients(t, chunk, dtype):
    q, k, v, log_decay = _inputs(dtype, t=t, scale=3.0)
    s0 = torch.randn(2, 3, 4, 5, dtype=dtype)
    mask = torch.ones(2, t, dtype=torch.bool)
    mask[1, : t // 3] = False
    leaves = [x.clone().requires_grad_() for x in (q, k, v, s0)]
    results = {}
    for form in FORMS:
        inputs = [x.detach().clone().requires_grad_() for x in leaves]
        o, state = retention(*inputs[:3], log_decay=log_decay, form=form, chunk_size=chunk, mask=mask,
                             initial_state=inputs[3], output_final_state=True)
        torch.manual_seed(0)
        loss = (o * torch.randn_like(o)).sum() + (state * torch.randn_like(state)).sum()
        results[form] = (o, state, torch.autograd.grad(loss, inputs))
    base_o, base_state, base_grads = results["parallel"]
    for form in ("chunkwise", "recurrent"):
        o, state, grads = results[form]
        assert_close(o, base_o, dtype)
        assert_close(state, base_state, dtype)
        for grad, base_grad in zip(grads, base_grads):
            assert_close(grad, base_grad, dtype)


def test_padding_is_invisible_wherever_it_is():
    q, k, v, log_decay = _inputs(torch.float64, b=1, t=6)
    s0 = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    keep = torch.tensor([0, 1, 3, 5])
    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[0, keep] = True
    for form in FORMS:
        padded, padded_state = retention(q, k, v, log_decay=log_decay, form=form, chunk_size=4, mask=mask,
                                         initial_state=s0, output_final_state=True)
        dense, dense_state = retention(q[:, :, keep], k[:, :, keep], v[:, :, keep], log_decay=log_decay, form=form,
                                       chunk_size=4, initial_state=s0, output_final_state=True)
        assert_close(padded[:, :, keep], dense, torch.float64)
        assert_close(padded_state, dense_state, torch.float64)
        assert torch.all(padded[:, :, ~mask[0]] == 0)


def test_recurrence_by_hand():
    # One head, γ = 0.5, scalar keys/values: S_t = 0.5 S_{t-1} + k_t v_t, o_t = q_t S_t.
    q = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64).view(1, 1, 3, 1)
    k = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64).view(1, 1, 3, 1)
    v = torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64).view(1, 1, 3, 1)
    log_decay = torch.tensor([math.log(0.5)], dtype=torch.float64)
    for form in FORMS:
        o, state = retention(q, k, v, log_decay=log_decay, form=form, chunk_size=2, output_final_state=True)
        # S = 4, 0.5·4 + 2 = 4, 0.5·4 + 2 = 4; o = 4, 8, 4
        assert o.flatten().tolist() == [4.0, 8.0, 4.0]
        assert state.item() == 4.0


def test_long_sequence_keeps_fp32_precision():
    # Exponents are log γ × integer counts, not differences of large cumulative sums: at T = 2048 with a slow
    # decay, fp32 chunkwise still matches fp64 to ~1e-6 relative.
    q, k, v, _ = _inputs(torch.float64, b=1, h=2, t=2048, dk=8, dv=8)
    log_decay = torch.log(1 - 2.0 ** (-5 - 7 * torch.arange(2, dtype=torch.float64)))  # γ up to 1 - 2^-12
    exact, _ = retention(q, k, v, log_decay=log_decay, form="chunkwise", chunk_size=64)
    approx, _ = retention(q.float(), k.float(), v.float(), log_decay=log_decay, form="chunkwise", chunk_size=64)
    assert_close(approx.double(), exact, torch.float32)


def test_bad_arguments_raise():
    q, k, v, log_decay = _inputs(torch.float32)
    with pytest.raises(ValueError, match="form must be"):
        retention(q, k, v, log_decay=log_decay, form="parallell")
    with pytest.raises(ValueError, match="log_decay must have shape"):
        retention(q, k, v, log_decay=log_decay[:2])
    with pytest.raises(ValueError, match="mask must have shape"):
        retention(q, k, v, log_decay=log_decay, mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="initial_state must have shape"):
        retention(q, k, v, log_decay=log_decay, initial_state=torch.zeros(2, 3, 5, 4))
