import os

import pytest
import torch

import scaleformer as sf
from tests.conftest import make_model, tiny


@pytest.mark.parametrize("cfg", [
    tiny(position="xpos", norm="subln", tie_embeddings=False),
    tiny("encoder", position="relative", multiway=2),
    tiny("encoder_decoder", norm="deepnorm", position="sinusoidal", share_encoder_decoder_embeddings=False),
], ids=["decoder", "encoder", "encoder_decoder"])
def test_save_load_gives_identical_logits(cfg, tmp_path):
    model = make_model(cfg)
    sf.save(model, tmp_path / "ckpt")
    loaded = sf.load(tmp_path / "ckpt").eval()
    assert loaded.config == cfg
    ids = torch.randint(0, 97, (2, 7))
    args = (ids, ids[:, :5]) if cfg.arch == "encoder_decoder" else (ids,)
    kwargs = {"multiway_split": 3} if cfg.multiway > 1 else {}
    assert torch.equal(model(*args, **kwargs).logits, loaded(*args, **kwargs).logits)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors"]  # no temp files left


def test_tied_weights_stay_tied_after_load(tmp_path):
    model = make_model(tiny())
    sf.save(model, tmp_path)
    loaded = sf.load(tmp_path)
    assert loaded.output_projection is None
    assert loaded.decoder.embed_tokens.weight is loaded.embed_tokens.weight


def test_load_with_inference_override(tmp_path):
    model = make_model(tiny(position="xpos"))
    sf.save(model, tmp_path)
    loaded = sf.load(tmp_path, blockwise_causal_block=4)  # an older flat config's own field
    assert {layer.mixer.block for layer in loaded.config.layers} == {4}
    sf.save(sf.build(sf.load_preset("gpt-tiny", position="xpos")), tmp_path / "new")
    loaded = sf.load(tmp_path / "new", **{"layers[*].mixer.block": 4})  # a path into a model config
    assert {layer.mixer.block for layer in loaded.config.layers} == {4}


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a scaleformer checkpoint directory"):
        sf.load(tmp_path)
    sf.save(make_model(tiny()), tmp_path)
    (tmp_path / "config.json").write_text((tmp_path / "config.json").read_text().replace('"layers": 2', '"layers": 3'))
    with pytest.raises(ValueError, match="missing decoder.blocks.2"):  # checked before anything is built
        sf.load(tmp_path)


def test_a_model_loads_in_the_dtype_it_was_saved_in(tmp_path):
    model = make_model(tiny()).to(torch.bfloat16)
    sf.save(model, tmp_path)
    loaded = sf.load(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, 97, (1, 5))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_saving_into_the_current_directory_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="the current directory"):
        sf.save(make_model(tiny()), ".")
    assert list(tmp_path.iterdir()) == []


def test_save_through_a_link_writes_into_its_target(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    sf.save(make_model(tiny()), tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "model.safetensors").is_file()


def test_checkpoints_carry_a_format_version_and_a_newer_one_is_refused(tmp_path):
    """Format 2 is written; format 1 (no version, `self_attn` and `ways.0` names) loads through the
    rename table with identical logits; a newer format is refused. (Every golden case is a format-1 file.)"""
    import re

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = make_model(tiny())
    sf.save(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as weights:
        assert weights.metadata()["scaleformer_format"] == "2"
    assert not any(".ways." in name for name in load_file(str(tmp_path / "model.safetensors")))
    format_1 = {re.sub(r"\.(ffn|ffn_norm)\.", r".\1.ways.0.", re.sub(r"\.mixer_norm\.", ".self_attn_norm.ways.0.",
                re.sub(r"\.mixer\.", ".self_attn.", name))): tensor
                for name, tensor in load_file(str(tmp_path / "model.safetensors")).items()}
    assert any(".self_attn.q_proj." in name for name in format_1)
    save_file(format_1, str(tmp_path / "model.safetensors"))  # no version: written before versions existed
    ids = torch.randint(0, 64, (2, 6))
    assert torch.equal(sf.load(tmp_path).eval()(ids).logits, model.eval()(ids).logits)
    save_file(load_file(str(tmp_path / "model.safetensors")), str(tmp_path / "model.safetensors"),
              metadata={"scaleformer_format": "3"})
    with pytest.raises(ValueError, match="format '3', but this scaleformer reads formats 1 to 2; it was written by a newer"):
        sf.load(tmp_path)


def test_weight_files_get_the_same_mode_as_the_json_beside_them(tmp_path):
    """safetensors creates its files 0600; ours follow the umask like every other file (0644 under 022)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        sf.save(sf.build(sf.load_preset("gpt-tiny", layers=1)), tmp_path / "m")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "m").iterdir()}
    assert modes == {"config.json": 0o644, "model.safetensors": 0o644}
