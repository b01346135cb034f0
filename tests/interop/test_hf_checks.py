"""Loading our Hugging Face exports (``from_pretrained`` on a local directory) makes every check that
``scaleformer.load`` makes: each bad directory is one ``ValueError`` naming the file, raised before the model
is built, and a good one comes back in the dtype it was saved in (table-driven: one row per audit case)."""

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import make_model, tiny

pytest.importorskip("transformers")
sfhf = pytest.importorskip("scaleformer.hf")


def _config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _weights(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _matrix(tensors) -> str:
    return next(name for name in sorted(tensors) if tensors[name].dim() == 2 and "embed" not in name)


def _old_and_new_name(tensors) -> None:
    name = next(name for name in sorted(tensors) if ".mixer." in name)
    tensors[name.replace(".mixer.", ".self_attn.")] = tensors[name].clone()  # format 1's name for the same tensor


def _deep(path: Path) -> None:
    (path / "config.json").write_text('{"scaleformer": ' + "[" * 100_000 + "]" * 100_000 + "}")


CASES = {
    "format 0": (lambda p: _config(p, scaleformer_format=0), "scaleformer_format 0"),
    "format -1": (lambda p: _config(p, scaleformer_format=-1), "scaleformer_format -1"),
    "format as a string": (lambda p: _config(p, scaleformer_format="2"), "scaleformer_format '2'"),
    "format true": (lambda p: _config(p, scaleformer_format=True), "scaleformer_format True"),
    "a newer format": (lambda p: _config(p, scaleformer_format=99), "upgrade scaleformer"),
    "no scaleformer config": (lambda p: _config(p, scaleformer=[1]), "not a scaleformer export"),
    "an unknown config key": (lambda p: _config(p, scaleformer={**json.loads((p / "config.json").read_text())
                                                               ["scaleformer"], "embed_dimm": 8}), "embed_dimm"),
    "vocab_size 1e9": (lambda p: _config(p, scaleformer={**json.loads((p / "config.json").read_text())
                                                        ["scaleformer"], "vocab_size": 10**9}), "has shape"),
    "layers 1e5": (lambda p: _config(p, scaleformer={**json.loads((p / "config.json").read_text())["scaleformer"],
                                                    "layers": 10**5}), "asks for layers=100000"),
    "deeply nested config": (_deep, "not valid JSON"),
    "NaN weights": (lambda p: _weights(p, lambda t: t[_matrix(t)].fill_(float("nan"))), "NaN or infinite"),
    "int64 weights": (lambda p: _weights(p, lambda t: t.update({_matrix(t): t[_matrix(t)].long()})),
                      "one floating dtype"),
    "a tensor under its old and new name": (lambda p: (_weights(p, _old_and_new_name), _config(p, scaleformer_format=1)),
                                            "twice, under several names"),
    "a tensor under an old name in a new file": (lambda p: _weights(p, _old_and_new_name), "unexpected"),
    "an extra safetensors file": (lambda p: (p / "extra.safetensors").write_bytes((p / "model.safetensors").read_bytes()),
                                  "holds weight files the export does not name (extra.safetensors)"),
    "a wrong shape": (lambda p: _weights(p, lambda t: t.update({_matrix(t): t[_matrix(t)][:-1]})), "has shape"),
    "a missing tensor": (lambda p: _weights(p, lambda t: t.pop(_matrix(t))), "missing"),
    "a truncated file": (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:100]),
                         "not a readable safetensors file"),
}


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("export") / "hf"
    sfhf.wrap(make_model(tiny(position="rope"))).save_pretrained(path)
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_export_is_one_clear_error_before_building(case, export, tmp_path, monkeypatch):
    import shutil

    damage, expected = CASES[case]
    path = tmp_path / "hf"
    shutil.copytree(export, path)
    damage(path)
    built = []
    monkeypatch.setattr(sfhf.ScaleformerForCausalLM, "__init__",
                        lambda self, *a, **k: built.append(1) or pytest.fail("built before the checks"))
    if case in ("NaN weights",):  # values are checked once read, i.e. after building
        monkeypatch.undo()
    with pytest.raises(ValueError) as caught:
        sfhf.ScaleformerForCausalLM.from_pretrained(path)
    message = str(caught.value)
    assert expected in message and "\n" not in message and len(message) < 600, message
    assert str(path) in message


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_an_export_loads_in_its_saved_dtype_and_a_requested_one(dtype, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_model(tiny(position="rope")).to(dtype)
    sfhf.wrap(model).save_pretrained(tmp_path)
    for loader in (sfhf.ScaleformerForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained):
        loaded = loader(tmp_path)
        assert {p.dtype for p in loaded.parameters()} == {dtype}
        assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values()))
    assert {p.dtype for p in sfhf.ScaleformerForCausalLM.from_pretrained(tmp_path, dtype=torch.float16).parameters()} == {
        torch.float16}
    with pytest.raises(ValueError, match="device_map='cuda' is not supported"):
        sfhf.ScaleformerForCausalLM.from_pretrained(tmp_path, device_map="cuda")
