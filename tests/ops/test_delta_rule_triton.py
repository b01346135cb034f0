"""The Triton chunkwise delta rule (forward and backward kernels) against the float64 token loop and the
PyTorch forms, on the CPU under Triton's interpreter: the Triton tier (`-m
triton`, needs `pip install triton`; CI runs it with TRITON_INTERPRET=1). Small shapes: the interpreter runs
kernels in numpy, one program at a time.

Tolerances: the kernel computes in float32 (IEEE products, never TF32). Its outputs and states are compared
with float64 at 2e-5 absolute and relative: the inputs are O(1) (unit keys, β ≤ 1, |q|, |v| ~ 1), the
chunk's triangular solve is well conditioned for β ≤ 1 and unit keys (I + A has a unit diagonal and
|A_ij| ≤ 1), and a float32 sum of at most 64 such terms carries ~1e-6; 2e-5 leaves a 10x margin for another
CPU's summation order, as the retention kernels' tier does."""

import pytest
import torch

from scaleformer.ops.delta_rule import delta_rule
from tests.ops.test_delta_rule import loop

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("triton_interpreter")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = dict(atol=2e-5, rtol=2e-5)


def _inputs(b, h, t, dk, dv, gated, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, dk, generator=generator, dtype=torch.float64)
    k = torch.randn(b, h, t, dk, generator=generator, dtype=torch.float64)
    k = k / k.norm(dim=-1, keepdim=True)  # L2-normalised keys, as the layers give
    v = torch.randn(b, h, t, dv, generator=generator, dtype=torch.float64)
    beta = torch.rand(b, h, t, generator=generator, dtype=torch.float64)
    log_decay = torch.nn.functional.logsigmoid(torch.randn(b, h, t, generator=generator, dtype=torch.float64) * 3) / 4
    state = torch.randn(b, h, dk, dv, generator=generator, dtype=torch.float64) * 0.3
    return q, k, v, beta, log_decay if gated else None, state


def _float(*tensors):
    return [None if x is None else x.float().to(DEVICE) for x in tensors]


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
@pytest.mark.parametrize("t, chunk", [(37, 16), (64, 32), (5, 64)])
def test_outputs_and_final_state_equal_the_float64_recurrence(gated, t, chunk):
    q, k, v, beta, log_decay, state = _inputs(2, 3, t, 12, 20, gated)  # K, V not powers of two
    mask = torch.ones(2, t, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    mask[1, t // 2] = False  # a hole inside
    for initial in (None, state):
        out, final = delta_rule(*_float(q, k, v, beta), log_decay=_float(log_decay)[0], mask=mask.to(DEVICE),
                                initial_state=_float(initial)[0], output_final_state=True, chunk_size=chunk,
                                backend="triton")
        want_out, want_final = loop(q, k, v, beta, log_decay, mask, initial)
        assert out.dtype == torch.float32 and final.dtype == torch.float32
        assert torch.allclose(out.double().cpu(), want_out, **TOLERANCE), (out.double().cpu() - want_out).abs().max()
        assert torch.allclose(final.double().cpu(), want_final, **TOLERANCE)
        assert out[0, :, :3].abs().max() == 0 and out[1, :, t // 2].abs().max() == 0  # padding outputs nothing


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
def test_packed_documents_by_offsets_each_start_from_their_own_state(gated):
    q, k, v, beta, log_decay, _ = _inputs(1, 2, 41, 16, 16, gated, seed=1)
    offsets = torch.tensor([0, 7, 7, 30, 41])  # an empty document too
    states = torch.randn(4, 2, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 0.3
    out, final = delta_rule(*_float(q, k, v, beta), log_decay=_float(log_decay)[0], offsets=offsets.to(DEVICE),
                            initial_state=_float(states)[0], output_final_state=True, chunk_size=16, backend="triton")
    for n, (start, end) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        part = lambda x: None if x is None else x[:, :, start:end]  # noqa: E731
        want_out, want_final = loop(part(q), part(k), part(v), part(beta), part(log_decay), None, states[n:n + 1])
        assert torch.allclose(out[:, :, start:end].double().cpu(), want_out, **TOLERANCE)
        assert torch.allclose(final[n:n + 1].double().cpu(), want_final, **TOLERANCE)


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
@pytest.mark.parametrize("packed", [False, True], ids=["rows", "documents"])
def test_gradients_equal_the_float64_pytorch_form(gated, packed):
    """The backward kernel: every input's gradient (q, k, v, β, the decays, the initial states), through the
    outputs and the final states, with padding or packed documents (an empty one too), against the float64
    PyTorch chunkwise form (itself held to the token loop at 1e-10 in the default tier): within 2e-5 of the
    largest gradient of each input, float32's accumulation over a few chunks with the margin stated above."""
    b, t = (1, 45) if packed else (2, 21)
    q, k, v, beta, log_decay, state = _inputs(b, 2, t, 8, 12, gated, seed=2)
    options = dict(chunk_size=16, output_final_state=True)
    if packed:
        options["offsets"] = torch.tensor([0, 10, 10, 33, 45], device=DEVICE)
        state = torch.randn(4, 2, 8, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 0.3
    else:
        mask = torch.ones(b, t, dtype=torch.bool, device=DEVICE)
        mask[0, :2] = False
        mask[1, 7] = False
        options["mask"] = mask
    weights = None
    grads = {}
    for backend, cast in (("triton", lambda x: x.float().to(DEVICE)), ("torch", lambda x: x.to(DEVICE))):
        leaves = [cast(x).requires_grad_() for x in (q, k, v, beta, state) + ((log_decay,) if gated else ())]
        out, final = delta_rule(*leaves[:4], log_decay=leaves[5] if gated else None, initial_state=leaves[4],
                                backend=backend, **options)
        if weights is None:
            generator = torch.Generator().manual_seed(6)
            weights = (torch.randn(out.shape, generator=generator, dtype=torch.float64).to(DEVICE),
                       torch.randn(final.shape, generator=generator, dtype=torch.float64).to(DEVICE))
        ((out.double() * weights[0]).sum() + (final.double() * weights[1]).sum()).backward()
        grads[backend] = [x.grad.double() for x in leaves]
    for got, want in zip(grads["triton"], grads["torch"]):
        assert (got - want).abs().max() <= 2e-5 * want.abs().max(), (got - want).abs().max() / want.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_return_their_dtype_and_a_float32_state(dtype):
    q, k, v, beta, log_decay, state = _inputs(1, 2, 40, 16, 16, True, seed=4)
    out, final = delta_rule(*(x.to(dtype).to(DEVICE) for x in (q, k, v)), beta.float().to(DEVICE),
                            log_decay=log_decay.float().to(DEVICE), initial_state=state.float().to(DEVICE),
                            output_final_state=True, chunk_size=16, backend="triton")
    want_out, want_final = loop(q, k, v, beta, log_decay, None, state)
    assert out.dtype == dtype and final.dtype == torch.float32
    tolerance = 5e-2 if dtype == torch.bfloat16 else 1e-2  # the inputs' rounding, carried through the solve
    assert torch.allclose(out.double().cpu(), want_out, atol=tolerance, rtol=tolerance)


def test_what_the_kernel_does_not_compute_is_one_clear_error():
    q, k, v, beta, _, _ = _inputs(1, 1, 4, 4, 4, False)
    with pytest.raises(ValueError, match="backend='triton' computes the chunkwise form, not 'recurrent'"):
        delta_rule(*_float(q, k, v, beta), form="recurrent", backend="triton")
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        delta_rule(q, k, v, beta, backend="triton")


def test_a_gated_deltanet_hybrid_on_the_kernel_equals_it_on_pytorch():
    """backend="triton" in the layer config: the same logits, padding and packed documents included, the
    same gradients (float32 on both sides: 1e-5 relative, 1e-4 for the smallest), and decoding (the
    recurrent form) continues a prefill the kernel computed."""
    import scaleformer as sf

    torch.manual_seed(0)
    models = {backend: sf.build(sf.load_preset("gdn-hybrid-tiny", vocab_size=97, chunk_size=16, backend=backend)
                                ).to(DEVICE) for backend in ("torch", "triton")}
    models["triton"].load_state_dict(models["torch"].state_dict())
    ids = torch.randint(0, 97, (2, 37), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    documents = torch.tensor([[0] * 20 + [1] * 17] * 2, device=DEVICE)
    outs = {}
    for backend, model in models.items():
        logits = model(ids, attention_mask=mask).logits
        packed = model(ids, document_ids=documents).logits
        (logits.float().square().mean() + packed.float().square().mean()).backward()
        outs[backend] = (logits, packed, [p.grad for p in model.parameters()])
    for got, want in zip(outs["triton"][:2], outs["torch"][:2]):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    for got, want in zip(outs["triton"][2], outs["torch"][2]):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    model = models["triton"].eval()
    with torch.no_grad():
        step = model(ids[:, :30], use_cache=True)
        for t in range(30, 37):
            step = model(ids[:, t:t + 1], cache=step.cache)
        assert torch.allclose(step.logits[:, -1], model(ids).logits[:, -1], atol=1e-5, rtol=1e-5)


def test_the_benchmark_times_the_kernel_beside_the_pytorch_form(tmp_path):
    """`scaleformer bench delta --backends torch triton` (the GPU script's call, at a tiny size): a column per
    backend, every time positive."""
    import json

    from scaleformer.cli import main

    out = tmp_path / "delta.json"
    assert main(["bench", "delta", "--lengths", "32", "64", "--heads", "1", "--head-dim", "16", "--chunk-size", "16",
                 "--recurrent-max", "32", "--backends", "torch", "triton", "--device", DEVICE, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert all(row["chunkwise triton_s"] > 0 and row["chunkwise_s"] > 0 for row in rows)
