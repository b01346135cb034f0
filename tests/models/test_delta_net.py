"""DeltaNet and Gated DeltaNet as models (the layer's contract is checked for every mixer in
test_mixer_contract.py; the op against a float64 loop in tests/ops/test_delta_rule.py): the layer is the
published one written out, the presets train from the command line, and MQAR takes both."""

import json

import pytest
import torch
import torch.nn.functional as F

import scaleformer as sf
from scaleformer.layers.context import Context
from tests.conftest import assert_close


def test_the_gated_layer_is_its_parts_written_out():
    torch.manual_seed(0)
    spec = sf.GatedDeltaNet(heads=2, value_heads=4, key_dim=4, value_dim=3, conv_size=3)
    model_cfg = sf.ModelConfig(vocab_size=11, embed_dim=8, position=sf.NoPosition(),
                               layers=(sf.LayerConfig(mixer=spec),))
    layer = spec.build(model_cfg, gain=1.0).double()
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    positions = torch.arange(6)[None]
    got = layer(x, Context(positions=positions, key_positions=positions, causal=True))
    # written out token by token from the definitions (fla's layer, PAPERS.md Part 3 §1–2)
    channels = torch.cat([layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)], -1)
    padded = F.pad(channels, (0, 0, 2, 0))
    conv = F.silu(sum(padded[:, i:i + 6] * layer.conv_weight[:, i] for i in range(3)))
    q, k, v = conv.split([8, 8, 12], -1)
    l2 = lambda z: z / torch.sqrt((z * z).sum(-1, keepdim=True) + 1e-6)  # noqa: E731
    q, k = (l2(z.view(1, 6, 2, 4)).repeat_interleave(2, dim=2) for z in (q, k))
    v = v.view(1, 6, 4, 3)
    beta = torch.sigmoid(layer.b_proj(x))
    g = -layer.A_log.exp() * F.softplus(layer.a_proj(x) + layer.dt_bias)
    state = torch.zeros(4, 4, 3, dtype=torch.float64)
    outputs = []
    for t in range(6):
        state = state * g[0, t, :, None, None].exp()
        state = state + beta[0, t, :, None, None] * k[0, t, :, :, None] * (
            v[0, t, :, None, :] - torch.einsum("hkv,hk->hv", state, k[0, t])[:, None, :])
        outputs.append(torch.einsum("hkv,hk->hv", state, q[0, t] / 2.0))
    o = torch.stack(outputs)[None]  # (1, T, H_v, V)
    normed = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * layer.norm_weight
    gated = normed * F.silu(layer.g_proj(x).view(1, 6, 4, 3))
    assert_close(got, layer.out_proj(gated.flatten(2)), torch.float64)


def test_the_presets_train_from_the_command_line(tmp_path):
    from scaleformer.cli import main

    for preset in ("gdn-tiny", "gdn-hybrid-tiny"):
        out = tmp_path / preset
        assert main(["train", "--model", preset, "--steps", "6", "--batch-size", "2", "--seq-len", "32",
                     "--eval-every", "6", "--out", str(out), "--samples", "0", "--no-progress"]) == 0
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert metrics and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics if "loss" in m)
        model = sf.load(sorted((out / "checkpoints").glob("step_*"))[-1])
        assert [layer.mixer.kind for layer in model.config.layers][:3] == ["gated_deltanet"] * (2 if preset == "gdn-tiny" else 3)


def test_mqar_takes_both_and_counts_them_as_fixed_state():
    from scaleformer.reproduce.mqar import FIXED_STATE, MIXERS

    for name in ("deltanet", "gated_deltanet"):
        cfg = MIXERS[name](32, 2, 2, 64, 64)
        assert name in FIXED_STATE and {layer.mixer.kind for layer in cfg.layers} == {name}
        sf.build(cfg)


def test_partial_rope_turns_only_its_share_of_each_head_and_decodes_exactly():
    """Qwen3-Next's partial RoPE (fraction 0.25): the unrotated channels pass unchanged, the rotated ones are
    full RoPE on a head of that width, and the hybrid decodes token by token as it reads the whole row."""
    from scaleformer.layers.positions import Rotary
    from tests.conftest import assert_close, decode_step_by_step

    x = torch.randn(2, 3, 9, 16, dtype=torch.float64)
    positions = torch.arange(9).expand(2, 9)
    partial = Rotary(16, rotated=4)(x, positions, is_query=True)
    assert torch.equal(partial[..., 4:], x[..., 4:])
    assert_close(partial[..., :4], Rotary(4)(x[..., :4], positions, is_query=True), torch.float64)
    cfg = sf.load_preset("gdn-hybrid-tiny", vocab_size=97, rope_fraction=0.25)
    assert cfg.position == sf.RoPE(fraction=0.25)
    torch.manual_seed(0)
    model = sf.build(cfg).double().eval()
    ids = torch.randint(0, 97, (2, 11))
    assert_close(decode_step_by_step(model, ids, 4), model(ids).logits, torch.float64)
    with pytest.raises(sf.ConfigError, match="turns fraction × head width = 4.8 channels: it must be an even count"):
        sf.load_preset("gdn-hybrid-tiny", rope_fraction=0.3)
