"""The block-sparse Triton attention (dilated and S2) against the dense references, on the CPU under Triton's
interpreter: part of the `triton` tier (`TRITON_INTERPRET=1 python -m pytest -q -m triton`). Small shapes:
the interpreter runs one program at a time. Gradients are compared with float64 autograd through the
dense definitions."""

import pytest
import torch

from scaleformer.ops.dilated import dilated_attention, dilated_attention_reference
from scaleformer.ops.s2 import S2Layout, s2_attention, s2_attention_reference

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("triton_interpreter")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(b, h, t, d, seed=0, kv_heads=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, kv_heads or h, t, d, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v


def _mask(b, t):
    """Padding at the start of row 0 and holes inside row 1; the other rows full."""
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, :5] = False
    if b > 1:
        mask[1, t // 3] = mask[1, t // 2] = mask[1, -1] = False
    return mask


def _compare(op, reference, q, k, v, dtype, atol, grad_atol, mask=None):
    """Outputs and the gradients of q, k, v: op in ``dtype`` against the reference in float64."""
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(q.shape, generator=g, dtype=torch.float64)
    if mask is not None:
        grad = grad * mask[:, None, :, None]
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    expected = reference(*leaves)
    expected_grads = torch.autograd.grad(expected, leaves, grad)
    leaves = [x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v)]
    out = op(*leaves)
    assert out.dtype == dtype and out.shape == q.shape
    grads = torch.autograd.grad(out, leaves, grad.to(DEVICE, dtype))
    error = (out.double().cpu() - expected).abs().max().item()
    assert error <= atol, f"output off by {error}"
    for name, got, want in zip("qkv", grads, expected_grads):
        error = (got.double().cpu() - want).abs().max().item()
        assert error <= grad_atol, f"d{name} off by {error}"
    if mask is not None:  # padding outputs nothing and passes no gradient
        assert out.detach().cpu()[~mask[:, None, :, None].expand_as(out)].abs().max() == 0


DILATED = {
    "longnet-like": ((8, 16, 32), (1, 2, 4)),
    "irregular": ((12, 20, 7), (1, 3, 2)),  # segments not dividing T, rates not dividing segments
    "longer-than-T": ((16, 128), (1, 8)),
}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("patterns", list(DILATED), ids=list(DILATED))
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_dilated_equals_the_definition(causal, patterns, padded):
    segments, rates = DILATED[patterns]
    q, k, v = _inputs(2, 4, 45, 24)  # T odd, D not a power of two; 4 heads see every offset of rate 2, 4
    mask = _mask(2, 45) if padded else None
    args = dict(segment_lengths=segments, dilation_rates=rates, causal=causal)
    _compare(lambda q, k, v: dilated_attention(q, k, v, key_mask=None if mask is None else mask.to(DEVICE),
                                               kernel="triton", **args),
             lambda q, k, v: dilated_attention_reference(q, k, v, key_mask=mask, **args),
             q, k, v, torch.float32, 2e-6, 5e-6, mask)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_dilated_with_torchscales_grouped_head_offsets(causal):
    """Head h keeping offset ⌊h / ⌈H/r⌉⌋ (TorchScale's LongNet) instead of h mod r, 6 heads, with padding."""
    q, k, v = _inputs(2, 6, 45, 24)
    mask = _mask(2, 45)
    args = dict(segment_lengths=(8, 16, 32), dilation_rates=(1, 2, 4), causal=causal, head_offsets="grouped")
    _compare(lambda q, k, v: dilated_attention(q, k, v, key_mask=mask.to(DEVICE), kernel="triton", **args),
             lambda q, k, v: dilated_attention_reference(q, k, v, key_mask=mask, **args),
             q, k, v, torch.float32, 2e-6, 5e-6, mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_dilated_half_precision_against_float64(dtype):
    """Half inputs, float32 statistics: within the input rounding of the float64 definition."""
    q, k, v = _inputs(1, 4, 40, 32)
    args = dict(segment_lengths=(8, 16, 32), dilation_rates=(1, 2, 4), causal=True)
    atol = 4e-2 if dtype == torch.bfloat16 else 6e-3
    _compare(lambda q, k, v: dilated_attention(q, k, v, kernel="triton", **args),
             lambda q, k, v: dilated_attention_reference(q, k, v, **args), q, k, v, dtype, atol, 3 * atol)


def test_dilated_tiles_and_kernel_choices_agree():
    """A larger tile (32, the GPU's kind of shape) gives the same numbers as 16 and as the fused path."""
    from scaleformer.ops.block_sparse_triton import block_sparse_attention, dilated_passes

    q, k, v = (x.float().to(DEVICE) for x in _inputs(1, 4, 70, 16))
    patterns = ((16, 1), (32, 2), (64, 4))
    fused = dilated_attention(q.cpu(), k.cpu(), v.cpu(), segment_lengths=(16, 32, 64), dilation_rates=(1, 2, 4),
                              causal=True)
    for tile in (16, 32):
        passes = dilated_passes(70, patterns, True, tile, q.device)
        out = block_sparse_attention(q, k, v, passes, causal=True, tile=tile)
        assert torch.allclose(out.cpu(), fused, atol=2e-6), (out.cpu() - fused).abs().max()


S2 = {
    "rule": S2Layout(block=16, local_blocks=2, vert_stride=2),
    "fine blocks": S2Layout(block=4, local_blocks=3, vert_stride=3),  # blocks smaller than a tile
    "odd blocks": S2Layout(block=12, local_blocks=2, vert_stride=2),  # neither divides the other
    "coarse blocks": S2Layout(block=32, local_blocks=1, vert_stride=2),  # a block spans two tiles
    "homo, dense head": S2Layout(block=8, local_blocks=2, vert_stride=4, homo_head=True, dense_heads=1),
    "offset": S2Layout(block=8, local_blocks=1, vert_stride=3, head_offset=2),
}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("layout", list(S2), ids=list(S2))
def test_s2_equals_the_dense_mask(causal, layout):
    q, k, v = _inputs(2, 4, 75, 24)
    mask = _mask(2, 75)
    chosen = S2[layout]
    _compare(lambda q, k, v: s2_attention(q, k, v, chosen, causal=causal, key_mask=mask.to(DEVICE), kernel="triton"),
             lambda q, k, v: _s2_padded_reference(q, k, v, chosen, causal, mask), q, k, v, torch.float32, 2e-6,
             5e-6, mask)


def _s2_padded_reference(q, k, v, layout, causal, mask):
    """The S2 definition over real tokens: positions count real tokens, padding neither reads nor is read."""
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    visible = (mask[:, None, :] & mask[:, :, None])[:, None]
    out = s2_attention_reference(q, k, v, layout, causal=causal, q_positions=positions, k_positions=positions,
                                 mask=visible)
    return out * mask[:, None, :, None]


def test_s2_custom_layouts_and_grouped_heads():
    """A user block mask, a user rule, and 4 query heads over 2 key/value heads."""
    q, k, v = _inputs(1, 4, 64, 16, kv_heads=2)
    g = torch.Generator().manual_seed(3)
    table = torch.rand(4, 8, 8, generator=g) < 0.3
    for custom in (table, lambda i, j, h: (i + j + h) % 3 == 0):
        layout = S2Layout(block=8, custom=custom)
        for causal in (True, False):
            _compare(lambda q, k, v: s2_attention(q, k, v, layout, causal=causal, kernel="triton"),
                     lambda q, k, v: s2_attention_reference(q, k, v, layout, causal=causal),
                     q, k, v, torch.float32, 2e-6, 5e-6)


def test_dense_pass_equals_sdpa_and_lists_skip_tiles():
    """The single dense pass is plain attention; a causal dilated pattern's lists skip tiles of other
    segments and tiles wholly in the future."""
    from scaleformer.ops.block_sparse_triton import block_sparse_attention, dense_pass, dilated_passes

    q, k, v = (x.float().to(DEVICE) for x in _inputs(2, 2, 50, 20))
    for causal in (True, False):
        out = block_sparse_attention(q, k, v, (dense_pass(50, causal, 16, q.device),), causal=causal)
        expected = torch.nn.functional.scaled_dot_product_attention(q.cpu().double(), k.cpu().double(),
                                                                    v.cpu().double(), is_causal=causal)
        assert torch.allclose(out.double().cpu(), expected, atol=2e-6)
    (only,) = dilated_passes(256, ((64, 1),), True, 16, torch.device("cpu"))
    index, count = only.queries
    assert count.tolist() == [[1, 2, 3, 4] * 4]  # 4 segments of 4 tiles, causal within each
    assert index[0, 5, :2].tolist() == [4, 5]
    (strided,) = dilated_passes(256, ((256, 4),), False, 16, torch.device("cpu"))
    assert strided.rows == 64 and strided.queries[1].tolist() == [[4] * 4]  # T/r rows: 16× fewer scores


def test_bad_inputs_get_one_clear_line():
    from scaleformer.ops.block_sparse_triton import block_sparse_attention, dense_pass

    q = torch.randn(1, 2, 16, 8, device=DEVICE)
    passes = (dense_pass(16, True, 16, q.device),)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        block_sparse_attention(q.double(), q.double(), q.double(), passes, causal=True)
    with pytest.raises(ValueError, match="one shape"):
        block_sparse_attention(q, q[:, :1], q, passes, causal=True)
    with pytest.raises(ValueError, match="power of two"):
        block_sparse_attention(q, q, q, passes, causal=True, tile=24)


def test_models_train_through_the_kernel():
    """Dilated and S2 layers (grouped heads, a dense head) with impl="triton": logits and every weight's
    gradient equal the sdpa path's, with padding and with packed documents."""
    import scaleformer as sf

    for mixer in (sf.DilatedAttention(heads=4, segment_lengths=(8, 16), dilation_rates=(1, 2)),
                  sf.S2Attention(heads=4, kv_heads=2, block=8, local_blocks=1, vert_stride=2, dense_heads=1)):
        models = []
        for impl in ("sdpa", "triton"):
            config = sf.ModelConfig(vocab_size=50, embed_dim=32, position=sf.RoPE(),
                                    layers=(sf.LayerConfig(mixer=mixer.replace(impl=impl)),) * 2)
            torch.manual_seed(0)
            models.append(sf.build(config).to(DEVICE))
        tokens = torch.randint(0, 50, (2, 37), generator=torch.Generator().manual_seed(0)).to(DEVICE)
        documents = (torch.arange(37, device=DEVICE) >= 20).long().expand(2, 37)
        for extra in (dict(attention_mask=_mask(2, 37).to(DEVICE)), dict(document_ids=documents)):
            results = []
            for model in models:
                model.zero_grad()
                logits = model(tokens, **extra).logits
                logits.square().mean().backward()
                results.append((logits, {n: p.grad.clone() for n, p in model.named_parameters()}))
            (a, grads_a), (b, grads_b) = results
            assert torch.allclose(a, b, atol=2e-5, rtol=2e-5), (a - b).abs().max()
            for name in grads_a:
                assert torch.allclose(grads_a[name], grads_b[name], atol=5e-5, rtol=5e-4), name


def test_triton_impl_is_for_dilated_and_s2_layers():
    import scaleformer as sf

    config = sf.ModelConfig(vocab_size=50, embed_dim=32, layers=(sf.LayerConfig(mixer=sf.DilatedAttention(
        heads=4, segment_lengths=(8,), dilation_rates=(1,), impl="triton")),))
    sf.build(config)  # accepted
    from scaleformer.layers.attention import Projections, SoftmaxAttention
    with pytest.raises(ValueError, match="for dilated and S2"):
        SoftmaxAttention(Projections(embed_dim=32, heads=4), impl="triton")


def test_the_sparse_benchmark_times_both_kernels(tmp_path):
    import json

    from scaleformer.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "sparse", "--lengths", "48", "--segments", "16", "32", "--rates", "1", "2", "--block", "16",
                 "--local-blocks", "1", "--vert-stride", "2", "--heads", "2", "--head-dim", "16", "--repeats", "1",
                 "--dtype", "float32", "--device", DEVICE, "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    row = figures["attention"][0]
    for key in ("dense", "dilated_auto", "dilated_triton", "s2_auto", "s2_triton"):
        assert row[f"{key}_s"] > 0 and row[f"{key}_peak_mb"] > 0
    assert row["dense_over_dilated_triton"] == row["dense_s"] / row["dilated_triton_s"]
    assert figures["agreement"]["dilated"] < 1e-5 and figures["agreement"]["s2"] < 1e-5
