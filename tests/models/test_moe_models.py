"""MoE in every model family: training, aux loss, cached decoding, padding, layer placement."""

import pytest
import torch
import torch.nn.functional as F

import scaleformer as sf
from scaleformer.config import MoEConfig
from scaleformer.layers.moe import MoEFeedForward, moe_layers
from tests.conftest import assert_close, decode_step_by_step, make_model, tiny

MOE = MoEConfig(experts=4, top_k=2, capacity_factor=1.0, second_expert_policy="all")


def _models():
    return {
        "decoder": tiny(moe=MOE, position="rope"),
        "encoder": tiny("encoder", moe=MOE),
        "encoder_decoder": tiny("encoder_decoder", moe=MOE, position="sinusoidal"),
        "longnet": tiny(moe=MOE, norm="subln", position="xpos", attention="dilated", segment_lengths=(4, 8),
                        dilation_rates=(1, 2)),
        "retnet": sf.RetNetConfig(vocab_size=97, embed_dim=32, value_dim=48, layers=2, heads=2, ffn_dim=40,
                                  chunk_size=4, moe=MOE),
    }


@pytest.mark.parametrize("name", list(_models()))
def test_every_family_trains_with_moe_and_reports_aux_loss(name):
    cfg = _models()[name]
    torch.manual_seed(0)
    model = sf.build(cfg).train()
    data = torch.randint(0, 97, (4, 17))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def loss_fn():
        out = model(data[:, :-1], data[:, :-1]) if name == "encoder_decoder" else model(data[:, :-1])
        return F.cross_entropy(out.logits.flatten(0, 1), data[:, 1:].flatten()) + out.aux_loss, out.aux_loss

    first, aux = loss_fn()
    assert aux.item() > 0 and aux.requires_grad
    for _ in range(25):
        optimizer.zero_grad()
        loss, _ = loss_fn()
        loss.backward()
        optimizer.step()
    assert loss.item() < first.item() - 0.5
    layers = moe_layers(model)
    assert layers and all(layer.load is not None and layer.load.shape == (4,) for layer in layers)


@pytest.mark.parametrize("name", ["decoder", "retnet", "longnet"])
def test_cached_decoding_equals_full_forward_in_eval(name):
    model = make_model(_models()[name]) if name != "retnet" else sf.build(_models()[name]).eval()
    ids = torch.randint(0, 97, (2, 11))
    assert_close(decode_step_by_step(model, ids, 4), model(ids).logits)


def test_padding_does_not_change_real_tokens_in_eval():
    model = make_model(_models()["decoder"])
    rows = [torch.randint(0, 97, (n,)) for n in (7, 3)]
    ids, mask = torch.zeros(2, 7, dtype=torch.long), torch.zeros(2, 7, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, 7 - len(row):], mask[i, 7 - len(row):] = row, 1
    out = model(ids, attention_mask=mask).logits
    for i, row in enumerate(rows):
        assert_close(out[i, 7 - len(row):], model(row[None]).logits[0])


def test_which_layers_are_sparse():
    model = sf.build(tiny(layers=4, moe=MoEConfig(experts=2, every=2)))
    assert [isinstance(b.ffn, MoEFeedForward) for b in model.decoder.blocks] == [False, True, False, True]
    model = sf.build(tiny(layers=4, moe=MoEConfig(experts=2, layers=(0, 2))))
    assert [isinstance(b.ffn, MoEFeedForward) for b in model.decoder.blocks] == [True, False, True, False]
    with pytest.raises(sf.ConfigError, match=r"moe.layers \(5,\) must be < layers \(4\)"):
        tiny(layers=4, moe=MoEConfig(layers=(5,)))
    with pytest.raises(sf.ConfigError, match="moe and multiway"):
        tiny(multiway=2, moe=MoEConfig())
    assert sf.config_from_dict(sf.load_preset("gpt-moe-tiny").to_dict()) == sf.load_preset("gpt-moe-tiny")


def test_dense_model_aux_loss_is_zero_and_moe_presets_exist():
    assert sf.build(tiny())(torch.zeros(1, 3, dtype=torch.long)).aux_loss.item() == 0.0
    for name in ("gpt-moe-tiny", "retnet-moe-tiny"):
        assert sf.load_preset(name).moe is not None
