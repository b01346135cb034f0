"""Mamba-2 against a token-by-token float64 loop written from its recurrence (PAPERS.md Part 3 §3), using the
layer's own parameters: h_t = exp(Δ_t A) h_{t−1} + (Δ_t x_t) B_tᵀ, y_t = h_t C_t + D x_t, then
RMSNorm(y ⊙ silu(z)) per group and the output projection. Outputs and every gradient within 1e-10 relative
in float64, in every form, with padding, carried state (the convolution window and the SSM state) and chunk
sizes 1, odd and longer than T; decoding, packing and the rest are the conformance suite's."""

import pytest
import torch
import torch.nn.functional as F

import scaleformer as sf
from scaleformer.layers.context import Context
from scaleformer.layers.mamba2 import Mamba2Layer
from tests.conftest import assert_close


def loop(layer: Mamba2Layer, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's computation, one token at a time, from its definition."""
    b, t, _ = x.shape
    inner, groups, n, p, h = layer.inner, layer.groups, layer.state_dim, layer.head_dim, layer.heads
    z, mixed, dt = layer.in_proj(x).split([inner, inner + 2 * groups * n, h], -1)
    if mask is not None:
        mixed = mixed * mask[..., None]
    window = torch.cat([mixed.new_zeros(b, layer.conv_size - 1, mixed.shape[-1]), mixed], 1)
    state = x.new_zeros(b, h, p, n)  # the paper's layout: h_t ∈ R^{P×N} per head
    a_rate = -layer.A_log.exp()
    outputs = []
    for step in range(t):
        conv = F.silu((window[:, step:step + layer.conv_size] * layer.conv_weight.T).sum(1) + layer.conv_bias)
        xs, bs, cs = conv.split([inner, groups * n, groups * n], -1)
        xs = xs.view(b, h, p)
        bs, cs = (c.view(b, groups, n).repeat_interleave(h // groups, dim=1) for c in (bs, cs))  # (B, H, N)
        delta = F.softplus(dt[:, step] + layer.dt_bias)  # (B, H)
        decay, write = torch.exp(delta * a_rate), delta
        if mask is not None:  # padding: no decay, no write
            real = mask[:, step][:, None]
            decay, write = decay * real + (1 - real), write * real
        state = decay[..., None, None] * state + (write[..., None] * xs)[..., :, None] * bs[..., None, :]
        outputs.append(torch.einsum("bhpn,bhn->bhp", state, cs) + layer.D[:, None] * xs)
    y = torch.stack(outputs, 1).flatten(2)  # (B, T, inner)
    gated = (y * F.silu(z)).unflatten(-1, (groups, -1))
    normed = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + layer.norm_eps)
    out = layer.out_proj(normed.flatten(2) * layer.norm_weight)
    return out if mask is None else out * mask[..., None]


def _layer(groups=1, chunk=3):
    torch.manual_seed(0)
    layer = Mamba2Layer(16, sf.Mamba2(state_dim=4, head_dim=4, groups=groups, chunk_size=chunk)).double()
    with torch.no_grad():  # decays spread from near 0 to near 1 and a non-trivial skip and norm
        layer.A_log.copy_(torch.linspace(-3, 1.5, layer.heads))
        layer.D.add_(torch.randn(layer.heads) * 0.3)
        layer.norm_weight.add_(torch.randn(layer.inner) * 0.1)
    return layer


def _context(x, mask=None, form=None):
    b, t, _ = x.shape
    positions = torch.arange(t).expand(b, t)
    return Context(positions=positions, key_positions=positions, causal=True, token_mask=mask, key_mask=mask,
                   form=form)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("form, chunk", [("recurrent", 64), ("parallel", 64), ("chunkwise", 1), ("chunkwise", 3),
                                         ("chunkwise", 64)])
def test_every_form_is_the_recurrence_in_outputs_and_gradients(groups, form, chunk):
    layer = _layer(groups, chunk)
    x = torch.randn(2, 11, 16, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 11, dtype=torch.float64)
    mask[0, :3] = 0  # left padding
    got = layer(x, _context(x, mask.bool(), form)) * mask[..., None]
    want = loop(layer, x, mask)
    assert_close(got, want, torch.float64)
    weights = torch.randn_like(want)
    grads = [torch.autograd.grad((y * weights).sum(), [x, *layer.parameters()]) for y in (got, want)]
    for g, w in zip(*grads):
        assert_close(g, w, torch.float64)


def test_a_prefill_then_steps_carries_the_convolution_window_and_the_state():
    layer = _layer(chunk=3)
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    state = layer.new_state()
    parts = [layer(x[:, :7], _context(x[:, :7]), state)]
    for t in range(7, 13):
        positions = torch.full((2, 1), t)
        ctx = Context(positions=positions, key_positions=positions, causal=True, past=0)
        parts.append(layer(x[:, t:t + 1], ctx, state))
    assert_close(torch.cat(parts, 1), loop(layer, x), torch.float64)
    assert state.state.shape == (2, layer.heads, 4, 4) and state.conv.shape == (2, 3, layer.inner + 2 * 4)


def test_the_presets_have_mamba_ssm_shapes_and_train_from_the_command_line(tmp_path):
    import json

    from scaleformer.cli import main

    with torch.device("meta"):
        parameters = sum(p.numel() for p in sf.build(sf.load_preset("mamba2-base")).parameters())
    assert 128e6 < parameters < 131e6  # mamba2-130m: 768 wide, 24 layers, state 128, heads of 64
    out = tmp_path / "run"
    assert main(["train", "--model", "mamba2-tiny", "--steps", "4", "--batch-size", "2", "--seq-len", "32",
                 "--eval-every", "4", "--out", str(out), "--samples", "0", "--no-progress"]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics if "loss" in m)
    with pytest.raises(sf.ConfigError, match=r"head_dim \(48\) must divide expand × embed_dim \(128\)"):
        sf.load_preset("mamba2-tiny", head_dim=48)


def test_mqar_takes_it_as_a_fixed_state_mixer():
    from scaleformer.reproduce.mqar import FIXED_STATE, MIXERS

    cfg = MIXERS["mamba2"](32, 2, 2, 64, 64)
    assert "mamba2" in FIXED_STATE and {layer.mixer.kind for layer in cfg.layers} == {"mamba2"}
    assert len(cfg.layers) == 4 and all(layer.ffn is None for layer in cfg.layers)
    sf.build(cfg)
