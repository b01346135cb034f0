"""BEiT-3 from TorchScale's own model class (random weights) and from the released checkpoints' layout:
hidden states and task heads equal to TorchScale's, ≤ 1e-5 in float32."""

import pytest
import torch

import scaleformer as sf
from scaleformer.cli import main
from scaleformer.interop.beit3 import beit3_config_from_weights, convert_beit3, load_beit3
from scaleformer.interop.torchscale import import_torchscale

try:
    import_torchscale()
except ImportError as error:  # the CI installs it (see .ci/run); elsewhere it is optional
    pytest.skip(f"torchscale not installed: {error}", allow_module_level=True)

from torchscale.architecture.config import EncoderConfig  # noqa: E402
from torchscale.model.BEiT3 import BEiT3 as TorchScaleBEiT3  # noqa: E402

from tests.interop.test_torchscale import _randomize  # noqa: E402

SHAPE = dict(vocab_size=61, multiway=True, img_size=32, patch_size=8, in_chans=3, encoder_embed_dim=32,
             encoder_attention_heads=4, encoder_ffn_embed_dim=48, encoder_layers=2, max_source_positions=20,
             no_output_layer=True)  # BEiT-3's own setting (unilm/beit3): no vocabulary projection on every token


def _torchscale(seed=0, **options):
    config = EncoderConfig(**{**SHAPE, **options})
    torch.manual_seed(seed)
    model = TorchScaleBEiT3(config)
    _randomize(model, seed)
    return config, model.eval()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 32, 32, generator=g)
    ids = torch.randint(0, 61, (2, 9), generator=g)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 6:] = True  # right padding, as BEiT-3 pads
    masked = torch.rand(2, 16, generator=g) < 0.4
    return images, ids, padding, masked


@pytest.mark.parametrize("residual", ["subln", "deepnorm", "pre", "post"])
def test_hidden_states_equal_torchscale(residual):
    options = {"subln": {}, "deepnorm": dict(deepnorm=True), "pre": dict(subln=False),
               "post": dict(subln=False, encoder_normalize_before=False, normalize_output=False)}[residual]
    config, theirs = _torchscale(**options)
    ours = load_beit3(theirs.state_dict(), config)
    assert ours.config.norm == residual and ours.config.heads == 4
    images, ids, padding, masked = _inputs()
    real = torch.cat([torch.ones(2, 17, dtype=torch.bool), ~padding], 1)
    with torch.no_grad():
        cases = [
            (theirs(visual_tokens=images), ours(images=images), None),
            (theirs(textual_tokens=ids), ours(text_ids=ids), None),
            (theirs(visual_tokens=images, vision_masked_position=masked), ours(images=images, masked_patches=masked), None),
            (theirs(textual_tokens=ids, visual_tokens=images, text_padding_position=padding),
             ours(text_ids=ids, images=images, text_mask=~padding), real),
        ]
    for expected, got, keep in cases:
        expected = expected["encoder_out"]
        assert got.hidden.shape == expected.shape
        if keep is not None:  # TorchScale's outputs at padding are not defined; compare real tokens
            expected, hidden = expected[keep], got.hidden[keep]
        else:
            hidden = got.hidden
        assert torch.allclose(hidden, expected, atol=1e-5), (hidden - expected).abs().max()


def _released(theirs, heads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A released checkpoint's layout: the backbone under `beit3.` beside its task heads."""
    return {**{f"beit3.{k}": v for k, v in theirs.state_dict().items()}, **heads}


def test_released_classification_checkpoint_through_the_cli(tmp_path):
    config, theirs = _torchscale(seed=1)
    g = torch.Generator().manual_seed(2)
    heads = {"fc_norm.weight": 1 + 0.1 * torch.randn(32, generator=g), "fc_norm.bias": 0.1 * torch.randn(32, generator=g),
             "head.weight": 0.2 * torch.randn(7, 32, generator=g), "head.bias": 0.1 * torch.randn(7, generator=g)}
    torch.save({"model": _released(theirs, heads)}, tmp_path / "beit3_cls.pth")
    assert main(["convert-torchscale", "--weights", str(tmp_path / "beit3_cls.pth"), "--out", str(tmp_path / "ours"),
                 "--heads", "4"]) == 0  # the released models' heads are 64 wide (the default); this toy's are 8
    model = sf.load(tmp_path / "ours").eval()
    assert model.config.task == "classification" and model.config.num_classes == 7
    images = _inputs()[0]
    with torch.no_grad():
        hidden = theirs(visual_tokens=images)["encoder_out"]
        pooled = torch.nn.functional.layer_norm(hidden[:, 1:].mean(1), (32,), heads["fc_norm.weight"],
                                                heads["fc_norm.bias"], eps=1e-6)
        expected = pooled @ heads["head.weight"].t() + heads["head.bias"]
        got = model(images).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_released_retrieval_checkpoint():
    config, theirs = _torchscale(seed=3)
    g = torch.Generator().manual_seed(4)
    heads = {"vision_head.weight": 0.2 * torch.randn(32, 32, generator=g),
             "language_head.weight": 0.2 * torch.randn(32, 32, generator=g), "logit_scale": torch.tensor(3.2)}
    model = load_beit3(_released(theirs, heads), heads=4)
    assert model.config.task == "retrieval"
    images, ids, padding, _ = _inputs()
    with torch.no_grad():
        image = torch.nn.functional.normalize(theirs(visual_tokens=images)["encoder_out"][:, 0] @ heads["vision_head.weight"].t(), dim=-1)
        text = theirs(textual_tokens=ids, text_padding_position=padding)["encoder_out"][:, 0]
        text = torch.nn.functional.normalize(text @ heads["language_head.weight"].t(), dim=-1)
        out = model(images, ids, text_mask=~padding)
    assert torch.allclose(out.image_embedding, image, atol=1e-5) and torch.allclose(out.text_embedding, text, atol=1e-5)
    assert torch.allclose(out.logits, torch.exp(torch.tensor(3.2)) * image @ text.t(), atol=1e-4)


def test_config_is_read_from_the_weights():
    config, theirs = _torchscale()
    inferred = beit3_config_from_weights(theirs.state_dict())  # no TorchScale config: heads = width / 64
    assert (inferred.vocab_size, inferred.embed_dim, inferred.layers, inferred.ffn_dim, inferred.img_size,
            inferred.patch_size, inferred.max_text_positions, inferred.norm, inferred.heads) == (61, 32, 2, 48, 32, 8, 18,
                                                                                              "subln", 1)
    # max_source_positions=20 rows, of which TorchScale's positions use rows 2..19: 18 text positions
    assert beit3_config_from_weights(theirs.state_dict(), heads=4).heads == 4


def test_unconvertible_checkpoints_get_one_line():
    config, theirs = _torchscale(no_output_layer=False)
    with pytest.raises(ValueError, match="no_output_layer=True"):
        convert_beit3(theirs.state_dict(), config)
    state = dict(_torchscale()[1].state_dict())
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="no scaleformer counterpart for extra.weight"):
        convert_beit3(state)
    with pytest.raises(ValueError, match="is it a BEiT-3 state dict"):
        convert_beit3({"encoder.layers.0.x": torch.zeros(1)})
