"""Gated retention (RetNet-3, YOCO's self-decoder): a decay per head and token from the input. The forms,
cached decoding and padding tests of test_retnet.py run for it too (VARIANTS); here: the decays are learned,
packing is exact, and the layer computes the formula written out by hand."""

import pytest
import torch
import torch.nn.functional as F

import scaleformer as sf
from scaleformer.ops.retention import retention_reference
from tests.conftest import assert_close
from tests.models.test_retnet import retnet

GATED = dict(decay="gated", normalizer="none")


def test_the_decays_are_learned():
    # The first token's decay acts on an empty state, so one token gives its projection no gradient.
    for length, learns in ((1, False), (9, True)):
        model = retnet(**GATED)
        logits = model(torch.randint(0, 97, (2, length))).logits
        (logits * torch.randn_like(logits)).sum().backward()
        grads = [p.grad for n, p in model.named_parameters() if "decay_proj" in n]
        assert len(grads) == 2 and all(bool(g.abs().sum() > 0) == learns for g in grads)


def test_packed_documents_equal_separate_rows():
    model = retnet(**GATED)
    a, b = torch.randint(0, 97, (5,)), torch.randint(0, 97, (7,))
    packed = model(torch.cat([a, b])[None], document_ids=torch.tensor([[0] * 5 + [1] * 7])).logits[0]
    assert_close(packed[:5], model(a[None]).logits[0])
    assert_close(packed[5:], model(b[None]).logits[0])


def test_the_layer_is_yocos_formula_written_out():
    """o = W_O (swish(x W_G) ⊙ RMSNorm_h(Σ_m Π γ_{h,s} (q_n · k_m) v_m)), γ = exp(logsigmoid(x W_γ) / 16),
    q and k rotated, k scaled by K^-1/2 — computed here with the op's element-by-element reference."""
    model = retnet(torch.float64, **GATED)
    layer = model.blocks[0].mixer
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    positions = torch.arange(7).expand(2, 7)
    out, _ = layer.retain(x, positions=positions, form="chunkwise", chunk_size=3)
    heads, key_dim = 4, 8
    split = lambda t: t.view(2, 7, heads, -1).transpose(1, 2)  # noqa: E731
    phases = layer.rotary.phases(positions, torch.float64)
    q = layer.rotary.rotate(split(x @ layer.q_proj.weight.T), phases)
    k = layer.rotary.rotate(split(x @ layer.k_proj.weight.T), phases) / key_dim**0.5
    v = split(x @ layer.v_proj.weight.T)
    log_decay = (F.logsigmoid(x @ layer.decay_proj.weight.T) / 16).transpose(1, 2)
    retained, _ = retention_reference(q, k, v, log_decay=log_decay)
    normed = retained * torch.rsqrt(retained.pow(2).mean(-1, keepdim=True) + 1e-6)
    gate = F.silu(x @ layer.g_proj.weight.T)
    expected = (gate * normed.transpose(1, 2).reshape(2, 7, -1)) @ layer.out_proj.weight.T
    assert_close(out, expected, torch.float64)


def test_decays_follow_the_input_and_the_temperature():
    model = retnet(torch.float64, **GATED)
    layer = model.blocks[0].mixer
    x = torch.randn(1, 4, 32, dtype=torch.float64)
    log_decay = layer.token_log_decays(x)
    assert log_decay.shape == (1, 4, 4) and torch.all(log_decay < 0)
    with torch.no_grad():  # logits far below 0 forget nearly everything at τ = 16: log γ ≈ logit / 16
        layer.decay_proj.weight.fill_(0.0)
        layer.decay_proj.weight[:, 0] = -1.0
    x = torch.zeros(1, 1, 32, dtype=torch.float64)
    x[..., 0] = 320.0
    assert_close(layer.token_log_decays(x), torch.full((1, 4, 1), -20.0, dtype=torch.float64), torch.float64,
                 scale=1e3)


def test_state_holds_no_normalizer_column():
    model = retnet(**GATED)
    out = model(torch.randint(0, 97, (2, 3)), use_cache=True)
    assert out.cache.nbytes() == 2 * (2 * 4 * 8 * 12 * 4)  # layers · B·H·K·V·fp32, no extra column


def test_presets_config_errors_and_round_trip(tmp_path):
    model = sf.build(sf.load_preset("gret-tiny"))
    assert model(torch.randint(0, 512, (1, 5))).logits.shape == (1, 5, 512)
    assert all(layer.mixer.decay == "gated" for layer in sf.load_preset("gret-base").layers)
    with pytest.raises(sf.ConfigError, match="gated decays have none"):
        sf.RetNetConfig(decay="gated", normalizer="torchscale")
    with pytest.raises(sf.ConfigError, match="decay_temperature must be > 0"):
        sf.RetNetConfig(decay="gated", decay_temperature=0.0)
    cfg = sf.load_preset("gret-tiny")
    assert sf.ModelConfig.from_dict(cfg.to_dict()) == cfg
    sf.save(model, tmp_path / "m")
    again = sf.load(tmp_path / "m")
    ids = torch.randint(0, 512, (2, 9))
    assert torch.equal(again(ids).logits, model(ids).logits)
