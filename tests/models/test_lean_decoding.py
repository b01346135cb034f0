"""A RetNet's decoding step skips the general path's dispatch (TransformerStack.decode_step): the same
arithmetic bit for bit, in every variant the lean path serves, and the general path wherever it does not."""

import pytest
import torch

import scaleformer as sf
from scaleformer.models.transformer import TransformerStack

WIDTH = dict(vocab_size=97, embed_dim=32)


def _retention(**options):
    return sf.LayerConfig(mixer=sf.Retention(heads=2, value_dim=48, **options), ffn=sf.GLU(ffn_dim=40, bias=False))


VARIANTS = {
    "retnet": sf.RetNetConfig(layers=2, heads=4, value_dim=48, ffn_dim=40, **WIDTH),
    "torchscale-normalizer": sf.RetNetConfig(layers=2, heads=2, value_dim=48, ffn_dim=40, normalizer="torchscale",
                                             **WIDTH),
    "deepnorm": sf.RetNetConfig(layers=2, heads=2, value_dim=48, ffn_dim=40, norm="deepnorm", **WIDTH),
    "learned positions, no normalizer, gate or head norm": sf.ModelConfig(
        layers=(_retention(normalizer="none", gate=False, head_norm=False),) * 2, **WIDTH),
    "sinusoidal positions, embedding norm": sf.ModelConfig(layers=(_retention(),) * 2, embedding_norm=True,
                                                           position=sf.SinusoidalPosition(), **WIDTH),
    "post-ln, scaled embeddings, MLP": sf.ModelConfig(
        layers=(sf.LayerConfig(mixer=sf.Retention(heads=2, value_dim=48), ffn=sf.MLP(ffn_dim=40)),) * 2,
        residual=sf.PostNorm(), scale_embeddings=True, **WIDTH),
    "bitnet": sf.RetNetConfig(layers=2, heads=2, value_dim=48, ffn_dim=40, linear="bitlinear", **WIDTH),
}


def _model(cfg, dtype=torch.float32):
    torch.manual_seed(0)
    model = sf.build(cfg).to(dtype).eval()
    with torch.no_grad():  # non-trivial norms
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def _decode(model, ids, prefill, lean: bool):
    """Logits of every decoded position and the final states, through the lean path or the general one."""
    model.decoder.decodes_lean = lean
    with torch.no_grad():
        out = model(ids[:, :prefill], use_cache=True)
        logits = []
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t:t + 1], cache=out.cache)
            logits.append(out.logits)
    return torch.cat(logits, 1), [layer.state for layer in out.cache.layers], out.cache.next_position


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_the_lean_step_is_the_general_step_bit_for_bit(variant, dtype, monkeypatch):
    model = _model(VARIANTS[variant], dtype)
    assert model.decoder.decodes_lean
    ids = torch.randint(0, 97, (3, 9))
    calls = []
    real = TransformerStack.decode_step
    monkeypatch.setattr(TransformerStack, "decode_step", lambda self, *a: calls.append(1) or real(self, *a))
    lean_logits, lean_states, lean_next = _decode(model, ids, 4, lean=True)
    assert len(calls) == 5  # every step after the prompt took the lean path
    general_logits, general_states, general_next = _decode(model, ids, 4, lean=False)
    assert len(calls) == 5
    assert torch.equal(lean_logits, general_logits)
    assert all(torch.equal(a, b) for a, b in zip(lean_states, general_states))
    assert torch.equal(lean_next, general_next)


def test_float16_keeps_the_general_paths_float32_retention():
    model = _model(VARIANTS["retnet"], torch.float16)
    ids = torch.randint(0, 97, (2, 7))
    lean, lean_states, _ = _decode(model, ids, 3, lean=True)
    general, general_states, _ = _decode(model, ids, 3, lean=False)
    assert torch.equal(lean, general) and all(torch.equal(a, b) for a, b in zip(lean_states, general_states))
    assert lean_states[0].dtype == torch.float32


@pytest.mark.parametrize("cfg", [
    sf.RetNetConfig(layers=2, heads=2, value_dim=48, ffn_dim=40, decay="gated", normalizer="none", **WIDTH),
    sf.ModelConfig(layers=(_retention(), sf.LayerConfig(mixer=sf.Attention(heads=4))), position=sf.RoPE(), **WIDTH),
    sf.ModelConfig(layers=(sf.LayerConfig(mixer=sf.Retention(heads=2, value_dim=48),
                                          ffn=sf.MoE(expert=sf.MLP(ffn_dim=24))),) * 2, **WIDTH),
], ids=["gated", "hybrid", "moe"])
def test_stacks_the_lean_path_does_not_serve_take_the_general_one(cfg):
    assert not _model(cfg).decoder.decodes_lean


def test_the_general_path_serves_steps_with_a_mask_gradients_or_in_training(monkeypatch):
    model = _model(VARIANTS["retnet"])
    calls = []
    monkeypatch.setattr(TransformerStack, "decode_step", lambda self, *a: calls.append(1))
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
        model(ids[:, :1], cache=cache, attention_mask=torch.ones(2, 1))
        model(ids[:, :1], cache=cache, form="parallel")
        model(ids[:, :2], cache=cache)
        model.train()
        model(ids[:, :1], cache=cache)
        model.eval()
    model(ids[:, :1], cache=cache)  # gradients enabled
    assert not calls


def test_a_cache_of_another_model_is_one_clear_error():
    small = _model(VARIANTS["retnet"])
    other = _model(sf.RetNetConfig(layers=2, heads=4, value_dim=64, ffn_dim=40, **WIDTH))
    ids = torch.randint(0, 97, (1, 4))
    with torch.no_grad():
        cache = other(ids, use_cache=True).cache
        with pytest.raises(ValueError, match="retention state has shape .*: a cache of another model"):
            small(ids[:, :1], cache=cache)
