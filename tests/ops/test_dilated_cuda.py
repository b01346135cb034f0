"""Dilated attention on CUDA's fused kernels (FlashAttention-2, memory-efficient) against the dense reference.

Skipped without a CUDA GPU (CI has none); run on a GPU machine with ``python -m pytest tests -k cuda``.
The reference is computed in float64 on the same device from the same (upcast) inputs.
"""

import pytest
import torch

import scaleformer as sf
from scaleformer.ops import dilated
from scaleformer.ops.dilated import dilated_attention, dilated_attention_reference
from tests.conftest import decode_step_by_step, make_model, tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = {  # (T, segment_lengths, dilation_rates, head dim)
    "aligned": (16, (4, 8, 16), (1, 2, 4), 8),
    "ragged": (13, (4, 6, 32), (1, 3, 5), 8),
    "longnet_like": (24, (4, 8, 16, 32), (1, 2, 4, 6), 16),
    # Blocks longer than the kernels' tiles (64 rows) and than the 32-row lse padding; head dim 64.
    "long_blocks": (300, (96, 200, 512), (1, 3, 4), 64),
}
# fp32: the test suite's tolerance (relative to the largest magnitude); bf16: normwise, inputs rounded to bf16.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def _check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(actual).all(), "non-finite values"
    actual, expected = actual.double(), expected.double()
    if dtype == torch.float32:
        err = (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1.0)
    else:
        err = ((actual - expected).norm() / expected.norm().clamp(min=1e-12)).item()
    assert err <= TOLERANCE[dtype], f"{dtype}: error {err:.3e} > {TOLERANCE[dtype]:.0e}"


def _mask(b, t):
    mask = torch.ones(b, t, dtype=torch.bool, device="cuda")
    mask[1, :3] = False  # left padding
    mask[1, 7] = False  # a hole
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("padded", [False, True])
def test_cuda_fused_kernels_match_dense_reference(case, causal, dtype, padded):
    t, segments, rates, d = CASES[case]
    q, k, v = (torch.randn(2, 5, t, d, device="cuda").to(dtype).requires_grad_() for _ in range(3))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    kwargs = dict(segment_lengths=segments, dilation_rates=rates, causal=causal,
                  key_mask=_mask(2, t) if padded else None)
    kernels = {kernel for _, _, kernel in dilated._Plan(q, list(zip(segments, rates)), None, "fused", causal).steps}
    assert kernels <= {"cuda_flash", "cuda_efficient"} and kernels, kernels  # no silent math fallback
    if causal and dtype != torch.float32:
        assert kernels == {"cuda_flash"}  # causal never needs a key mask (see _Plan)
    fast = dilated_attention(q, k, v, kernel="fused", **kwargs)
    ref = dilated_attention_reference(q64, k64, v64, **kwargs)
    _check(fast, ref, dtype)
    grad = torch.randn_like(ref)
    fast_grads = torch.autograd.grad(fast, (q, k, v), grad.to(dtype))
    for a, b in zip(fast_grads, torch.autograd.grad(ref, (q64, k64, v64), grad)):
        _check(a, b, dtype)


def test_kernel_choice_on_cuda():
    x = torch.zeros(1, 2, 8, 64, device="cuda")
    assert dilated.kernel_name(x.half(), "auto", has_bias=False) == "cuda_flash"
    assert dilated.kernel_name(x.bfloat16(), "auto", has_bias=True) == "cuda_efficient"
    assert dilated.kernel_name(x, "auto", has_bias=False) == "cuda_efficient"
    assert dilated.kernel_name(x.double(), "auto", has_bias=False) == "math"
    with pytest.raises(ValueError, match="no fused dilated kernel"):
        dilated.kernel_name(x[..., :12], "fused", has_bias=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_more_blocks_than_one_cuda_grid_axis_holds(monkeypatch, dtype):
    """Past 65535 blocks the kernels run in slices of the block axis: same values as one launch."""
    q, k, v = (torch.randn(2, 3, 64, 32, device="cuda").to(dtype).requires_grad_() for _ in range(3))
    kwargs = dict(segment_lengths=(8, 32), dilation_rates=(1, 4), causal=True)
    whole = dilated_attention(q, k, v, **kwargs)
    grads = torch.autograd.grad(whole.float().sum(), (q, k, v))
    monkeypatch.setattr(dilated, "_CUDA_GRID", 5)  # 3 heads × 8 segments = 24 blocks -> 5 slices
    sliced = dilated_attention(q, k, v, **kwargs)
    assert torch.equal(sliced, whole)
    for a, b in zip(torch.autograd.grad(sliced.float().sum(), (q, k, v)), grads):
        assert torch.equal(a, b)


def _longnet_model(device):
    cfg = tiny(norm="subln", position="xpos", attention="dilated", segment_lengths=(4, 8, 16),
               dilation_rates=(1, 2, 4), embed_dim=64, heads=4)  # head dim 16
    return make_model(cfg).to(device)


def test_longnet_model_on_cuda_equals_cpu_and_decodes_exactly():
    cpu, gpu = _longnet_model("cpu"), _longnet_model("cuda")
    ids = torch.randint(0, 97, (2, 30))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :4] = 0
    expected = cpu(ids, attention_mask=mask).logits
    got = gpu(ids.cuda(), attention_mask=mask.cuda()).logits.cpu()
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max() <= 1e-5 * max(expected.abs().max().item(), 1.0)
    full = gpu(ids.cuda()).logits
    stepped = decode_step_by_step(gpu, ids.cuda(), prefill=5)
    assert (stepped - full).abs().max() <= 1e-5 * max(full.abs().max().item(), 1.0)
    assert torch.equal(sf.generate(gpu, ids[:, :6].cuda(), 8).cpu(), sf.generate(cpu, ids[:, :6], 8))
