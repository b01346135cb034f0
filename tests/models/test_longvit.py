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


def test_the_model_equals_its_dense_reference_in_outputs_and_gradients():
    """The fast dilated op against the reference (explicit count masks) in the same weights, float64."""
    fast, reference = _model().double(), _model(attention_impl="reference").double()
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
