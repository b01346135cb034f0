"""RetNet: the three forms agree (logits and gradients), cached decoding, padding, presets."""

import math

import pytest
import torch

import scaleformer as sf
from scaleformer.layers.retention import MultiScaleRetention, retention_log_decays
from scaleformer.ops.retention import retention_reference
from tests.conftest import assert_close, decode_step_by_step

FORMS = ["parallel", "chunkwise", "recurrent"]
# RetNet, and gated retention (RetNet-3 / YOCO's self-decoder: decays per head and token, no row normalizer):
# every exactness test below holds for both.
VARIANTS = {"retnet": {}, "gated": dict(decay="gated", normalizer="none")}


def retnet(dtype=torch.float32, seed=0, weight_scale=1.0, **overrides):
    base = dict(vocab_size=97, embed_dim=32, value_dim=48, layers=2, heads=4, ffn_dim=40, chunk_size=4)
    base.update(overrides)
    torch.manual_seed(seed)
    model = sf.build(sf.RetNetConfig(**base)).to(dtype).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
            if any(p in name for p in ("q_proj", "k_proj", "v_proj", "g_proj")):
                param.mul_(weight_scale)
    return model


def _forms_agree(model, dtype, ids, **kwargs):
    outputs, grads = {}, {}
    for form in FORMS:
        model.zero_grad()
        logits = model(ids, form=form, **kwargs).logits
        torch.manual_seed(1)
        (logits * torch.randn_like(logits)).sum().backward()
        outputs[form] = logits.detach()
        grads[form] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for form in ("chunkwise", "recurrent"):
        assert_close(outputs[form], outputs["parallel"], dtype)
        for name, grad in grads[form].items():
            assert_close(grad, grads["parallel"][name], dtype)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("length", [1, 9, 16])
def test_forms_agree_on_logits_and_gradients(length, dtype, variant):
    model = retnet(dtype, **VARIANTS[variant])
    _forms_agree(model, dtype, torch.randint(0, 97, (2, length)))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forms_agree_with_padding_and_large_activations(dtype, variant):
    model = retnet(dtype, weight_scale=10.0, **VARIANTS[variant])
    ids = torch.randint(0, 97, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, 8:] = 0  # right padding
    _forms_agree(model, dtype, ids, attention_mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forms_agree_from_an_initial_state(dtype):
    """Continue from a cached state (every layer's initial state) in each form: logits and gradients."""
    model = retnet(dtype, decay="paper", norm="deepnorm", weight_scale=3.0)
    ids = torch.randint(0, 97, (2, 15))
    full = model(ids, form="parallel").logits.detach()
    results = {}
    for form in FORMS:
        prefix = model(ids[:, :6], use_cache=True, form="chunkwise")  # the states carry gradients too
        model.zero_grad()
        rest = model(ids[:, 6:], cache=prefix.cache, form=form).logits
        torch.manual_seed(1)
        (rest * torch.randn_like(rest)).sum().backward()
        results[form] = rest.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
        assert_close(results[form][0], full[:, 6:], dtype)
    for form in ("chunkwise", "recurrent"):
        for name, grad in results[form][1].items():
            assert_close(grad, results["parallel"][1][name], dtype)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("prefill", [1, 5, 8])
def test_prefill_then_recurrent_steps_equal_the_full_forward(prefill, variant):
    model = retnet(**VARIANTS[variant])
    ids = torch.randint(0, 97, (2, 13))
    assert_close(decode_step_by_step(model, ids, prefill), model(ids).logits)


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_batch_equals_unpadded_rows_through_prefill_and_decode(variant):
    model = retnet(**VARIANTS[variant])
    rows = [torch.randint(0, 97, (n,)) for n in (9, 4, 6)]
    ids, mask = torch.zeros(3, 9, dtype=torch.long), torch.zeros(3, 9, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, 9 - len(row):], mask[i, 9 - len(row):] = row, 1
    steps = torch.randint(0, 97, (3, 3))
    out = model(ids, attention_mask=mask, use_cache=True)
    assert not torch.isnan(out.logits).any()
    decoded = [model(steps[:, t:t + 1], cache=out.cache).logits for t in range(3)]
    for i, row in enumerate(rows):
        alone = model(torch.cat([row, steps[i]])[None]).logits[0]
        assert_close(out.logits[i, 9 - len(row):], alone[:len(row)])
        assert_close(torch.cat(decoded, 1)[i], alone[len(row):])


def test_generate_and_beam_reorder():
    model = retnet()
    prompt = torch.randint(0, 97, (2, 5))
    greedy = sf.generate(model, prompt, 6)
    ids = prompt
    for _ in range(6):
        ids = torch.cat([ids, model(ids, form="parallel").logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, ids)
    out = model(prompt, use_cache=True)
    out.cache.reorder(torch.tensor([1, 1, 0]))
    nxt = torch.randint(0, 97, (3, 1))
    step = model(nxt, cache=out.cache).logits
    assert_close(step, model(torch.cat([prompt[[1, 1, 0]], nxt], 1)).logits[:, -1:])


def test_decoding_memory_is_constant_per_layer():
    model = retnet()
    out = model(torch.randint(0, 97, (2, 3)), use_cache=True)
    size = out.cache.nbytes()
    for _ in range(40):
        out = model(torch.randint(0, 97, (2, 1)), cache=out.cache)
    assert out.cache.nbytes() == size == 2 * (2 * 4 * 8 * (12 + 1) * 4)  # layers · B·H·K·(V+1)·fp32
    assert out.cache.length == 43


def test_decays_and_layer_formula():
    assert torch.allclose(retention_log_decays(4).exp(), 1 - 2.0 ** -torch.tensor([5.0, 6, 7, 8], dtype=torch.float64))
    paper = 1 - torch.exp(torch.linspace(math.log(1 / 32), math.log(1 / 512), 3, dtype=torch.float64))
    assert torch.allclose(retention_log_decays(3, "paper").exp(), paper)
    torch.manual_seed(0)
    layer = MultiScaleRetention(16, sf.Retention(heads=2, value_dim=24)).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    pos = torch.arange(5).expand(2, 5)
    out, _ = layer.retain(x, positions=pos, form="chunkwise", chunk_size=2)
    # By hand: rotate q, k; scale k; reference retention on v and on 1; divide by sqrt(row sum² + 1); head RMSNorm.
    q = layer.rotary(layer._split(layer.q_proj(x)), pos, is_query=True)
    k = layer.rotary(layer._split(layer.k_proj(x)), pos, is_query=False) / math.sqrt(8)
    v = layer._split(layer.v_proj(x))
    num, _ = retention_reference(q, k, v, log_decay=retention_log_decays(2))
    den, _ = retention_reference(q, k, torch.ones_like(v[..., :1]), log_decay=retention_log_decays(2))
    y = num / torch.sqrt(den**2 + 1)
    y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)
    expected = layer.out_proj(torch.nn.functional.silu(layer.g_proj(x)) * y.transpose(1, 2).flatten(2))
    assert_close(out, expected, torch.float64)
    assert all(p.bias is None for p in (layer.q_proj, layer.k_proj, layer.v_proj, layer.g_proj, layer.out_proj))


def test_init_gains_follow_torchscale():
    torch.manual_seed(0)
    layer = MultiScaleRetention(256, sf.Retention(heads=1, value_dim=432))
    for proj, gain in ((layer.q_proj, 2**-2.5), (layer.g_proj, 2**-2.5), (layer.out_proj, 2**-1)):
        fan_in, fan_out = proj.weight.shape[1], proj.weight.shape[0]
        bound = gain * math.sqrt(6 / (fan_in + fan_out))
        assert proj.weight.abs().max() <= bound
        assert proj.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    deep = sf.build(sf.RetNetConfig(embed_dim=32, value_dim=48, heads=2, ffn_dim=40, layers=3, norm="deepnorm"))
    torch.manual_seed(0)
    torch.manual_seed(0)
    beta = (8 * 3) ** -0.25
    assert deep.decoder.blocks[0].alpha == pytest.approx((2 * 3) ** 0.25) and deep.decoder.blocks[0].mixer.gain == pytest.approx(beta)


def test_deepnorm_scales_value_output_and_ffn_only():
    kwargs = dict(vocab_size=50, embed_dim=32, value_dim=48, heads=2, ffn_dim=40, layers=3)
    torch.manual_seed(0)
    pre = dict(sf.build(sf.RetNetConfig(**kwargs)).named_parameters())
    torch.manual_seed(0)
    deep = dict(sf.build(sf.RetNetConfig(norm="deepnorm", **kwargs)).named_parameters())
    beta = 24 ** -0.25
    for name, weight in deep.items():
        scaled = any(s in name for s in ("v_proj", "out_proj", "fc1", "fc2", "gate"))
        unscaled = any(s in name for s in ("q_proj", "k_proj", "g_proj"))
        if scaled or unscaled:
            torch.testing.assert_close(weight, pre[name] * (beta if scaled else 1.0), rtol=1e-6, atol=0)


def test_presets_run_and_have_torchscale_sizes():
    assert {"retnet-tiny", "retnet-base", "retnet-medium", "retnet-xl", "retnet-3b", "retnet-7b", "retnet-13b",
            "retnet-65b"} <= set(sf.list_presets())
    model = sf.build(sf.retnet()).eval()  # the default config runs (TorchScale's does not)
    assert model(torch.randint(0, 64000, (1, 5))).logits.shape == (1, 5, 64000)
    expected = {"retnet-medium": (1024, 16, 4), "retnet-xl": (2048, 24, 8), "retnet-7b": (4096, 32, 16),
                "retnet-65b": (8192, 64, 32)}
    for name, (d, layers, heads) in expected.items():
        cfg = sf.load_preset(name)
        mixer = cfg.layers[0].mixer
        assert (cfg.embed_dim, len(cfg.layers), mixer.heads, cfg.embed_dim // mixer.heads) == (d, layers, heads, 256)
    with torch.device("meta"):
        params = sum(p.numel() for p in sf.build(sf.load_preset("retnet-7b")).parameters())
    assert 6.0e9 < params < 7.5e9


def test_config_errors_and_round_trip():
    with pytest.raises(sf.ConfigError, match=r"heads \(3\) must divide value_dim \(1280\)"):
        sf.retnet(embed_dim=768, value_dim=1280, heads=3)
    with pytest.raises(sf.ConfigError, match=r"heads \(3\) must divide value_dim \(1280\)"):  # an old flat config
        sf.RetNetConfig(embed_dim=768, value_dim=1280, heads=3)
    with pytest.raises(sf.ConfigError, match="did you mean `chunk_size`"):
        sf.load_preset("retnet-tiny", chunksize=8)
    cfg = sf.load_preset("retnet-tiny", decay="paper")
    assert sf.config_from_dict(cfg.to_dict()) == cfg


def test_save_load_identical_logits(tmp_path):
    model = retnet()
    sf.save(model, tmp_path)
    ids = torch.randint(0, 97, (2, 7))
    assert torch.equal(sf.load(tmp_path).eval()(ids).logits, model(ids).logits)


@pytest.mark.parametrize("form", ["parallel", "chunkwise", "recurrent"])
def test_fp16_layer_tracks_fp64_when_row_sums_and_outputs_exceed_fp16s_range(form):
    """Shared key directions and slow decays make row sums |Σ R| ≫ 256 (their square overflows fp16) and
    un-normalized outputs |Σ R·V| > 65504 (fp16's largest value). The fp16 layer must still track fp64 to
    fp16 rounding: before the fix whole rows came out exactly 0 (relative error 1.0)."""
    from scaleformer.layers.positions import Rotary
    from scaleformer.ops.retention import retention

    torch.manual_seed(0)
    layer = MultiScaleRetention(64, sf.Retention(heads=2, value_dim=64, decay="retnet")).double()
    with torch.no_grad():
        layer.q_proj.weight.mul_(30)
        layer.k_proj.weight.mul_(30)
        layer.v_proj.weight.mul_(200)
    x = (torch.randn(1, 1, 64) + 0.05 * torch.randn(2, 300, 64)).double()  # every token near one direction
    positions = torch.arange(300).expand(2, -1)
    expected, _ = layer.retain(x, positions=positions, form=form)

    terms = layer.position_terms(positions, torch.float64)  # the regime: sums far past fp16's range
    q = Rotary.rotate(layer._split(layer.q_proj(x)), terms.phases)
    k = Rotary.rotate(layer._split(layer.k_proj(x)), terms.phases) * layer.key_dim**-0.5
    v = layer._split(layer.v_proj(x))
    sums, _ = retention(q, k, torch.cat([v, torch.ones_like(v[..., :1])], -1), log_decay=terms.log_decay)
    assert sums[..., -1].abs().max() > 1000 and sums[..., :-1].abs().max() > 65504

    actual, _ = layer.half().retain(x.half(), positions=positions, form=form)
    assert actual.dtype == torch.float16 and torch.isfinite(actual).all()
    row_error = (actual.double() - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert row_error.max() < 4e-3  # a few fp16 ulps (2^-10 ≈ 9.8e-4); measured 1.1e-3
