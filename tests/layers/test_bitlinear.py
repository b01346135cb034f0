"""BitNet b1.58's BitLinear: the quantisers against their formulas, straight-through gradients, and models
whose linears are BitLinear in every family (cached decoding and padding stay exact: the quantisers act
per tensor and per token)."""

import pytest
import torch
import torch.nn.functional as F

import scaleformer as sf
from scaleformer.layers.bitlinear import BitLinear, int8_activations, ternary_weights, to_bitlinear
from scaleformer.layers.ffn import FeedForward
from scaleformer.layers.moe import Experts
from scaleformer.layers.norms import RMSNorm
from tests.conftest import assert_close, decode_step_by_step, make_model, tiny


def test_ternary_weights_by_hand():
    weight = torch.tensor([[0.5, -1.5], [0.1, 3.0]])
    codes, scale = ternary_weights(weight)
    assert scale.item() == pytest.approx(1.275)  # mean |W|
    assert codes.tolist() == [[0.0, -1.0], [0.0, 1.0]]  # round(W / 1.275) = 0, -1, 0, 2 -> clamped to 1


def test_int8_activations_by_hand():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    codes, scale = int8_activations(x)
    assert scale[0].item() == pytest.approx(2 / 127) and scale[1].item() == pytest.approx(1e-5 / 127)
    assert codes[0].tolist() == [64.0, -127.0, 32.0]  # 63.5 rounds to even, 31.75 to 32
    assert codes[1].tolist() == [0.0, 0.0, 0.0]  # an all-zero token stays zero


def test_quantisers_stay_in_range_for_any_input():
    torch.manual_seed(0)
    weight, x = torch.randn(64, 48) * 5, torch.randn(3, 7, 48) * 100
    codes, _ = ternary_weights(weight)
    assert set(codes.unique().tolist()) <= {-1.0, 0.0, 1.0}
    codes, scale = int8_activations(x)
    assert codes.min() >= -128 and codes.max() <= 127 and torch.all(codes == codes.round())
    assert_close(codes.abs().amax(-1), torch.full((3, 7), 127.0))  # each token's largest entry uses the full range


def test_bitlinear_forward_and_straight_through_gradients():
    torch.manual_seed(0)
    layer = BitLinear(12, 5).double()
    x = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    normed = RMSNorm(12, eps=1e-6, affine=False)(x)
    x_codes, x_scale = int8_activations(normed.detach())
    w_codes, w_scale = ternary_weights(layer.weight.detach())
    expected = F.linear(x_codes * x_scale, w_codes * w_scale, layer.bias.detach())
    assert_close(out, expected, torch.float64)
    cotangent = torch.randn_like(out)
    out.backward(cotangent)
    # Weights: as if W_q = W, the gradient of a linear map of the quantised inputs.
    assert_close(layer.weight.grad, cotangent.flatten(0, 1).T @ (x_codes * x_scale).flatten(0, 1), torch.float64)
    # Inputs: the norm's gradient for the cotangent (g W_q), as if x_q = x.
    x2 = x.detach().clone().requires_grad_()
    (expected_grad,) = torch.autograd.grad(RMSNorm(12, eps=1e-6, affine=False)(x2), x2, cotangent @ (w_codes * w_scale))
    assert_close(x.grad, expected_grad, torch.float64)


@pytest.mark.parametrize("prefill", [1, 4])
def test_bitnet_decoder_caches_exactly(prefill):
    model = make_model(tiny(linear="bitlinear", position="rope", norm_type="rmsnorm", ffn="glu", activation="swish"))
    assert sum(isinstance(m, BitLinear) for m in model.modules()) == 2 * (4 + 3)
    ids = torch.randint(0, 97, (2, 9))
    assert_close(decode_step_by_step(model, ids, prefill), model(ids).logits)


def test_bitnet_retnet_forms_and_padding():
    torch.manual_seed(0)
    model = sf.build(sf.RetNetConfig(vocab_size=97, embed_dim=32, value_dim=48, heads=2, ffn_dim=48, layers=2,
                                     chunk_size=4, linear="bitlinear")).eval()
    ids = torch.randint(0, 97, (2, 11))
    logits = {form: model(ids, form=form).logits for form in ("parallel", "chunkwise", "recurrent")}
    assert_close(logits["chunkwise"], logits["parallel"])
    assert_close(logits["recurrent"], logits["parallel"])
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :4] = 0
    padded = model(ids, attention_mask=mask).logits
    assert_close(padded[1, 4:], model(ids[1:, 4:]).logits[0])


def test_every_family_and_what_stays_full_precision():
    for arch in ("encoder", "encoder_decoder"):
        model = sf.build(tiny(arch, linear="bitlinear"))
        plain = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
        assert plain == [] and any(isinstance(m, BitLinear) for m in model.modules())
    gated = sf.build(sf.load_preset("gret-tiny", linear="bitlinear"))
    kept = [n for n, m in gated.named_modules() if type(m) is torch.nn.Linear]
    assert kept and all(n.endswith("decay_proj") for n in kept)  # the decay gate chooses, it does not project
    # The swap keeps the parameters: the same count as the full-precision model.
    assert sum(p.numel() for p in sf.build(tiny(linear="bitlinear")).parameters()) == \
        sum(p.numel() for p in sf.build(tiny()).parameters())


def test_config_errors_preset_and_round_trip(tmp_path):
    with pytest.raises(sf.ConfigError, match="unknown option|must be one of|linear"):
        tiny(linear="binary")
    model = sf.build(sf.load_preset("bitnet-tiny"))
    ids = torch.randint(0, 512, (1, 6))
    sf.save(model, tmp_path / "m")
    assert torch.equal(sf.load(tmp_path / "m")(ids).logits, model(ids).logits)


@pytest.mark.parametrize("kind, inner_norm", [("glu", None), ("mlp", "rmsnorm")])
def test_bitnet_experts_compute_what_dense_bitlinear_ffns_compute(kind, inner_norm):
    """Each expert of a BitNet MoE layer = a dense FFN of BitLinears holding that expert's weights: its own
    ternary scale per matrix, the same input norm and 8-bit activations."""
    torch.manual_seed(0)
    experts = Experts(3, 16, 24, kind=kind, activation="swish", inner_norm=inner_norm, norm_eps=1e-6,
                      bitlinear=True).double()
    with torch.no_grad():
        experts.fc1[1].mul_(5.0)  # very different magnitudes: one scale per expert matters
        if experts.norm_weight is not None:
            experts.norm_weight.add_(0.1 * torch.randn_like(experts.norm_weight))
    buffer = torch.randn(3, 5, 16, dtype=torch.float64)
    out = experts(buffer)
    for e in range(3):
        dense = FeedForward(16, 24, kind=kind, activation="swish",
                            inner_norm=RMSNorm(24, eps=1e-6) if inner_norm else None).double()
        with torch.no_grad():
            dense.fc1.weight.copy_(experts.fc1[e].T)
            dense.fc1.bias.copy_(experts.fc1_bias[e, 0])
            dense.fc2.weight.copy_(experts.fc2[e].T)
            dense.fc2.bias.copy_(experts.fc2_bias[e, 0])
            if kind == "glu":
                dense.gate.weight.copy_(experts.gate[e].T)
                dense.gate.bias.copy_(experts.gate_bias[e, 0])
            if inner_norm:
                dense.inner_norm.weight.copy_(experts.norm_weight[e, 0])
        assert_close(out[e], to_bitlinear(dense)(buffer[e]), torch.float64)
    out.sum().backward()  # straight through to every expert's latent weights
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in (experts.fc1, experts.fc2))


def test_bitnet_moe_models_train_and_cache_exactly():
    model = make_model(tiny(linear="bitlinear", position="rope", moe=sf.MoEConfig(experts=4, top_k=2)))
    ids = torch.randint(0, 97, (2, 9))
    assert_close(decode_step_by_step(model, ids, 4), model(ids).logits)
    retnet = sf.build(sf.RetNetConfig(vocab_size=97, embed_dim=32, value_dim=48, heads=2, ffn_dim=48, layers=2,
                                      linear="bitlinear", moe=sf.MoEConfig(experts=2)))
    assert all(m.experts.bitlinear for m in retnet.modules() if hasattr(m, "experts"))
