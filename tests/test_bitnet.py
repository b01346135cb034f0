"""BitNet b1.58 at 2 bits per weight: packing, a packed model's logits equal to the quantised training
forward, save/load, and `scaleformer pack-bitnet`."""

import pytest
import torch

import scaleformer as sf
from scaleformer.bitnet import (PackedBitLinear, PackedExperts, linear_bytes, load_packed, pack, pack_ternary,
                                save_packed, unpack_ternary)
from scaleformer.cli import main
from tests.conftest import assert_close, decode_step_by_step


def test_packing_layout_by_hand_and_round_trip():
    assert pack_ternary(torch.tensor([-1.0, 0.0, 1.0, 1.0])).tolist() == [0 | 1 << 2 | 2 << 4 | 2 << 6]
    codes = torch.randint(-1, 2, (7, 5)).float()  # 35 codes: the last byte is partly padding
    packed = pack_ternary(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == 9
    assert torch.equal(unpack_ternary(packed, (7, 5)), codes)
    with pytest.raises(ValueError, match=r"codes in \{-1, 0, 1\}"):
        pack_ternary(torch.tensor([2.0]))


def _model(**options):
    torch.manual_seed(0)
    return sf.build(sf.load_preset("bitnet-tiny", **options)).eval()


def test_packed_model_equals_the_quantised_training_forward_and_decodes():
    model = _model()
    ids = torch.randint(0, 512, (2, 9))
    expected = model(ids).logits
    before = linear_bytes(model)
    pack(model)
    assert not any(type(m).__name__ == "BitLinear" for m in model.modules())
    assert sum(isinstance(m, PackedBitLinear) for m in model.modules()) == 2 * 7
    assert torch.equal(model(ids).logits, expected)  # the same arithmetic, from 2-bit codes
    assert_close(decode_step_by_step(model, ids, 4), expected)
    # 2 bits per weight instead of 32, plus one fp32 scale per matrix: 16x, less the scales
    assert before / linear_bytes(model) == pytest.approx(16, rel=0.01)


def test_packed_retnet_equals_its_training_forward():
    torch.manual_seed(0)
    model = sf.build(sf.load_preset("gret-tiny", linear="bitlinear")).eval()
    ids = torch.randint(0, 512, (2, 9))
    expected = model(ids, form="chunkwise").logits
    pack(model)
    assert torch.equal(model(ids, form="chunkwise").logits, expected)


def test_packed_moe_experts_equal_their_training_forward_and_round_trip(tmp_path):
    model = _model(moe=sf.MoEConfig(experts=4, top_k=2))
    ids = torch.randint(0, 512, (2, 9))
    expected = model(ids).logits
    experts = next(m for m in model.modules() if type(m).__name__ == "Experts")
    latent = sum(w.numel() * 4 for w in (experts.fc1, experts.gate, experts.fc2))
    pack(model)
    packed = [m for m in model.modules() if isinstance(m, PackedExperts)]
    assert len(packed) == 1 and not any(isinstance(p, torch.nn.Parameter) and p.dim() == 3 for p in packed[0].parameters())
    assert packed[0].packed_bytes() == latent // 16 + 3 * 4 * 4  # 2 bits per weight, one fp32 scale per expert matrix
    assert torch.equal(model(ids).logits, expected)
    save_packed(model, tmp_path / "packed")
    assert torch.equal(load_packed(tmp_path / "packed")(ids).logits, expected)


def test_save_and_load_packed(tmp_path):
    model = pack(_model())
    ids = torch.randint(0, 512, (2, 6))
    save_packed(model, tmp_path / "packed")
    again = load_packed(tmp_path / "packed")
    assert torch.equal(again(ids).logits, model(ids).logits)
    with pytest.raises(FileNotFoundError, match="not a packed BitNet directory"):
        load_packed(tmp_path)
    with pytest.raises(ValueError, match="expects a packed model"):
        save_packed(_model(), tmp_path / "x")
    with pytest.raises(ValueError, match="no BitLinear layers"):
        pack(sf.build(sf.load_preset("gpt-tiny")))


def test_cli_pack_bitnet(tmp_path, capsys):
    model = _model()
    sf.save(model, tmp_path / "ckpt")
    assert main(["pack-bitnet", str(tmp_path / "ckpt"), str(tmp_path / "packed")]) == 0
    assert "packed at 2 bits per weight (16.0x smaller)" in capsys.readouterr().out
    ids = torch.randint(0, 512, (1, 5))
    assert torch.equal(load_packed(tmp_path / "packed")(ids).logits, model(ids).logits)


def _edit_packed(path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "packed.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "packed.safetensors"))


def _edit_config(path, **changes) -> None:
    import json

    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def _deepen(path, count) -> None:
    import json

    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "layers": config["layers"][:1] * count}))


def _first(tensors, suffix):
    return next(name for name in sorted(tensors) if name.endswith(suffix))


PACKED_CASES = {
    "a list config": (lambda p: (p / "config.json").write_text("[1, 2]"), "must be a JSON object"),
    "a deeply nested config": (lambda p: (p / "config.json").write_text("[" * 100_000 + "]" * 100_000),
                               "not valid JSON"),
    "vocab_size 1e9": (lambda p: _edit_config(p, vocab_size=10**9), "has shape"),
    "layers 1e3": (lambda p: _deepen(p, 10**3), "asks for layers=1000"),
    "a truncated file": (lambda p: (p / "packed.safetensors").write_bytes(
        (p / "packed.safetensors").read_bytes()[:300]), "not a readable safetensors file"),
    "a pickled file": (lambda p: torch.save({"a": torch.ones(2)}, p / "packed.safetensors"),
                       "not a readable safetensors file"),
    "a missing tensor": (lambda p: _edit_packed(p, lambda t: t.pop(_first(t, ".packed"))), "missing"),
    "an extra tensor": (lambda p: _edit_packed(p, lambda t: t.update(extra=torch.ones(2))), "unexpected extra"),
    "a wrong shape": (lambda p: _edit_packed(p, lambda t: t.update({_first(t, ".packed"): t[_first(t, ".packed")][:-1]})),
                      "has shape"),
    "NaN scales": (lambda p: _edit_packed(p, lambda t: t[_first(t, ".scale")].fill_(float("nan"))), "NaN"),
    "a negative scale": (lambda p: _edit_packed(p, lambda t: t[_first(t, ".scale")].fill_(-0.5)), "not positive"),
    "codes outside -1, 0, 1": (lambda p: _edit_packed(p, lambda t: t[_first(t, ".packed")].fill_(255)),
                               "codes outside {-1, 0, 1}"),
    "float codes": (lambda p: _edit_packed(p, lambda t: t.update({_first(t, ".packed"): t[_first(t, ".packed")].float()})),
                    "uint8 (U8), not F32"),
    "int64 tensors": (lambda p: _edit_packed(p, lambda t: t.update({_first(t, ".scale"): torch.tensor(1)})),
                      "one floating dtype"),
}


@pytest.mark.parametrize("case", list(PACKED_CASES))
def test_a_damaged_packed_directory_is_one_clear_error(case, tmp_path):
    import shutil

    damage, expected = PACKED_CASES[case]
    save_packed(pack(_model()), tmp_path / "good")
    shutil.copytree(tmp_path / "good", tmp_path / "bad")
    damage(tmp_path / "bad")
    with pytest.raises(ValueError) as caught:
        load_packed(tmp_path / "bad")
    message = str(caught.value)
    assert expected in message and str(tmp_path / "bad") in message and "\n" not in message, message


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_packed_model_comes_back_in_the_dtype_it_was_saved_in(dtype, tmp_path):
    model = pack(_model().to(dtype))
    save_packed(model, tmp_path / "packed")
    again = load_packed(tmp_path / "packed")
    assert {t.dtype for t in again.state_dict().values() if t.is_floating_point()} == {dtype}
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    ids = torch.randint(0, 512, (1, 5))
    assert torch.equal(again(ids).logits, model(ids).logits)
