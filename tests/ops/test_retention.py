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


def _token_decays(dtype, b=2, h=3, t=11, low=0.5):
    """log γ_{h,t} in [log low, 0): a data-dependent decay per head and token (gated retention)."""
    return torch.log(low + (1 - low) * torch.rand(b, h, t, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("decay", ["head", "token"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_every_form_matches_the_reference(form, dtype, with_mask, with_state, decay):
    q, k, v, log_decay = _inputs(dtype)
    if decay == "token":
        log_decay = _token_decays(dtype)
    mask = _mask(2, 11) if with_mask else None
    s0 = torch.randn(2, 3, 4, 5, dtype=dtype) if with_state else None
    expected, expected_state = retention_reference(q, k, v, log_decay=log_decay, mask=mask, initial_state=s0)
    o, state = retention(q, k, v, log_decay=log_decay, form=form, chunk_size=4, mask=mask, initial_state=s0,
                         output_final_state=True)
    assert_close(o, expected, dtype)
    assert_close(state, expected_state, dtype)


@pytest.mark.parametrize("decay", ["head", "token"])
@pytest.mark.parametrize("dtype", DTYPES)
# (70, 2) and (300, 1): more chunks than one group of the state scan (ops.retention.SCAN_GROUP = 16), padded
# to whole groups, and (300) a scan two levels deep.
@pytest.mark.parametrize("t,chunk", [(1, 4), (7, 4), (16, 4), (13, 64), (33, 8), (70, 2), (300, 1)])
def test_forms_agree_on_outputs_states_and_gradients(t, chunk, dtype, decay):
    # Per-token decays are learned (a gated layer computes them from its input): their gradients too.
    q, k, v, log_decay = _inputs(dtype, t=t, scale=3.0)
    if decay == "token":
        log_decay = _token_decays(dtype, t=t)
    s0 = torch.randn(2, 3, 4, 5, dtype=dtype)
    mask = torch.ones(2, t, dtype=torch.bool)
    mask[1, : t // 3] = False
    results = {}
    for form in FORMS:
        inputs = [x.detach().clone().requires_grad_() for x in (q, k, v, s0)]
        decays = log_decay.detach().clone().requires_grad_(decay == "token")
        o, state = retention(*inputs[:3], log_decay=decays, form=form, chunk_size=chunk, mask=mask,
                             initial_state=inputs[3], output_final_state=True)
        torch.manual_seed(0)
        loss = (o * torch.randn_like(o)).sum() + (state * torch.randn_like(state)).sum()
        results[form] = (o, state, torch.autograd.grad(loss, inputs + ([decays] if decay == "token" else [])))
    base_o, base_state, base_grads = results["parallel"]
    if decay == "token":
        assert torch.all(base_grads[4][1, :, : t // 3] == 0)  # a padded step's decay does nothing
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


@pytest.mark.parametrize("chunk", [64, 4])
def test_long_sequence_keeps_fp32_precision(chunk):
    # Exponents are log γ × integer counts, not differences of large cumulative sums: at T = 2048 with a slow
    # decay, fp32 chunkwise still matches fp64 to ~1e-6 relative (chunk 4: 512 chunks, a deep state scan).
    q, k, v, _ = _inputs(torch.float64, b=1, h=2, t=2048, dk=8, dv=8)
    log_decay = torch.log(1 - 2.0 ** (-5 - 7 * torch.arange(2, dtype=torch.float64)))  # γ up to 1 - 2^-12
    exact, _ = retention(q, k, v, log_decay=log_decay, form="chunkwise", chunk_size=chunk)
    approx, _ = retention(q.float(), k.float(), v.float(), log_decay=log_decay, form="chunkwise", chunk_size=chunk)
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


# Per-token decays (gated retention, RetNet-3 / YOCO): log_decay (B, H, T).

def test_token_decays_reference_by_hand():
    # One head, scalar keys/values: S_t = γ_t S_{t-1} + k_t v_t with γ = 0.5, 0.25, 1.0.
    q = torch.ones(1, 1, 3, 1, dtype=torch.float64)
    k = torch.ones(1, 1, 3, 1, dtype=torch.float64)
    v = torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64).view(1, 1, 3, 1)
    log_decay = torch.tensor([0.5, 0.25, 1.0], dtype=torch.float64).log().view(1, 1, 3)
    o, state = retention_reference(q, k, v, log_decay=log_decay)
    # S = 4, 0.25·4 + 2 = 3, 1·3 + 1 = 4 (γ_1 = 0.5 acts on the empty state)
    assert o.flatten().tolist() == [4.0, 3.0, 4.0] and state.item() == 4.0
    for form in FORMS:
        o_form, state_form = retention(q, k, v, log_decay=log_decay, form=form, chunk_size=2, output_final_state=True)
        assert_close(o_form, o, torch.float64)
        assert_close(state_form, state, torch.float64)


def test_token_decays_gradient_matches_finite_differences():
    q, k, v, _ = _inputs(torch.float64, b=1, h=2, t=6, dk=3, dv=2)
    log_decay = _token_decays(torch.float64, b=1, h=2, t=6).requires_grad_()
    for form in FORMS:
        assert torch.autograd.gradcheck(
            lambda d, form=form: retention(q, k, v, log_decay=d, form=form, chunk_size=4)[0], (log_decay,))


def test_one_decay_per_head_is_the_same_as_that_decay_at_every_token():
    q, k, v, log_decay = _inputs(torch.float64)
    mask = _mask(2, 11)
    per_token = log_decay[None, :, None].expand(2, 3, 11)
    for form in FORMS:
        head, head_state = retention(q, k, v, log_decay=log_decay, form=form, chunk_size=4, mask=mask,
                                     output_final_state=True)
        token, token_state = retention(q, k, v, log_decay=per_token, form=form, chunk_size=4, mask=mask,
                                       output_final_state=True)
        assert_close(token, head, torch.float64)
        assert_close(token_state, head_state, torch.float64)


def test_token_decays_state_carries_across_calls():
    # Prefill + continuation with the carried state equals one call over the whole sequence.
    q, k, v, _ = _inputs(torch.float64, t=12)
    log_decay = _token_decays(torch.float64, t=12)
    whole, whole_state = retention(q, k, v, log_decay=log_decay, form="chunkwise", chunk_size=4,
                                   output_final_state=True)
    first, state = retention(q[:, :, :7], k[:, :, :7], v[:, :, :7], log_decay=log_decay[..., :7], form="parallel",
                             output_final_state=True)
    outputs = [first]
    for t in range(7, 12):  # then one step at a time, as decoding does
        out, state = retention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], log_decay=log_decay[..., t:t + 1],
                               form="recurrent", initial_state=state, output_final_state=True)
        outputs.append(out)
    assert_close(torch.cat(outputs, dim=2), whole, torch.float64)
    assert_close(state, whole_state, torch.float64)


def test_token_decays_long_sequence_keeps_fp32_precision():
    # Slow data-dependent decays over 2048 steps: the running sum of log γ reaches about -60, and the
    # parallel form subtracts two such sums; both fp32 forms still match fp64 to ~1e-5 relative.
    q, k, v, _ = _inputs(torch.float64, b=1, h=2, t=2048, dk=8, dv=8)
    log_decay = _token_decays(torch.float64, b=1, h=2, t=2048, low=0.94)
    exact, _ = retention(q, k, v, log_decay=log_decay, form="chunkwise", chunk_size=64)
    for form in ("chunkwise", "parallel"):
        approx, _ = retention(q.float(), k.float(), v.float(), log_decay=log_decay.float(), form=form, chunk_size=64)
        assert_close(approx.double(), exact, torch.float32)


def test_token_decays_of_the_wrong_shape_raise():
    q, k, v, _ = _inputs(torch.float32)
    with pytest.raises(ValueError, match=r"or \(B, H, T\) = \(2, 3, 11\)"):
        retention(q, k, v, log_decay=torch.zeros(2, 3, 10))


@pytest.mark.parametrize("form", ["parallel", "chunkwise", "recurrent"])
@pytest.mark.parametrize("gated", [False, True], ids=["per-head", "gated"])
def test_packed_documents_by_offsets_are_independent_rows(form, gated):
    """offsets (cu_seqlens): every document is a sequence of its own, with its own initial and final state:
    the same as the reference run on each document alone."""
    lengths = [5, 0, 9, 1, 6]
    t = sum(lengths)
    offsets = torch.tensor([0] + lengths).cumsum(0)
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, t, 4, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, 2, t, 3, generator=g, dtype=torch.float64)
    states = torch.randn(len(lengths), 2, 4, 3, generator=g, dtype=torch.float64)
    log_decay = (torch.nn.functional.logsigmoid(torch.randn(1, 2, t, generator=g, dtype=torch.float64)) if gated
                 else torch.log(torch.tensor([0.9, 0.6], dtype=torch.float64)))
    o, final = retention(q, k, v, log_decay=log_decay, form=form, chunk_size=4, offsets=offsets,
                         initial_state=states, output_final_state=True)
    for n, (start, end) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        if start == end:
            assert_close(final[n], states[n], torch.float64)
            continue
        doc_decay = log_decay[:, :, start:end] if gated else log_decay
        ref, ref_state = retention_reference(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end],
                                             log_decay=doc_decay, initial_state=states[n:n + 1])
        assert_close(o[:, :, start:end], ref, torch.float64)
        assert_close(final[n:n + 1], ref_state, torch.float64)


def test_bad_offsets_are_one_line():
    q = torch.randn(1, 2, 8, 4)
    decay = torch.full((2,), -0.1)
    for offsets, message in ((torch.tensor([0, 3, 7]), "rise from 0 to the length 8"),
                             (torch.tensor([0, 5, 3, 8]), "rise from 0"),
                             (torch.tensor([[0, 8]]), "1-D integer"),
                             (torch.tensor([0.0, 8.0]), "1-D integer")):
        with pytest.raises(ValueError, match=message):
            retention(q, q, q, log_decay=decay, offsets=offsets)
    with pytest.raises(ValueError, match="batch of one row"):
        retention(q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1), log_decay=decay,
                  offsets=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match=r"\(N, H, K, V\)"):
        retention(q, q, q, log_decay=decay, offsets=torch.tensor([0, 4, 8]), initial_state=torch.zeros(1, 2, 4, 4))


@pytest.mark.parametrize("gated", [False, True], ids=["per-head", "gated"])
@pytest.mark.parametrize("padded", [False, True], ids=["real", "padding"])
def test_a_decoding_step_is_the_recurrence_bit_for_bit(gated, padded):
    """Without gradients, one recurrent step takes a short path; it must give exactly what the general
    recurrence gives for the same step (here the second step of two, after a padding step that changes
    nothing)."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 1, 4, generator=g) for _ in range(2))
    v = torch.randn(2, 3, 1, 5, generator=g)
    state = torch.randn(2, 3, 4, 5, generator=g)
    log_decay = (torch.nn.functional.logsigmoid(torch.randn(2, 3, 1, generator=g)) if gated
                 else torch.log(torch.tensor([0.9, 0.8, 0.5])))
    mask = torch.tensor([[True], [False]]) if padded else None
    with torch.no_grad():
        o, s = retention(q, k, v, log_decay=log_decay, form="recurrent", mask=mask, initial_state=state,
                         output_final_state=True)
        two = [torch.cat([torch.zeros_like(x), x], 2) for x in (q, k, v)]
        decay2 = torch.cat([torch.zeros_like(log_decay), log_decay], 2) if gated else log_decay
        mask2 = torch.cat([torch.zeros(2, 1, dtype=torch.bool), torch.ones(2, 1, dtype=torch.bool) if mask is None
                           else mask], 1)
        o2, s2 = retention(*two, log_decay=decay2, form="recurrent", mask=mask2, initial_state=state,
                           output_final_state=True)
    assert torch.equal(o, o2[:, :, 1:]) and torch.equal(s, s2)
    if padded:
        assert torch.equal(s[1], state[1]) and o[1].abs().max() == 0
