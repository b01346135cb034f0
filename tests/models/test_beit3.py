"""BEiT-3 in scaleformer: inputs, padding, Multiway routing, heads and losses, save/load, preprocessing."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import scaleformer as sf
from scaleformer.data.images import image_batch, image_tensor

TINY = sf.BEiT3Config(vocab_size=50, embed_dim=32, layers=2, heads=4, ffn_dim=48, img_size=32, patch_size=8,
                      max_text_positions=16)


def _model(task="backbone", seed=0, **fields):
    torch.manual_seed(seed)
    return sf.build(TINY.replace(task=task, **fields)).eval()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 50, (2, 7), generator=g)


def test_shapes_and_the_multiway_split():
    model = _model()
    images, ids = _inputs()
    with torch.no_grad():
        both, image, text = model(ids, images), model(images=images), model(ids)
    assert both.hidden.shape == (2, 17 + 7, 32) and both.image_tokens == 17
    assert image.hidden.shape == (2, 17, 32) and image.image_tokens == 17
    assert text.hidden.shape == (2, 7, 32) and text.image_tokens == 0
    # Image tokens go through way 0 and text through way 1: perturbing way 1 of every layer's FFN changes
    # an image-only forward not at all, and a text-only one.
    with torch.no_grad():
        for block in model.encoder.blocks:
            block.ffn.ways[1].fc2.weight.add_(1.0)
        assert torch.equal(model(images=images).hidden, image.hidden)
        assert not torch.allclose(model(ids).hidden, text.hidden)


def test_text_padding_is_invisible_to_real_tokens():
    """Right padding (BEiT-3's) and left padding give the real tokens the hidden states of the unpadded input."""
    model = _model()
    images, ids = _inputs()
    with torch.no_grad():
        alone = model(ids[:1, :5], images[:1]).hidden
        right = model(torch.cat([ids[:1, :5], ids[:1, :2]], 1), images[:1],
                      text_mask=torch.tensor([[1, 1, 1, 1, 1, 0, 0]])).hidden
        left = model(torch.cat([ids[:1, :2], ids[:1, :5]], 1), images[:1],
                     text_mask=torch.tensor([[0, 0, 1, 1, 1, 1, 1]])).hidden
    assert torch.allclose(right[:, :22], alone, atol=1e-5)
    assert torch.allclose(torch.cat([left[:, :17], left[:, 19:]], 1), alone, atol=1e-5)


def test_masked_patches_take_the_mask_token():
    model = _model()
    images, _ = _inputs()
    masked = torch.zeros(2, 16, dtype=torch.bool)
    masked[:, 3] = True
    embedded = model.vision_embed(images, masked)
    assert torch.equal(embedded[:, 4], model.vision_embed.mask_token[0].expand(2, -1))  # patch 3 after CLS
    assert torch.equal(embedded[:, 5], model.vision_embed(images)[:, 5])


def test_heads_and_their_losses():
    images, ids = _inputs()
    labels = torch.tensor([1, 4])
    classifier = _model("classification", num_classes=5)
    out = classifier(images, labels)
    hidden = classifier.beit3(images=images).hidden
    expected = classifier.head(classifier.fc_norm(hidden[:, 1:].mean(1)))
    assert torch.allclose(out.logits, expected) and torch.allclose(out.loss, F.cross_entropy(expected, labels))

    retrieval = _model("retrieval")
    out = retrieval(images, ids)
    assert out.logits.shape == (2, 2)
    assert torch.allclose(out.image_embedding.norm(dim=-1), torch.ones(2))
    assert torch.allclose(out.logits, retrieval.logit_scale.exp() * out.image_embedding @ out.text_embedding.t())
    targets = torch.arange(2)
    assert torch.allclose(out.loss, (F.cross_entropy(out.logits, targets) + F.cross_entropy(out.logits.t(), targets)) / 2)

    masked_model = _model("masked", visual_vocab_size=11)
    masked_text = torch.zeros(2, 7, dtype=torch.bool)
    masked_text[0, 2] = masked_text[1, 5] = True
    masked_patches = torch.zeros(2, 16, dtype=torch.bool)
    masked_patches[:, :3] = True
    visual = torch.randint(0, 11, (2, 16))
    out = masked_model(ids.masked_fill(masked_text, 0), images, masked_text=masked_text, masked_patches=masked_patches,
                       text_targets=ids, image_targets=visual)
    hidden = masked_model.beit3(ids.masked_fill(masked_text, 0), images, masked_patches=masked_patches).hidden
    text_loss = F.cross_entropy(masked_model.text_head(hidden[:, 17:][masked_text]), ids[masked_text])
    image_loss = F.cross_entropy(masked_model.image_head(hidden[:, 1:17][masked_patches]), visual[masked_patches])
    assert torch.allclose(out.loss, text_loss + image_loss, atol=1e-6)
    assert out.logits.shape == (2, 50) and out.image_logits.shape == (6, 11)
    out.loss.backward()
    assert masked_model.beit3.vision_embed.mask_token.grad.abs().sum() > 0


def test_save_and_load_round_trip(tmp_path):
    model = _model("classification", num_classes=3)
    sf.save(model, tmp_path / "m")
    loaded = sf.load(tmp_path / "m").eval()
    images, _ = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(images).logits, model(images).logits)


def test_bad_inputs_get_one_line():
    model = _model()
    images, ids = _inputs()
    for call, message in (
            (lambda: model(), "needs text_ids, images or both"),
            (lambda: model(images=images[:, :, :16]), "32×32 pixels"),
            (lambda: model(images=images[:, :1]), r"\(batch, 3, height, width\)"),
            (lambda: model(ids, images[:1]), "differ in batch size"),
            (lambda: model(ids + 100), "outside"),
            (lambda: model(torch.randint(0, 50, (1, 20))), "longer than the text position table"),
            (lambda: model(ids, masked_patches=torch.zeros(2, 16, dtype=torch.bool)), "without images"),
            (lambda: model(images=images, masked_patches=torch.zeros(2, 15, dtype=torch.bool)), "masked patches")):
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(sf.ConfigError, match="must divide img_size"):
        sf.BEiT3Config(img_size=30, patch_size=8)


def test_image_preprocessing_without_torchvision(tmp_path):
    from PIL import Image

    pixels = np.zeros((4, 6, 3), dtype=np.uint8)
    pixels[..., 0] = 255  # red
    pixels[:, 3:, 2] = 51  # the right half a little blue
    image = Image.fromarray(pixels)
    full = image_tensor(image, 4, crop_fraction=4 / 6)  # shorter side 6 (the width scales to 9), centre crop 4
    assert full.shape == (3, 4, 4) and full.dtype == torch.float32
    assert torch.allclose(full[0], torch.ones(4, 4))  # 255 -> 1 -> (1 - 0.5) / 0.5
    assert torch.allclose(full[1], -torch.ones(4, 4))
    square = image_tensor(image, 6)
    assert torch.allclose(square[2, :, 0], torch.full((6,), -1.0), atol=1e-6)  # the left edge has no blue
    assert abs(float(square[2, 0, -1]) - (51 / 255 - 0.5) / 0.5) < 0.05
    image.save(tmp_path / "x.png")
    batch = image_batch([tmp_path / "x.png", image], 6)
    assert torch.equal(batch[0], batch[1])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        image_tensor(tmp_path / "bad.png", 6)
