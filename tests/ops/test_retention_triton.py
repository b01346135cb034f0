"""The Triton chunkwise retention (forward kernels) against the PyTorch forms and the reference, run on the
CPU under Triton's interpreter: a tier of its own (`-m triton`, needs `pip install triton`; CI runs it with
TRITON_INTERPRET=1). Small shapes: the interpreter runs kernels in numpy, one program at a time."""

import pytest
import torch

from scaleformer.ops.retention import retention, retention_reference

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("triton_interpreter")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(b, h, t, dk, dv, gated, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, t, dk, generator=g) * dk**-0.5 for _ in range(2))
    v = torch.randn(b, h, t, dv, generator=g)
    if gated:  # per-token decays in (0, 1], some near 0 and some near 1
        log_decay = torch.nn.functional.logsigmoid(torch.randn(b, h, t, generator=g) * 3) / 4
    else:
        log_decay = torch.log(1 - 2.0 ** (-5 - torch.arange(h, dtype=torch.float64)))
    state = torch.randn(b, h, dk, dv, generator=g) * 0.3
    return [x.to(DEVICE) for x in (q.to(dtype), k.to(dtype), v.to(dtype))], log_decay.float().to(DEVICE), state.to(DEVICE)


@pytest.mark.parametrize("gated", [False, True], ids=["per-head", "gated"])
@pytest.mark.parametrize("t, chunk", [(37, 16), (64, 32), (5, 64)])
def test_forward_and_final_state_equal_the_pytorch_form(gated, t, chunk):
    (q, k, v), log_decay, state = _inputs(2, 3, t, 24, 33, gated, torch.float32)  # K, V not powers of two
    mask = torch.ones(2, t, dtype=torch.bool, device=DEVICE)
    mask[0, :3] = False  # left padding
    mask[1, t // 2] = False  # a hole inside
    for initial in (None, state):
        args = dict(log_decay=log_decay, mask=mask, initial_state=initial, output_final_state=True, chunk_size=chunk)
        o, s = retention(q, k, v, backend="triton", **args)
        o_ref, s_ref = retention(q.double(), k.double(), v.double(), backend="torch",
                                 **{**args, "initial_state": None if initial is None else initial.double()})
        assert o.dtype == torch.float32 and s.dtype == torch.float32
        assert torch.allclose(o.double(), o_ref, atol=2e-5, rtol=2e-5), (o.double() - o_ref).abs().max()
        assert torch.allclose(s.double(), s_ref, atol=2e-5, rtol=2e-5), (s.double() - s_ref).abs().max()
        assert o[0, :, :3].abs().max() == 0 and o[1, :, t // 2].abs().max() == 0  # padding outputs nothing
    ref, _ = retention_reference(q.double().cpu(), k.double().cpu(), v.double().cpu(), log_decay=log_decay.cpu(),
                                 mask=mask.cpu())
    o, _ = retention(q, k, v, log_decay=log_decay, mask=mask, chunk_size=chunk, backend="triton")
    assert torch.allclose(o.double().cpu(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_keep_float32_states(dtype):
    (q, k, v), log_decay, state = _inputs(1, 2, 40, 32, 17, False, dtype, seed=1)
    o, s = retention(q, k, v, log_decay=log_decay, chunk_size=16, initial_state=state, output_final_state=True,
                     backend="triton")
    o_ref, s_ref = retention(q.double(), k.double(), v.double(), log_decay=log_decay, initial_state=state.double(),
                             output_final_state=True)
    assert o.dtype == dtype and s.dtype == torch.float32
    tolerance = 2e-2 if dtype == torch.bfloat16 else 4e-3  # the inputs' rounding, carried through the dots
    assert torch.allclose(o.double(), o_ref, atol=tolerance, rtol=tolerance)
    assert torch.allclose(s.double(), s_ref, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("gated", [False, True], ids=["per-head", "gated"])
@pytest.mark.parametrize("t, chunk, with_state", [(21, 16, True), (40, 16, False), (9, 32, True)])
def test_gradients_equal_the_pytorch_form(gated, t, chunk, with_state):
    """Every input's gradient, log decays included, through the outputs and the final state, with padding."""
    (q, k, v), log_decay, state = _inputs(2, 2, t, 24, 17, gated, torch.float32, seed=2)
    mask = torch.ones(2, t, dtype=torch.bool, device=DEVICE)
    mask[0, :2] = False
    mask[1, t - 3] = False
    g = torch.Generator().manual_seed(3)
    weights = torch.randn(2, 2, t, 17, generator=g).to(DEVICE)
    grads = []
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        inputs = [x.to(dtype).clone().requires_grad_() for x in (q, k, v, log_decay.double(), state)]
        o, s = retention(*inputs[:3], log_decay=inputs[3], initial_state=inputs[4] if with_state else None,
                         mask=mask, chunk_size=chunk, output_final_state=True, backend=backend)
        ((o * weights.to(dtype)).sum() + s.square().sum()).backward()
        grads.append([x.grad for x in inputs[:4]] + ([inputs[4].grad] if with_state else []))
    for name, a, b in zip(["q", "k", "v", "log_decay", "initial_state"], *grads):
        assert torch.allclose(a.double(), b, atol=5e-5, rtol=5e-5), (name, (a.double() - b).abs().max())


@pytest.mark.parametrize("gated", [False, True], ids=["per-head", "gated"])
def test_packed_documents_by_offsets(gated):
    """cu_seqlens-style offsets read in place: documents of 0, 1, 16, 17 and 29 steps (chunk 16), each with
    its own initial and final state, a padding step inside one; outputs, states and every gradient equal
    the PyTorch form's (which gathers each document into a row) in float64."""
    lengths = [17, 0, 1, 29, 16]
    t = sum(lengths)
    offsets = torch.tensor([0] + lengths, device=DEVICE).cumsum(0)
    (q, k, v), log_decay, _ = _inputs(1, 2, t, 24, 17, gated, torch.float32, seed=5)
    states = torch.randn(len(lengths), 2, 24, 17, generator=torch.Generator().manual_seed(6)).to(DEVICE) * 0.3
    mask = torch.ones(1, t, dtype=torch.bool, device=DEVICE)
    mask[0, 20] = False
    weights = torch.randn(1, 2, t, 17, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    results = []
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        inputs = [x.to(dtype).clone().requires_grad_() for x in (q, k, v, log_decay.double(), states)]
        o, s = retention(*inputs[:3], log_decay=inputs[3], initial_state=inputs[4], mask=mask, offsets=offsets,
                         chunk_size=16, output_final_state=True, backend=backend)
        ((o * weights.to(dtype)).sum() + s.square().sum()).backward()
        results.append([o, s] + [x.grad for x in inputs])
    names = ["o", "final states", "dq", "dk", "dv", "d log_decay", "d initial states"]
    for name, a, b in zip(names, *results):
        assert torch.allclose(a.double(), b, atol=5e-5, rtol=5e-5), (name, (a.double() - b).abs().max())
    # The empty document's final state is its initial state; documents do not see each other.
    assert torch.allclose(results[0][1][1].double(), states[1].double(), atol=1e-6)
    alone, _ = retention(q[:, :, 18:47], k[:, :, 18:47], v[:, :, 18:47], log_decay=log_decay if not gated
                         else log_decay[:, :, 18:47], initial_state=states[3:4], mask=mask[:, 18:47], chunk_size=16,
                         backend="triton")
    assert torch.allclose(results[0][0][:, :, 18:47].detach(), alone, atol=1e-5)


def test_half_precision_gradients():
    (q, k, v), log_decay, state = _inputs(1, 2, 24, 16, 16, True, torch.bfloat16, seed=4)
    grads = []
    for backend, dtype in (("triton", torch.bfloat16), ("torch", torch.float64)):
        inputs = [x.to(dtype).clone().requires_grad_() for x in (q, k, v)]
        o, _ = retention(*inputs, log_decay=log_decay, chunk_size=16, backend=backend)
        o.float().square().sum().backward()
        grads.append([x.grad for x in inputs])
    for a, b in zip(*grads):
        assert a.dtype == torch.bfloat16
        assert torch.allclose(a.double(), b, atol=5e-2, rtol=5e-2), (a.double() - b).abs().max()


def test_bad_requests_are_one_line():
    (q, k, v), log_decay, _ = _inputs(1, 1, 8, 16, 16, False, torch.float32)
    with pytest.raises(ValueError, match="computes the chunkwise form"):
        retention(q, k, v, log_decay=log_decay, form="parallel", backend="triton")
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        retention(q.double(), k.double(), v.double(), log_decay=log_decay, backend="triton")
    with pytest.raises(ValueError, match="backend must be"):
        retention(q, k, v, log_decay=log_decay, backend="cuda")


@pytest.mark.parametrize("preset", ["retnet-tiny", "gret-tiny"])
def test_a_model_with_the_triton_backend_equals_the_pytorch_one(preset):
    """Whole models (RetNet; gated retention) with `retention_backend="triton"`: logits and every weight's
    gradient, with left padding and with packed documents (which the layer gathers into padded rows)."""
    import scaleformer as sf

    config = sf.load_preset(preset, layers=1, chunk_size=16)
    torch.manual_seed(0)
    reference = sf.build(config).to(DEVICE)
    fast = sf.build(sf.load_preset(preset, layers=1, chunk_size=16, retention_backend="triton")).to(DEVICE)
    fast.load_state_dict(reference.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :5] = False
    documents = (torch.arange(37, device=DEVICE) >= 20).long().expand(2, 37)
    for options in ({"attention_mask": mask}, {"document_ids": documents}):
        outputs = []
        for model in (reference, fast):
            model.zero_grad()
            logits = model(ids, **options).logits
            logits.square().mean().backward()
            outputs.append((logits, {n: p.grad.clone() for n, p in model.named_parameters()}))
        (a, grads_a), (b, grads_b) = outputs
        assert torch.allclose(a, b, atol=2e-5, rtol=2e-5), (a - b).abs().max()
        for name in grads_a:
            assert torch.allclose(grads_a[name], grads_b[name], atol=5e-5, rtol=5e-4), name


def test_the_retention_benchmark_times_the_triton_backend(tmp_path):
    import json

    from scaleformer.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "retention", "--lengths", "32", "--contexts", "32", "--presets", "--backends", "torch",
                 "triton", "--repeats", "1", "--device", DEVICE, "--json", str(out)]) == 0
    row = json.loads(out.read_text())["training"][0]
    assert row["triton_s"] > 0 and row["chunkwise_s"] > 0 and row["triton_over_chunkwise"] > 0
