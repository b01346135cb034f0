"""LongViT: patches, positions, the dilated encoder against its dense reference, the pooled head, save/load."""

import pytest
import torch
import torch.nn.functional as F

import scaleformer as sf
from scaleformer.models.longvit import TORCHSCALE_SEGMENTS, default_segments

TINY = sf.LongViTConfig(img_size=64, patch_size=8, embed_dim=32, layers=2, heads=4, ffn_dim=64, num_classes=3)


def _model(**fields):
    torch.manual_seed(0)
    return sf.build(TINY.replace(**fields))


def test_segments_grow_with_the_image():
    assert default_segments(1024) == (64, 128, 256, 512, 1024) == TORCHSCALE_SEGMENTS[1024]
    assert default_segments(1048576) == (1024, 4096, 32768, 262144, 1048576)  # TorchScale's 32k-pixel setting
    assert default_segments(4096) == (256, 512, 1024, 2048, 4096)
    assert TINY.segments == (4, 8, 16, 32, 64)
    with pytest.raises(sf.ConfigError, match="must include 1"):
        TINY.replace(dilation_rates=(2, 2, 4, 8, 16))
    with pytest.raises(sf.ConfigError, match="differ in length"):
        TINY.replace(segment_lengths=(8, 64))


@pytest.mark.parametrize("head_offsets", ["modulo", "grouped"])
def test_the_model_equals_its_dense_reference_in_outputs_and_gradients(head_offsets):
    """The fast dilated op against the reference (explicit count masks) in the same weights, float64; with
    our head offsets and with TorchScale's grouped ones."""
    fast = _model(head_offsets=head_offsets).double()
    reference = _model(attention_impl="reference", head_offsets=head_offsets).double()
    reference.load_state_dict(fast.state_dict())
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2])
    results = []
    for model in (fast, reference):
        out = model(images, labels)
        out.loss.backward()
        results.append((out.logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-10)
    for name, grad in results[0][1].items():
        assert torch.allclose(grad, results[1][1][name], atol=1e-10), name


def test_patches_positions_pooling_and_head():
    model = _model().eval()
    assert model.encoder.final_norm is None  # LongViT's encoder has no final norm: the head norms
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(images)
        tokens = model.patch_embed(images).flatten(2).transpose(1, 2) + model.pos_embed
        hidden = model.encoder(None, embeddings=tokens)
        expected = model.head(model.fc_norm(hidden.mean(1)))
    assert out.hidden.shape == (1, 64, 32) and torch.allclose(out.logits, expected, atol=1e-6)
    # Another image size: the position table resized bicubically (non-square too).
    table = model.positions(4, 12)
    resized = F.interpolate(model.pos_embed.reshape(1, 8, 8, 32).permute(0, 3, 1, 2), size=(4, 12), mode="bicubic")
    assert torch.allclose(table, resized.permute(0, 2, 3, 1).reshape(1, 48, 32))
    assert model(torch.randn(2, 3, 32, 96)).logits.shape == (2, 3)
    features = _model(num_classes=0)(images).logits
    assert features.shape == (1, 32)


def test_save_load_and_bad_inputs(tmp_path):
    model = _model().eval()
    sf.save(model, tmp_path / "m")
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(sf.load(tmp_path / "m").eval()(images).logits, model(images).logits)
    with pytest.raises(ValueError, match="multiples of the patch size 8"):
        model(torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\)"):
        model(torch.randn(3, 64, 64))


_TORCHSCALE_NAMES = [  # ours -> TorchScale's LongViT example (inside one encoder layer)
    (r"mixer\.(q|k|v|out)_proj\.", r"self_attn.\1_proj."), (r"mixer\.inner_norm\.", "self_attn.inner_attn_ln."),
    (r"mixer_norm\.", "self_attn_layer_norm."), (r"ffn\.inner_norm\.", "ffn.ffn_layernorm."),
    (r"ffn\.(fc1|fc2)\.", r"ffn.\1."), (r"ffn_norm\.", "final_layer_norm."),
]


def _as_torchscale(model, prefix):
    """Our LongViT's weights under TorchScale's names, as its checkpoints hold them (written by hand from its
    example's module names, independently of the converter)."""
    import re

    out = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(("_embedding", "encoder.embed_tokens")):
            continue
        if name.startswith("patch_embed."):
            out[f"{prefix}patch_embed.proj.{name.split('.')[-1]}"] = tensor
        elif name == "pos_embed":
            out[f"{prefix}pos_embed"] = tensor
        elif name.startswith("encoder.blocks."):
            index, rest = re.match(r"encoder\.blocks\.(\d+)\.(.*)", name).groups()
            for pattern, replacement in _TORCHSCALE_NAMES:
                if re.match(pattern, rest):
                    rest = re.sub(pattern, replacement, rest, count=1)
                    break
            out[f"{prefix}encoder.layers.{index}.{rest}"] = tensor
        else:  # fc_norm, head: outside the backbone
            out[name] = tensor
    return out


def test_torchscale_layout_checkpoints_convert():
    """A fine-tuned checkpoint (`model.` + fc_norm + head) and a pretraining one (`backbone.` + a projection
    head, which is left out) give our model back exactly; the grouped offsets come with it."""
    from scaleformer.interop.longvit import convert_longvit, load_longvit

    original = _model(head_offsets="grouped", fc_norm_eps=1e-5).eval()  # TorchScale's model: nn.LayerNorm's eps
    with torch.no_grad():
        for p in original.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images = torch.randn(2, 3, 64, 64)
    converted = load_longvit(_as_torchscale(original, "model."), heads=4)
    assert converted.config.head_offsets == "grouped" and converted.config.num_classes == 3
    assert converted.config.fc_norm_eps == 1e-5
    assert converted.config.segments == TINY.segments and converted.config.norm == "subln"
    with torch.no_grad():
        assert torch.equal(converted(images).logits, original(images).logits)
    pretraining = {k: v for k, v in _as_torchscale(original, "backbone.").items() if not k.startswith(("fc_norm", "head"))}
    pretraining["head.mlp.0.weight"] = torch.zeros(8, 32)
    config, _, skipped = convert_longvit(pretraining, heads=4)
    assert skipped == ["head.mlp.0.weight"] and config.num_classes == 0
    features = load_longvit(pretraining, heads=4)
    with torch.no_grad():
        assert torch.allclose(features(images).logits,
                              F.layer_norm(original(images).hidden.mean(1), (32,), eps=1e-5), atol=1e-6)
    larger = load_longvit(_as_torchscale(original, "model."), heads=4, img_size=128)  # positions resized
    assert larger.config.img_size == 128 and larger.pos_embed.shape == (1, 256, 32)
    # the source's segments (its 64 patches'), not those of 256 patches: TorchScale's model keeps its own
    assert larger.config.segments == default_segments(64) == TINY.segments != default_segments(256)
    source = _model(head_offsets="grouped", fc_norm_eps=1e-5, img_size=128, segment_lengths=TINY.segments).eval()
    source.load_state_dict(larger.state_dict())
    with torch.no_grad():
        big = torch.randn(1, 3, 128, 128)
        assert torch.equal(larger(big).logits, source(big).logits)
    with pytest.warns(UserWarning, match=r"override the source's \(4, 8, 16, 32, 64\)"):
        convert_longvit(_as_torchscale(original, "model."), heads=4, img_size=128,
                        segment_lengths=default_segments(256))
    with pytest.raises(ValueError, match="is it a LongViT state dict"):
        convert_longvit({"encoder.layers.0.x": torch.zeros(1)})


def test_the_cli_converts_a_longvit_checkpoint(tmp_path):
    from scaleformer.cli import main

    original = _model(head_offsets="grouped", fc_norm_eps=1e-5).eval()
    torch.save({"model": _as_torchscale(original, "model.")}, tmp_path / "longvit.pth")
    assert main(["convert-torchscale", "--kind", "longvit", "--heads", "4", "--weights", str(tmp_path / "longvit.pth"),
                 "--out", str(tmp_path / "ours")]) == 0
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(sf.load(tmp_path / "ours").eval()(images).logits, original(images).logits)
