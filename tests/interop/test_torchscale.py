"""TorchScale checkpoints: build TorchScale's own models, copy random weights across, compare logits."""

import pytest
import torch

from scaleformer.interop.torchscale import convert_torchscale, import_torchscale, load_torchscale, torchscale_kind
from tests.conftest import assert_close, decode_step_by_step

try:
    import_torchscale()
except ImportError as error:  # the CI installs it (see .ci/run); elsewhere it is optional
    pytest.skip(f"torchscale not installed: {error}", allow_module_level=True)

from torchscale.architecture.config import DecoderConfig, EncoderConfig, EncoderDecoderConfig, RetNetConfig  # noqa: E402
from torchscale.architecture.decoder import Decoder  # noqa: E402
from torchscale.architecture.encoder import Encoder  # noqa: E402
from torchscale.architecture.encoder_decoder import EncoderDecoder  # noqa: E402
from torchscale.architecture.retnet import RetNetDecoder  # noqa: E402
from torchscale.component.embedding import PositionalEmbedding, TextEmbedding  # noqa: E402

VOCAB, DIM, LENGTH = 53, 32, 24
SIDE = dict(embed_dim=DIM, attention_heads=4, ffn_embed_dim=48, layers=2)


def _side(side: str) -> dict:
    return {f"{side}_{key}": value for key, value in SIDE.items()}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm weights around 1), so no converted tensor can hide behind its init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() == 1 and ("norm" in name or "layer_norm" in name or "ln" in name) and name.endswith("weight"):
                param.copy_(1 + 0.2 * noise)
            else:
                param.copy_(0.3 * noise / max(param.shape[-1], 1) ** 0.5 if param.dim() > 1 else 0.1 * noise)


def _positions(learned: bool):
    return PositionalEmbedding(LENGTH + 2, DIM) if learned else None


def build_decoder(learned=False, **options):
    config = DecoderConfig(vocab_size=VOCAB, **_side("decoder"), **options)
    model = Decoder(config, embed_tokens=TextEmbedding(VOCAB, DIM), embed_positions=_positions(learned))
    return config, model, lambda ids: model(ids)[0]


def build_encoder(learned=False, **options):
    config = EncoderConfig(vocab_size=VOCAB, **_side("encoder"), **options)
    config.encoder_embedding_type = "language"  # TorchScale 0.3.0 asserts on this option but never defines it
    model = Encoder(config, embed_tokens=TextEmbedding(VOCAB, DIM), embed_positions=_positions(learned))
    return config, model, lambda ids: model(ids)["encoder_out"]


def build_encoder_decoder(learned=False, **options):
    config = EncoderDecoderConfig(vocab_size=VOCAB, **_side("encoder"), **_side("decoder"), **options)
    shared = TextEmbedding(VOCAB, DIM)
    model = EncoderDecoder(config, encoder_embed_tokens=shared, encoder_embed_positions=_positions(learned),
                           decoder_embed_tokens=None if config.share_all_embeddings else TextEmbedding(VOCAB, DIM),
                           decoder_embed_positions=_positions(learned))
    return config, model, lambda ids: model(ids, ids.flip(1))[0]


def build_retnet(**options):
    config = RetNetConfig(vocab_size=VOCAB, decoder_embed_dim=DIM, decoder_value_embed_dim=48,
                          decoder_retention_heads=2, decoder_ffn_embed_dim=48, decoder_layers=2, **options)
    model = RetNetDecoder(config, embed_tokens=TextEmbedding(VOCAB, DIM))
    return config, model, lambda ids: model(ids)[0]


NO_SUBLN = dict(subln=False)
CASES = {
    "decoder-pre-learned-tied": (build_decoder, dict(learned=True, share_decoder_input_output_embed=True, **NO_SUBLN)),
    "decoder-post-untied": (build_decoder, dict(decoder_normalize_before=False, **NO_SUBLN)),
    "decoder-deepnorm-xpos": (build_decoder, dict(deepnorm=True, xpos_rel_pos=True, xpos_scale_base=32)),
    "decoder-subln-relative": (build_decoder, dict(rel_pos_buckets=16, max_rel_pos=32, layernorm_embedding=True,
                                                   no_scale_embedding=False)),
    "decoder-subln-xpos-swish": (build_decoder, dict(xpos_rel_pos=True, activation_fn="swish",
                                                     share_decoder_input_output_embed=True)),
    "encoder-subln-relative-tied": (build_encoder, dict(rel_pos_buckets=16, max_rel_pos=32,
                                                        share_encoder_input_output_embed=True)),
    "encoder-deepnorm-learned": (build_encoder, dict(learned=True, deepnorm=True, activation_fn="relu")),
    "encoder-multiway": (build_encoder, dict(multiway=True, layernorm_embedding=True)),
    "encdec-shared-subln-learned": (build_encoder_decoder, dict(learned=True, share_all_embeddings=True)),
    "encdec-deepnorm-xpos-separate": (build_encoder_decoder, dict(deepnorm=True, xpos_rel_pos=True)),
    "encdec-pre-tied-decoder": (build_encoder_decoder, dict(share_decoder_input_output_embed=True, **NO_SUBLN)),
    "retnet-default": (build_retnet, dict()),
    "retnet-deepnorm-swish-tied": (build_retnet, dict(deepnorm=True, activation_fn="swish",
                                                      share_decoder_input_output_embed=True)),
}


def _ours(model, kind: str, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    if kind == "encoder_decoder":
        return model(ids, ids.flip(1)).logits
    out = model(ids, **kwargs)
    return out.hidden_states if kind == "encoder" and kwargs.get("hidden") else out.logits


def _pair(name: str, seed: int = 0):
    builder, options = CASES[name]
    torch.manual_seed(seed)
    config, theirs, run = builder(**options)
    _randomize(theirs, seed)
    theirs.eval()
    return config, theirs, run


@pytest.mark.parametrize("name", list(CASES))
def test_converted_model_gives_torchscale_logits(name):
    config, theirs, run = _pair(name)
    ours = load_torchscale(theirs.state_dict(), config)
    kind = torchscale_kind(config)
    ids = torch.randint(0, VOCAB, (3, LENGTH))
    kwargs = {}
    if name == "encoder-multiway":  # the first 10 positions are one modality, the rest the other
        theirs_out = theirs(ids, multiway_split_position=10)["encoder_out"]
        kwargs["multiway_split"] = 10
    else:
        with torch.no_grad():
            theirs_out = run(ids)
    with torch.no_grad():
        assert_close(_ours(ours, kind, ids, **kwargs), theirs_out.detach())


def test_retnet_matches_torchscale_in_all_three_of_our_forms():
    config, theirs, run = _pair("retnet-default", seed=3)
    ours = load_torchscale(theirs.state_dict(), config)
    ids = torch.randint(0, VOCAB, (2, LENGTH))
    with torch.no_grad():
        expected = run(ids)
        short_chunks = type(ours)(ours.config.replace(chunk_size=5)).eval()
        short_chunks.load_state_dict(ours.state_dict())
        for form in ("parallel", "chunkwise", "recurrent"):
            assert_close(ours(ids, form=form).logits, expected)
            assert_close(short_chunks(ids, form=form).logits, expected)
        assert_close(decode_step_by_step(ours, ids, prefill=7), expected)


def test_retnet_needs_the_torchscale_normalizer():
    """Documents why the compatibility switch exists: with our default normalizer the logits differ."""
    config, theirs, run = _pair("retnet-default", seed=4)
    model = load_torchscale(theirs.state_dict(), config)
    assert model.config.normalizer == "torchscale"
    smooth = type(model)(model.config.replace(normalizer="smooth")).eval()
    smooth.load_state_dict(model.state_dict())
    ids = torch.randint(0, VOCAB, (2, LENGTH))
    with torch.no_grad():
        gap = (smooth(ids).logits - run(ids)).abs().max().item()
    assert gap > 1e-3, gap


def test_converted_decoder_decodes_with_its_cache():
    config, theirs, run = _pair("decoder-deepnorm-xpos")
    ours = load_torchscale(theirs.state_dict(), config)
    ids = torch.randint(0, VOCAB, (2, LENGTH))
    with torch.no_grad():
        assert_close(decode_step_by_step(ours, ids, prefill=5), run(ids))


def test_config_may_be_a_plain_mapping_of_constructor_options():
    config, theirs, _ = _pair("decoder-deepnorm-xpos")
    options = dict(vocab_size=VOCAB, **_side("decoder"), deepnorm=True, xpos_rel_pos=True, xpos_scale_base=32)
    from_object, _ = convert_torchscale(theirs.state_dict(), config)
    from_mapping, _ = convert_torchscale(theirs.state_dict(), options)
    assert from_object == from_mapping
    assert from_mapping.norm == "deepnorm" and from_mapping.position == "xpos"


def test_unconvertible_models_are_refused_with_the_reason():
    config, theirs, _ = _pair("decoder-post-untied")
    with pytest.raises(ValueError, match="MoE"):
        convert_torchscale(theirs.state_dict(), {**vars(config), "moe_freq": 2, "moe_expert_count": 4})
    with pytest.raises(ValueError, match="embed_tokens"):
        convert_torchscale({k: v for k, v in theirs.state_dict().items() if k != "embed_tokens.weight"}, config)
    state = dict(theirs.state_dict(), **{"layers.0.mystery.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="layers.0.mystery.weight"):
        convert_torchscale(state, config)
    with pytest.raises(ValueError, match="normalize_output"):
        convert_torchscale({"embed_tokens.weight": torch.zeros(VOCAB, DIM)},
                           {**_side("encoder"), "subln": False, "normalize_output": False})


def test_cli_converts_a_saved_state_dict(tmp_path, capsys):
    import json

    import scaleformer as sf
    from scaleformer.cli import main

    config, theirs, run = _pair("retnet-deepnorm-swish-tied")
    torch.save({"model": theirs.state_dict()}, tmp_path / "checkpoint.pt")
    options = {k: v for k, v in vars(config).items() if isinstance(v, (int, float, str, bool))}
    (tmp_path / "config.json").write_text(json.dumps(options))
    assert main(["convert-torchscale", "--weights", str(tmp_path / "checkpoint.pt"), "--config",
                 str(tmp_path / "config.json"), "--out", str(tmp_path / "ours")]) == 0
    ids = torch.randint(0, VOCAB, (2, LENGTH))
    with torch.no_grad():
        assert_close(sf.load(tmp_path / "ours")(ids).logits, run(ids))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert main(["convert-torchscale", "--weights", str(tmp_path / "bad.pt"), "--config",
                 str(tmp_path / "config.json"), "--out", str(tmp_path / "never")]) == 2
    assert not (tmp_path / "never").exists()
    state = theirs.state_dict()
    name = next(k for k in sorted(state) if state[k].dim() == 2 and "embed" not in k)
    torch.save({"model": {**state, name: state[name][:-1]}}, tmp_path / "misshapen.pt")
    capsys.readouterr()
    assert main(["convert-torchscale", "--weights", str(tmp_path / "misshapen.pt"), "--config",
                 str(tmp_path / "config.json"), "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a tensor does not fit the model its config describes (size mismatch" in err, err
    assert not (tmp_path / "never").exists()


def test_relative_bias_decoder_decodes_after_conversion_where_torchscale_cannot():
    """TorchScale slices its (batch·heads, q, k) bias with [-1:] on the first axis during cached decoding,
    so its own incremental decoding with relative positions fails; the converted model decodes exactly."""
    config, theirs, run = _pair("decoder-subln-relative")
    ids = torch.randint(0, VOCAB, (2, LENGTH))
    with torch.no_grad():
        with pytest.raises(RuntimeError):
            theirs(ids[:, :1], incremental_state={})
        ours = load_torchscale(theirs.state_dict(), config)
        assert_close(decode_step_by_step(ours, ids, prefill=1), run(ids))


def test_timm_stand_in_when_timm_is_broken(monkeypatch):
    """A CUDA torchvision beside CPU torch makes `import timm` raise RuntimeError: TorchScale still imports."""
    import importlib.abc
    import sys

    class BrokenTimm(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "timm" or name.startswith("timm."):
                raise RuntimeError("operator torchvision::nms does not exist")
            return None

    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [BrokenTimm(), *sys.meta_path])
    import_torchscale()
    drop_path = sys.modules["timm.models.layers"].drop_path
    x = torch.ones(64, 3)
    assert torch.equal(drop_path(x, 0.5, training=False), x)
    kept = drop_path(x, 0.5, training=True)
    assert set(kept[:, 0].tolist()) <= {0.0, 2.0} and torch.equal(kept, kept[:, :1].expand_as(kept))


@pytest.mark.parametrize("top_k", [1, 2])
def test_xmoe_torchscale_router_equals_torchscales_gate(top_k, monkeypatch):
    """router="xmoe_torchscale" gives TorchScale's combine weights (Top1Gate/Top2Gate with use_xmoe),
    including after TorchScale has renormalized its expert embeddings to norm 1.5 in place."""
    histc = torch.histc  # TorchScale's routing logs a histogram of integer ids, which CPU histc refuses
    monkeypatch.setattr(torch, "histc", lambda x, *args, **kwargs: histc(x.float(), *args, **kwargs))
    from torchscale.component.xmoe.routing import Top1Gate, Top2Gate

    from scaleformer.layers.moe import TorchScaleXMoERouter
    from scaleformer.ops.moe import route

    torch.manual_seed(3)
    experts, tokens = 5, 23
    gate = (Top1Gate(DIM, experts, use_xmoe=True, moe_eval_capacity_token_fraction=1.0) if top_k == 1 else
            Top2Gate(DIM, experts, use_xmoe=True, second_expert_policy="all", moe_eval_capacity_token_fraction=1.0))
    gate.eval()
    ours = TorchScaleXMoERouter(DIM, experts, dim=16)
    with torch.no_grad():
        ours.projection.weight.copy_(gate.wg_reduction.weight)
        ours.expert_embeddings.copy_(gate.wg)  # norms ~0.32 here; TorchScale rescales its own copy to 1.5
    x = torch.randn(tokens, DIM)
    for _ in range(2):  # the second call sees TorchScale's embeddings already at norm 1.5
        _, combine, _, _ = gate(x)
        theirs = combine.sum(-1)  # (N, E): each token's weight for each expert
        probs, balance = ours(x)
        routing = route(probs, top_k=top_k, capacity=None, normalize_gates=True)
        mine = torch.zeros(tokens, experts).index_put((routing.token, routing.expert), routing.gate)
        assert_close(mine, theirs)
        assert torch.equal(probs, balance)
    assert_close(gate.wg.norm(dim=-1), torch.full((experts,), 1.5))
