"""Lightning attention / TransNormerLLM's token mixer: the three decay formulas by hand, the layer against
its formula written out, and the equivalences of a decoder (forms, cached decoding, padding, packing)."""

import pytest
import torch
import torch.nn.functional as F

import scaleformer as sf
from scaleformer.layers.lightning import LightningAttention, lightning_log_decays
from tests.conftest import assert_close, decode_step_by_step


def tnl(dtype=torch.float32, **mixer):
    cfg = sf.ModelConfig(vocab_size=97, embed_dim=32, position=sf.NoPosition(), norm_type="rmsnorm",
                         layers=sf.uniform(sf.LayerConfig(mixer=sf.Lightning(**{"heads": 4, "chunk_size": 4, **mixer}),
                                                          ffn=sf.GLU(ffn_dim=48, activation="none")), 3))
    torch.manual_seed(0)
    return sf.build(cfg).to(dtype).eval()


def test_decay_formulas_by_hand():
    code = lightning_log_decays(4, 0, 3, "code")
    assert_close(code, -torch.tensor([2**-2, 2**-4, 2**-6, 2**-8], dtype=torch.float64) * (1 + 1e-5), torch.float64)
    assert_close(lightning_log_decays(4, 2, 3, "code"), code / (1 + 1e-5) * 1e-5, torch.float64)  # last layer
    # six heads: ALiBi's four slopes, then every other one of eight (2^-1, 2^-3)
    six = -lightning_log_decays(6, 0, 2, "code") / (1 + 1e-5)
    assert_close(six, torch.tensor([2.0 ** (-2 * h) for h in (1, 2, 3, 4)] + [2**-1, 2**-3],
                                   dtype=torch.float64), torch.float64)
    assert_close(lightning_log_decays(4, 1, 4, "paper"), -torch.tensor([2.0, 4.0, 6.0, 8.0], dtype=torch.float64) * 0.75,
                 torch.float64)
    assert_close(lightning_log_decays(4, 1, 4, "fla"), -torch.tensor([0.0, 2.0, 4.0, 6.0], dtype=torch.float64) * 0.75,
                 torch.float64)
    with pytest.raises(ValueError, match="lightning decay formula"):
        lightning_log_decays(4, 0, 2, "alibi")


@pytest.mark.parametrize("decay", ["code", "paper", "fla"])
def test_the_layer_is_transnormers_formula_written_out(decay):
    layer = LightningAttention(32, sf.Lightning(heads=4, decay=decay, chunk_size=3), layer=1, layers=3).double()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    out, _ = layer.mix(x, form="chunkwise")
    split = lambda t: t.view(2, 7, 4, 8).transpose(1, 2)  # noqa: E731
    q, k = split(F.silu(x @ layer.q_proj.weight.T)), split(F.silu(x @ layer.k_proj.weight.T))
    v, u = split(x @ layer.v_proj.weight.T), x @ layer.u_proj.weight.T
    lam = lightning_log_decays(4, 1, 3, decay).exp()
    t = torch.arange(7)
    decay_matrix = torch.where(t[:, None] >= t[None, :], lam[:, None, None] ** (t[:, None] - t[None, :]), 0.0)
    o = ((q @ k.transpose(-1, -2)) * decay_matrix) @ v  # (B, H, T, D): Σ_{s≤t} λ^{t−s} (q_t·k_s) v_s
    o = o.transpose(1, 2).reshape(2, 7, 32)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert_close(out, (u * o) @ layer.out_proj.weight.T, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forms_agree_and_prefill_then_steps_equal_the_full_forward(dtype):
    model = tnl(dtype)
    ids = torch.randint(0, 97, (2, 13))
    full = model(ids, form="parallel").logits
    for form in ("chunkwise", "recurrent"):
        assert_close(model(ids, form=form).logits, full, dtype)
    for prefill in (1, 6):
        assert_close(decode_step_by_step(model, ids, prefill), full, dtype)


def test_left_padding_and_packed_documents():
    model = tnl(torch.float64)
    rows = [torch.randint(0, 97, (n,)) for n in (9, 4)]
    ids, mask = torch.zeros(2, 9, dtype=torch.long), torch.zeros(2, 9, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, 9 - len(row):], mask[i, 9 - len(row):] = row, 1
    out = model(ids, attention_mask=mask).logits
    for i, row in enumerate(rows):
        assert_close(out[i, 9 - len(row):], model(row[None]).logits[0], torch.float64)
    packed = model(torch.cat(rows)[None], document_ids=torch.tensor([[0] * 9 + [1] * 4])).logits[0]
    assert_close(packed[:9], model(rows[0][None]).logits[0], torch.float64)
    assert_close(packed[9:], model(rows[1][None]).logits[0], torch.float64)


def test_the_state_is_fixed_and_layers_decay_differently():
    model = tnl()
    out = model(torch.randint(0, 97, (2, 20)), use_cache=True)
    assert out.cache.nbytes() == 3 * 2 * 4 * 8 * 8 * 4  # layers · B · H · D · D · fp32, whatever the length
    decays = [block.mixer.decay_schedule for block in model.decoder.blocks]
    assert [d[1:3] for d in decays] == [(0, 3), (1, 3), (2, 3)]


def test_preset_round_trip_and_config_errors(tmp_path):
    cfg = sf.load_preset("tnl-tiny")
    assert sf.config_from_dict(cfg.to_dict()) == cfg and cfg.layers[0].mixer.kind == "lightning"
    model = sf.build(cfg)
    ids = torch.randint(0, 512, (1, 5))
    sf.save(model, tmp_path / "m")
    assert torch.equal(sf.load(tmp_path / "m")(ids).logits, model(ids).logits)
    with pytest.raises(sf.ConfigError, match="lightning attention is causal"):
        sf.ModelConfig(causal=False, vocab_size=97, embed_dim=32, layers=(sf.LayerConfig(mixer=sf.Lightning(heads=4)),))
    with pytest.raises(sf.ConfigError, match=r"lightning heads \(5\) must divide embed_dim"):
        sf.ModelConfig(vocab_size=97, embed_dim=32, layers=(sf.LayerConfig(mixer=sf.Lightning(heads=5)),))
    with pytest.raises(sf.ConfigError, match="activation"):
        sf.MLP(activation="none")  # "none" is for gated units only
