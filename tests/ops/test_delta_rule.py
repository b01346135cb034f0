"""The delta rule against a token-by-token float64 loop written from the recurrence in the paper's layout
(S_t = α_t S_{t−1}(I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ, o_t = S_t q_t): outputs, final states and every
gradient (q, k, v, β, the decays, the initial state) within 1e-10 relative in float64, for DeltaNet (no
decay) and Gated DeltaNet, with padding, carried state and chunk sizes 1, odd and longer than T."""

import pytest
import torch

from scaleformer.ops.delta_rule import delta_rule
from tests.conftest import assert_close


def loop(q, k, v, beta, log_decay=None, mask=None, initial_state=None, scale=None):
    """The recurrence, one token at a time, in the paper's layout S = hᵀ (V × K)."""
    b, h, t, dk = q.shape
    s = dk ** -0.5 if scale is None else scale
    state = (torch.zeros(b, h, v.shape[-1], dk, dtype=q.dtype) if initial_state is None
             else initial_state.transpose(-1, -2).clone())
    eye = torch.eye(dk, dtype=q.dtype)
    outputs = []
    for step in range(t):
        alpha = torch.ones(b, h, dtype=q.dtype) if log_decay is None else log_decay[:, :, step].exp()
        bt = beta[:, :, step]
        if mask is not None:
            real = mask[:, step].to(q.dtype)[:, None]
            alpha, bt = alpha * real + (1 - real), bt * real
        kt, vt = k[:, :, step], v[:, :, step]
        erase = eye - bt[..., None, None] * kt[..., :, None] * kt[..., None, :]
        state = alpha[..., None, None] * state @ erase + bt[..., None, None] * vt[..., :, None] * kt[..., None, :]
        out = state @ (s * q[:, :, step])[..., None]
        if mask is not None:
            out = out * mask[:, step].to(q.dtype)[:, None, None, None]
        outputs.append(out[..., 0])
    out = torch.stack(outputs, 2) if outputs else q.new_zeros(b, h, 0, v.shape[-1])  # an empty document
    return out, state.transpose(-1, -2)


def _inputs(b=2, h=3, t=11, dk=4, dv=5, gated=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, t, dk, generator=generator, dtype=torch.float64) for _ in range(2))
    k = k / k.norm(dim=-1, keepdim=True)  # L2-normalised keys, as the layers give (β k kᵀ then stays a contraction)
    v = torch.randn(b, h, t, dv, generator=generator, dtype=torch.float64)
    beta = torch.rand(b, h, t, generator=generator, dtype=torch.float64)
    log_decay = -torch.rand(b, h, t, generator=generator, dtype=torch.float64) if gated else None
    state = torch.randn(b, h, dk, dv, generator=generator, dtype=torch.float64)
    return q, k, v, beta, log_decay, state


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("form, chunk", [("recurrent", 64), ("chunkwise", 1), ("chunkwise", 3), ("chunkwise", 4),
                                         ("chunkwise", 64)])
def test_every_form_is_the_recurrence_in_outputs_states_and_gradients(gated, form, chunk):
    q, k, v, beta, log_decay, state = _inputs(gated=gated)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    mask[1, 6] = False  # and a hole
    leaves = [x.requires_grad_() for x in (q, k, v, beta, state) + ((log_decay,) if gated else ())]
    out, final = delta_rule(q, k, v, beta, log_decay=log_decay, form=form, chunk_size=chunk, mask=mask,
                            initial_state=state, output_final_state=True)
    want_out, want_final = loop(q, k, v, beta, log_decay, mask, state)
    assert_close(out, want_out, torch.float64)
    assert_close(final, want_final, torch.float64)
    weights = torch.randn_like(out), torch.randn_like(final)
    got = torch.autograd.grad((out * weights[0]).sum() + (final * weights[1]).sum(), leaves)
    want = torch.autograd.grad((want_out * weights[0]).sum() + (want_final * weights[1]).sum(), leaves)
    for a, b in zip(got, want):
        assert_close(a, b, torch.float64)


def test_chunks_carry_state_like_one_call():
    q, k, v, beta, log_decay, state = _inputs(t=13)
    whole, whole_state = delta_rule(q, k, v, beta, log_decay=log_decay, initial_state=state, output_final_state=True,
                                    chunk_size=4)
    first, carried = delta_rule(q[:, :, :6], k[:, :, :6], v[:, :, :6], beta[:, :, :6], log_decay=log_decay[:, :, :6],
                                initial_state=state, output_final_state=True, chunk_size=4)
    second, end = delta_rule(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], beta[:, :, 6:], log_decay=log_decay[:, :, 6:],
                             initial_state=carried, output_final_state=True, form="recurrent")
    assert_close(torch.cat([first, second], 2), whole, torch.float64)
    assert_close(end, whole_state, torch.float64)


def test_half_precision_keeps_a_float32_state_and_stays_close():
    q, k, v, beta, log_decay, _ = _inputs(t=40, dk=8, dv=8)
    rounded = [x.bfloat16() for x in (q, k, v, beta, log_decay)]
    exact, _ = delta_rule(*(x.double() for x in rounded[:4]), log_decay=rounded[4].double(), chunk_size=16)
    out, final = delta_rule(*rounded[:4], log_decay=rounded[4], chunk_size=16, output_final_state=True)
    assert out.dtype == torch.bfloat16 and final.dtype == torch.float32
    # the same bf16-rounded inputs, exactly: what is left is float32 arithmetic (~1e-6) and the output's one
    # rounding to bf16 (unit roundoff 2^-8 ≈ 4e-3 relative)
    assert float((out.double() - exact).abs().max()) < 8e-3 * float(exact.abs().max())


def test_bad_shapes_and_forms_are_one_clear_error():
    q, k, v, beta, log_decay, _ = _inputs()
    with pytest.raises(ValueError, match="beta"):
        delta_rule(q, k, v, beta[:, :, :3])
    with pytest.raises(ValueError, match="unknown form 'parallel'"):
        delta_rule(q, k, v, beta, form="parallel")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        delta_rule(q, k, v, beta, chunk_size=0)
    with pytest.raises(ValueError, match="backend must be 'torch' or 'triton', got 'cuda'"):
        delta_rule(q, k, v, beta, backend="cuda")


def test_a_full_write_to_one_repeated_key_stores_exactly_the_last_value():
    """β = 1 and the same unit key at every step: each write replaces what the key held (S k = v_t), the
    case where (I + A) is farthest from the identity (every strictly-lower entry 1)."""
    generator = torch.Generator().manual_seed(3)
    key = torch.randn(4, generator=generator, dtype=torch.float64)
    key = key / key.norm()
    t = 37
    k = key.expand(1, 1, t, 4).clone()
    v = torch.randn(1, 1, t, 5, generator=generator, dtype=torch.float64)
    beta = torch.ones(1, 1, t, dtype=torch.float64)
    for chunk in (1, 5, 16, 64):
        out, state = delta_rule(k * 2.0, k, v, beta, chunk_size=chunk, output_final_state=True)  # q = 2k: s·q = k
        assert_close(out, v, torch.float64)  # what the key reads back is the value just written
        assert_close(state.transpose(-1, -2) @ key, v[0, 0, -1][None, None], torch.float64)


def test_long_bfloat16_sequences_stay_finite_and_close_to_float64():
    """T = 4096 (64 chunks) in bfloat16 against the same rounded inputs in float64: no NaN or Inf, and the
    relative error of the outputs is that of one bf16 rounding of the result (measured 1.8e-3 ungated and
    2.0e-3 gated on 2026-12-06; bound 8e-3 = 2 × bf16's unit roundoff 2^-8), and the float32 state's is
    float32's (measured 2.8e-7 and 5.0e-8; bound 1e-4), because the sums, the triangular solve and the state
    are all computed in float32."""
    q, k, v, beta, log_decay, _ = _inputs(b=1, h=2, t=4096, dk=16, dv=16, seed=5)
    rounded = [x.bfloat16() for x in (q, k, v, beta, log_decay)]
    for gated in (False, True):
        decay = rounded[4] if gated else None
        out, state = delta_rule(*rounded[:4], log_decay=decay, chunk_size=64, output_final_state=True)
        exact, exact_state = delta_rule(*(x.double() for x in rounded[:4]), chunk_size=64, output_final_state=True,
                                        log_decay=None if decay is None else decay.double())
        assert torch.isfinite(out).all() and torch.isfinite(state).all()
        assert float((out.double() - exact).abs().max()) < 8e-3 * float(exact.abs().max())
        assert float((state.double() - exact_state).abs().max()) < 1e-4 * float(exact_state.abs().max())


@pytest.mark.parametrize("form", ["chunkwise", "recurrent"])
def test_packed_documents_by_offsets_equal_separate_calls(form):
    q, k, v, beta, log_decay, _ = _inputs(b=1, t=12)
    offsets = torch.tensor([0, 3, 3, 8, 12])  # an empty document too
    states = torch.randn(4, 3, 4, 5, dtype=torch.float64)
    out, final = delta_rule(q, k, v, beta, log_decay=log_decay, form=form, chunk_size=2, offsets=offsets,
                            initial_state=states, output_final_state=True)
    for n in range(4):
        a, b = int(offsets[n]), int(offsets[n + 1])
        part = slice(a, b)
        alone, alone_state = loop(q[:, :, part], k[:, :, part], v[:, :, part], beta[:, :, part],
                                  log_decay[:, :, part], None, states[n:n + 1])
        if b > a:  # the empty document has no outputs; its final state is its initial one
            assert_close(out[:, :, part], alone, torch.float64)
        assert_close(final[n:n + 1], alone_state, torch.float64)
    with pytest.raises(ValueError, match="offsets must rise from 0"):
        delta_rule(q, k, v, beta, offsets=torch.tensor([0, 5, 3, 12]))
