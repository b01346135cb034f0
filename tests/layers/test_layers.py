import pytest
import torch
import torch.nn.functional as F

import scaleformer as sf
from scaleformer.cache import KVCache
from scaleformer.layers import Context, FeedForward, Multiway, Projections, RMSNorm, SoftmaxAttention, make_norm
from tests.conftest import assert_close

DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_formula(dtype):
    norm = RMSNorm(6, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(6))
    x = torch.randn(3, 6, dtype=dtype) * 5
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert_close(norm(x), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_rmsnorm_without_gradients_is_torchs_op_bit_for_bit(dtype, affine):
    """Inference takes a shorter spelling of the formula than F.rms_norm (fewer dispatcher calls per decoded
    token); it must give the very same numbers, every shape, including one-token rows."""
    norm = RMSNorm(64, eps=1e-5, affine=affine).to(dtype)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(torch.randn(64))
    generator = torch.Generator().manual_seed(0)
    for shape in [(1, 1, 64), (3, 7, 64), (2, 4, 1, 64)]:
        x = torch.randn(shape, generator=generator, dtype=dtype) * 3
        with torch.no_grad():
            got = norm(x)
        assert torch.equal(got, F.rms_norm(x, (64,), norm.weight, 1e-5))
        # with gradients, torch's op itself
        assert torch.equal(norm(x.requires_grad_()).detach(), got)


def _context(batch, length, *, past=0, causal=True, token_mask=None):
    positions = torch.arange(past, past + length).expand(batch, -1)
    key_positions = torch.arange(past + length).expand(batch, -1)
    key_mask = None if token_mask is None else torch.cat([torch.ones(batch, past, dtype=torch.bool), token_mask], 1)
    return Context(positions=positions, key_positions=key_positions, causal=causal, token_mask=token_mask,
                   key_mask=key_mask, past=past)


def _attention_pair(dtype, **kwargs):
    projections = Projections(embed_dim=16, heads=4, **kwargs)
    torch.manual_seed(0)
    fast = SoftmaxAttention(projections, impl="sdpa").to(dtype)
    torch.manual_seed(0)
    ref = SoftmaxAttention(projections, impl="reference").to(dtype)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_layer_sdpa_matches_reference_with_mask_and_cache(dtype):
    fast, ref = _attention_pair(dtype, inner_norm=lambda: make_norm("layernorm", 16, 1e-5))
    x = torch.randn(2, 5, 16, dtype=dtype, requires_grad=True)
    token_mask = torch.ones(2, 5, dtype=torch.bool)
    token_mask[1, 0] = False  # row 1 starts with padding: its keys see only themselves
    out_fast, out_ref = fast(x, _context(2, 5, token_mask=token_mask)), ref(x, _context(2, 5, token_mask=token_mask))
    assert_close(out_fast, out_ref, dtype)
    (g_fast,), (g_ref,) = torch.autograd.grad(out_fast.sum(), (x,)), torch.autograd.grad(out_ref.sum(), (x,))
    assert_close(g_fast, g_ref, dtype)
    # Cached: first 3 tokens, then 2, equals the full causal call.
    cache = KVCache()
    first = fast(x[:, :3], _context(2, 3), cache)
    second = fast(x[:, 3:], _context(2, 2, past=3), cache)
    assert_close(torch.cat([first, second], 1), ref(x, _context(2, 5)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_layer_is_the_formula(dtype):
    layer = SoftmaxAttention(Projections(embed_dim=8, heads=2)).to(dtype)
    x = torch.randn(1, 3, 8, dtype=dtype)
    q, k, v = layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)
    heads = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        weights = torch.softmax(q[0, :, sl] @ k[0, :, sl].T / 2.0, dim=-1)
        heads.append(weights @ v[0, :, sl])
    expected = layer.out_proj(torch.cat(heads, -1))[None]
    assert_close(layer(x, _context(1, 3, causal=False)), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,activation", [("mlp", "gelu"), ("mlp", "relu"), ("glu", "swish")])
def test_feedforward_formula(kind, activation, dtype):
    ffn = FeedForward(8, 12, kind=kind, activation=activation).to(dtype)
    x = torch.randn(2, 3, 8, dtype=dtype)
    act = {"gelu": F.gelu, "relu": F.relu, "swish": lambda t: t * torch.sigmoid(t)}[activation]
    hidden = act(x @ ffn.fc1.weight.T + ffn.fc1.bias)
    if kind == "glu":
        hidden = hidden * (x @ ffn.gate.weight.T + ffn.gate.bias)
    expected = hidden @ ffn.fc2.weight.T + ffn.fc2.bias
    assert_close(ffn(x), expected, dtype)


def test_multiway_routes_tokens_and_gradients():
    torch.manual_seed(0)
    mw = Multiway(lambda: FeedForward(8, 16), ways=2)
    x = torch.randn(2, 5, 8)
    way_ids = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]])
    out = mw(x, way_ids)
    assert_close(out[0, :3], mw.ways[0](x[0, :3]))
    assert_close(out[0, 3:], mw.ways[1](x[0, 3:]))
    assert_close(out[1, 1:], mw.ways[1](x[1, 1:]))
    assert not torch.allclose(mw.ways[0](x[0, 3:]), out[0, 3:])  # the copies really differ
    out[:, :, :].pow(2).sum().backward()
    for way in mw.ways:
        assert way.fc1.weight.grad is not None and way.fc1.weight.grad.abs().sum() > 0
    # Only way-0 tokens: way 1 gets exactly zero gradient.
    mw.zero_grad()
    mw(x, torch.zeros(2, 5, dtype=torch.long)).sum().backward()
    assert mw.ways[1].fc1.weight.grad is None or mw.ways[1].fc1.weight.grad.abs().sum() == 0


@pytest.mark.parametrize("norm", ["pre", "post", "deepnorm", "subln"])
def test_block_residual_wiring(norm):
    cfg = sf.TransformerConfig(embed_dim=8, heads=2, ffn_dim=16, layers=1, norm=norm)
    block = sf.model_config(cfg).build_layers()[0].double()
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    ctx = _context(2, 4)
    attn = lambda h: block.mixer(h, ctx)
    n1, n2, ffn = block.mixer_norm, block.ffn_norm, block.ffn
    if norm in ("pre", "subln"):
        h = x + attn(n1(x))
        expected = h + ffn(n2(h))
    else:
        a = block.alpha
        assert a == (pytest.approx(2**0.25) if norm == "deepnorm" else 1.0)
        h = n1(a * x + attn(x))
        expected = n2(a * h + ffn(h))
    assert_close(block(x, ctx), expected, torch.float64)
    assert (block.mixer.inner_norm is not None) == (norm == "subln")
    assert (ffn.inner_norm is not None) == (norm == "subln")
    if norm == "subln":
        assert ffn.inner_norm.normalized_shape == (16,)


@pytest.mark.parametrize("make, message", [
    (lambda: __import__("scaleformer.layers.attention", fromlist=["x"]).SoftmaxAttention(
        __import__("scaleformer.layers.attention", fromlist=["x"]).Projections(embed_dim=8, heads=2), impl="sdap"),
     "unknown attention impl 'sdap'.*did you mean `sdpa`"),
    (lambda: __import__("scaleformer.layers.ffn", fromlist=["x"]).FeedForward(8, 16, kind="gllu"),
     "unknown FFN kind 'gllu'.*did you mean `glu`"),
    (lambda: __import__("scaleformer.layers.ffn", fromlist=["x"]).FeedForward(8, 16, activation="swsh"),
     "unknown activation 'swsh'.*did you mean `swish`"),
    (lambda: __import__("scaleformer.layers.moe", fromlist=["x"]).Experts(2, 8, 16, kind="gl"),
     "unknown FFN kind 'gl'"),
    (lambda: __import__("scaleformer.layers.moe", fromlist=["x"]).Experts(2, 8, 16, inner_norm="layernrom"),
     "unknown expert inner norm 'layernrom'.*did you mean `layernorm`"),
    (lambda: __import__("scaleformer.layers.positions", fromlist=["x"]).Rotary(8, spacing="linspase"),
     "unknown rotary spacing.*did you mean `linspace`"),
    (lambda: __import__("scaleformer").Retention(decay="papr"), r"Retention.decay must be one of .*'papr'; did you mean `paper`"),
    (lambda: __import__("scaleformer").Retention(normalizer="torchscal"),
     r"Retention.normalizer must be one of .*did you mean `torchscale`"),
    (lambda: __import__("scaleformer.layers.norms", fromlist=["x"]).make_norm("rmsnrom", 8, 1e-5),
     "unknown norm_type 'rmsnrom'.*did you mean `rmsnorm`"),
], ids=["attention-impl", "ffn-kind", "activation", "experts-kind", "experts-norm", "rotary-spacing", "decay",
        "normalizer", "norm-type"])
def test_layer_constructors_reject_unknown_modes_with_a_suggestion(make, message):
    """Public layers are used without a config: a typo must not silently select another mode."""
    with pytest.raises(sf.ConfigError, match=message):
        make()


def test_make_router_refuses_an_unknown_router_name():
    from types import SimpleNamespace

    from scaleformer.layers.moe import make_router

    bogus = SimpleNamespace(router="xmoe_torchscal", experts=2, router_dim=4)  # a config that bypassed checks
    with pytest.raises(sf.ConfigError, match="did you mean `xmoe_torchscale`"):
        make_router(bogus, 8)


def test_qk_norm_and_the_output_gate_are_their_formulas():
    """Attention(qk_norm=True, output_gate=True) as Qwen3-Next writes it: RMSNorm over each head's queries and
    keys (one weight vector shared by the heads), softmax attention, the output times sigmoid(W_G x)."""
    from scaleformer.layers.attention import GatedSoftmaxAttention

    torch.manual_seed(0)
    layer = GatedSoftmaxAttention(Projections(embed_dim=8, heads=2, qk_norm_eps=1e-6)).double()
    with torch.no_grad():
        layer.q_norm.weight.uniform_(0.5, 1.5)
        layer.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 8, dtype=torch.float64)
    q, k, v = layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)
    rms = lambda z, w: z / torch.sqrt((z * z).mean(-1, keepdim=True) + 1e-6) * w  # noqa: E731
    heads = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        qh, kh = rms(q[0, :, sl], layer.q_norm.weight), rms(k[0, :, sl], layer.k_norm.weight)
        heads.append(torch.softmax(qh @ kh.T / 2.0, dim=-1) @ v[0, :, sl])
    expected = layer.out_proj(torch.cat(heads, -1)[None] * torch.sigmoid(layer.gate_proj(x)))
    assert_close(layer(x, _context(1, 3, causal=False)), expected, torch.float64)


def test_attention_sinks_and_the_output_gate_together_are_their_formula():
    """Attention(sinks=True, output_gate=True) with grouped keys: per head, Σ_j exp(s_ij) v_j over the causal
    keys divided by exp(sink_h) + Σ_j exp(s_ij) (gpt-oss), times sigmoid(W_G x), then W_O."""
    from scaleformer.layers.attention import GatedSoftmaxAttention

    torch.manual_seed(0)
    layer = GatedSoftmaxAttention(Projections(embed_dim=8, heads=2, kv_heads=1), sinks=True).double()
    with torch.no_grad():
        layer.sinks.copy_(torch.tensor([1.5, -0.5]))
    x = torch.randn(1, 4, 8, dtype=torch.float64)
    q, k, v = layer.q_proj(x)[0], layer.k_proj(x)[0], layer.v_proj(x)[0]
    heads = []
    for h in range(2):
        weights = torch.exp(q[:, 4 * h:4 * h + 4] @ k.T / 2.0).tril()  # key/value head 0 serves both
        heads.append(weights @ v / (weights.sum(-1, keepdim=True) + torch.exp(layer.sinks[h])))
    expected = layer.out_proj(torch.cat(heads, -1)[None] * torch.sigmoid(layer.gate_proj(x)))
    assert_close(layer(x, _context(1, 4)), expected, torch.float64)
