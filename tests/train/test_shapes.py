"""BEiT-3's vision demo: `scaleformer train --task shapes` learns classification and retrieval at quick size."""

import json

import pytest
import torch

import scaleformer as sf
from scaleformer.cli import main
from scaleformer.data.shapes import COLOURS, SHAPES, SIDES, SIZES, make_shapes
from scaleformer.train.shapes import evaluate_shapes


def test_shapes_are_deterministic_and_captions_describe_the_scene():
    a, b = make_shapes(64, seed=3), make_shapes(64, seed=3)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, make_shapes(64, seed=4).images)
    for caption, label, scene in zip(a.captions, a.labels.tolist(), a.scenes.tolist()):
        words = caption.split()
        shape, colour = SHAPES.index(words[4]), list(COLOURS).index(words[3])
        assert label == shape * len(COLOURS) + colour
        assert scene == label * 4 + SIZES.index(words[2]) * 2 + SIDES.index(words[7])
    assert a.images.shape == (64, 3, 32, 32) and -1 <= float(a.images.min()) and float(a.images.max()) <= 1
    # the shape is drawn on the side its caption says: the left half differs from the background more
    left = [i for i, c in enumerate(a.captions) if c.endswith("left")]
    spread = a.images[left].std(dim=(1, 2))  # (n, W): per column across rows and channels
    assert float((spread[:, :16].mean(1) > spread[:, 16:].mean(1)).float().mean()) > 0.9


def test_the_demo_learns_well_above_chance(tmp_path, capsys):
    """200 steps of 32 (~15 s): accuracy over 16 classes and retrieval recall@1 several times chance; the
    saved models load and give the recorded figures again."""
    out = tmp_path / "shapes"
    assert main(["train", "--task", "shapes", "--out", str(out), "--steps", "200", "--batch-size", "32",
                 "--eval-every", "100", "--seed", "1", "--no-progress"]) == 0
    result = json.loads((out / "result.json").read_text())
    final = result["final"]
    assert final["accuracy"] > 4 * final["accuracy_chance"]  # measured 0.387 against 0.0625
    assert final["image_to_text_r1"] > 8 * final["retrieval_chance"]  # measured 0.275 against 0.017
    assert final["text_to_image_r1"] > 8 * final["retrieval_chance"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    classifier, retrieval = sf.load(out / "classifier"), sf.load(out / "retrieval")
    assert classifier.config.task == "classification" and retrieval.config.task == "retrieval"
    assert torch.equal(classifier.beit3.encoder.blocks[0].ffn.ways[0].fc1.weight,
                       retrieval.beit3.encoder.blocks[0].ffn.ways[0].fc1.weight)  # one backbone
    again = evaluate_shapes(classifier, retrieval, make_shapes(512, seed=10_000_000 + 1), torch.device("cpu"))
    for key in ("accuracy", "image_to_text_r1", "text_to_image_r1"):
        assert again[key] == pytest.approx(final[key], abs=1e-6)
    assert "accuracy" in capsys.readouterr().out


def test_the_demo_refuses_options_it_does_not_take(tmp_path, capsys):
    assert main(["train", "--task", "shapes", "--out", str(tmp_path / "x"), "--data", "corpus.txt", "--seq-len",
                 "64"]) != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "takes only --out" in error[0] and error[0].endswith("got --data, --seq-len")
    assert not (tmp_path / "x").exists()


def test_language_model_commands_refuse_vision_models(tmp_path, capsys):
    model = sf.build(sf.BEiT3Config(vocab_size=20, embed_dim=16, layers=1, heads=2, ffn_dim=32, img_size=16,
                                    patch_size=8, task="classification", num_classes=2))
    sf.save(model, tmp_path / "m")
    for command, argv in (("eval", ["eval", "--checkpoint", str(tmp_path / "m")]),
                          ("generate", ["generate", "--checkpoint", str(tmp_path / "m"), "--prompt", "a"]),
                          ("export-hf", ["export-hf", str(tmp_path / "m"), str(tmp_path / "hf")])):
        assert main(argv) != 0
        error = capsys.readouterr().err.strip().splitlines()
        assert error == [f"error: {command} works on language models; this checkpoint holds a BEiT3Config "
                         "(family `beit3`): load it with scaleformer.load"]
    assert not (tmp_path / "hf").exists()
