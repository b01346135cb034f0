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
