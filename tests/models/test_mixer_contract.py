"""The mixer contract, checked for every mixer there is.

The cases come from the mixers themselves: every registered :class:`MixerConfig` (``MixerConfig.members()``,
the open union a layer's ``mixer`` accepts) gives small examples of itself (``examples()``), one per pattern
it has. A new mixer is picked up here without an edit, and fails loudly if it gives no example. In float64
(exactness lives there: rounding ~1e-16 per operation, so 1e-10 relative is far outside it), each example
must:

- decode exactly: a prefill, then one token per call, equals the full forward;
- ignore left padding, also while decoding;
- give packed documents what each gets alone;
- keep batch rows through a beam ``reorder`` of its state;
- round-trip through ``sf.save``/``sf.load`` (bit-for-bit) and its config through JSON;
- generate through Hugging Face's ``generate`` the tokens ``sf.generate`` gives;
- send a gradient to every parameter;
- honour each model option its support declares, and refuse each one it does not with a ConfigError
  naming the layer.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import scaleformer as sf
from scaleformer.config import ConfigError, config_from_dict
from scaleformer.models.architecture import MixerConfig
from tests.conftest import assert_close, decode_step_by_step

VOCAB, WIDTH = 61, 16

CASES = {f"{member.kind}:{name}": mixers for member in MixerConfig.members()
         for name, mixers in member.examples().items()}


def test_every_mixer_gives_examples_of_itself():
    for member in MixerConfig.members():
        examples = member.examples()
        assert examples, f"{member.__name__}.examples() is empty"
        for mixers in examples.values():
            assert any(isinstance(m, member) for m in mixers), f"an example of {member.__name__} does not use it"
    assert len(MixerConfig.members()) >= 7 and len(CASES) >= len(MixerConfig.members())


def model_config(mixers, **options) -> sf.ModelConfig:
    """Each mixer a layer of width 16 with a small MLP; RoPE when a mixer reads rotary positions."""
    rotary = any(m.rotated_heads() is not None for m in mixers)
    base = dict(vocab_size=VOCAB, embed_dim=WIDTH, position=sf.RoPE() if rotary else sf.NoPosition(),
                layers=tuple(sf.LayerConfig(mixer=m, ffn=sf.MLP(ffn_dim=24)) for m in mixers))
    return sf.ModelConfig(**{**base, **options})


def build(cfg, seed: int = 0) -> torch.nn.Module:
    """float64, evaluation mode, norms and biases moved off 1 and 0 so the checks see them."""
    torch.manual_seed(seed)
    model = sf.build(cfg).double().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(params=list(CASES))
def case(request):
    return request.param, CASES[request.param]


def test_decoding_equals_the_full_forward(case):
    _, mixers = case
    model = build(model_config(mixers))
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        assert_close(decode_step_by_step(model, ids, prefill=4), model(ids).logits, torch.float64)
        assert_close(decode_step_by_step(model, ids, prefill=1), model(ids).logits, torch.float64)


def test_left_padding_changes_nothing_also_while_decoding(case):
    _, mixers = case
    model = build(model_config(mixers))
    ids = torch.randint(1, VOCAB, (2, 9))
    padded = ids.clone()
    padded[0, :3] = 0
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        full = model(padded, attention_mask=mask).logits
        assert_close(full[0, 3:], model(ids[:1, 3:]).logits[0], torch.float64)
        assert_close(full[1], model(ids[1:]).logits[0], torch.float64)
        out = model(padded[:, :5], attention_mask=mask[:, :5], use_cache=True)
        steps = [out.logits]
        for t in range(5, 9):
            out = model(padded[:, t:t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
        assert_close(torch.cat(steps, 1), full, torch.float64)


def test_packed_documents_equal_each_document_alone(case):
    _, mixers = case
    model = build(model_config(mixers))
    lengths = [[3, 5, 4], [7, 5]]
    ids = torch.randint(0, VOCAB, (2, 12))
    documents = torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in lengths])
    with torch.no_grad():
        packed = model(ids, document_ids=documents).logits
        for b in range(2):
            for d in range(len(lengths[b])):
                alone = documents[b] == d
                assert_close(packed[b, alone], model(ids[b, alone][None]).logits[0], torch.float64)


def test_reorder_keeps_the_chosen_rows(case):
    _, mixers = case
    model = build(model_config(mixers))
    ids = torch.randint(0, VOCAB, (3, 8))
    index = torch.tensor([2, 0, 0])
    with torch.no_grad():
        out = model(ids[:, :5], use_cache=True)
        out.cache.reorder(index)
        steps = []
        for t in range(5, 8):
            out = model(ids[index, t:t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
        assert_close(torch.cat(steps, 1), model(ids[index]).logits[:, 5:], torch.float64)


def test_a_compiled_decoding_step_is_the_models_own_step(case):
    """Every mixer with a ``decode_step`` (scaleformer.compiled_decoding) decodes through it what the model's
    forward decodes — logits, states, positions — from a left-padded prefill and from an empty cache; a mixer
    without one is refused by name. Traced by dynamo (fullgraph) but run uncompiled ("eager" backend): the
    step's arithmetic, checked here for every mixer; inductor's code is the `compiled` tier's
    (tests/test_compiled_decoding.py)."""
    from scaleformer.compiled_decoding import CompiledDecoding, unsupported_reason

    name, mixers = case
    model = build(model_config(mixers))
    reason = unsupported_reason(model)
    if reason is not None:
        assert "has no decode_step" in reason
        assert not all(hasattr(block.mixer, "decode_step") for block in model.decoder.blocks)
        with pytest.raises(ValueError, match="compiled decoding: layer"):
            CompiledDecoding(model, backend="eager")
        return
    step = CompiledDecoding(model, backend="eager")
    ids = torch.randint(1, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        theirs = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True).cache
        ours = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True).cache
        empty_theirs, empty_ours = model.new_cache(), model.new_cache()
        for t in range(5, 9):
            token = ids[:, t:t + 1]
            assert_close(step(token, ours).logits, model(token, cache=theirs).logits, torch.float64)
            assert_close(step(token, empty_ours).logits, model(token, cache=empty_theirs).logits, torch.float64)
    for a, b in ((ours, theirs), (empty_ours, empty_theirs)):
        assert torch.equal(a.next_position, b.next_position) and a.length == b.length
        for x, y in zip(a.layers, b.layers):
            assert_close(x.state, y.state, torch.float64)


def test_save_load_and_json_round_trip(case, tmp_path):
    _, mixers = case
    cfg = model_config(mixers)
    assert config_from_dict(cfg.to_dict()) == cfg
    assert sf.ModelConfig.from_json(cfg.to_json()) == cfg
    model = build(cfg)
    sf.save(model, tmp_path / "model")
    loaded = sf.load(tmp_path / "model")
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_hugging_face_generate_equals_ours(case):
    pytest.importorskip("transformers")
    from scaleformer.hf import wrap

    _, mixers = case
    model = build(model_config(mixers))
    prompts = torch.randint(1, VOCAB, (2, 5))
    mask = torch.ones_like(prompts)
    mask[0, :2] = 0
    prompts[0, :2] = 0
    ours = sf.generate(model, prompts, 6, attention_mask=mask, stop_tokens=None)
    theirs = wrap(model).generate(prompts, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                  eos_token_id=None)
    assert torch.equal(theirs[:, prompts.shape[1]:], ours[:, -6:])


def test_every_parameter_gets_a_gradient(case):
    _, mixers = case
    model = build(model_config(mixers)).train()
    ids = torch.randint(0, VOCAB, (2, 12))
    logits = model(ids).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    silent = [name for name, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not silent, f"no gradient reaches {silent}"


# The model options a mixer declares it supports (MixerSupport), each with how to switch it on.
OPTIONS = {"bidirectional": dict(causal=False), "inner_norm": dict(residual=sf.SubLN()),
           "multiway": dict(multiway=sf.MultiwayConfig(scope="all"))}


def _first_refusing(mixers, option: str) -> int | None:
    return next((i for i, m in enumerate(mixers) if not getattr(m.support, option)), None)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_option_is_honoured_or_refused_naming_the_layer(case, option):
    _, mixers = case
    refusing = _first_refusing(mixers, option)
    if refusing is not None:
        with pytest.raises(ConfigError) as error:
            model_config(mixers, **OPTIONS[option])
        assert error.value.path == f"layers[{refusing}]" and mixers[refusing].title in error.value.message
        return
    with_option = build(model_config(mixers, **OPTIONS[option]))
    if option == "bidirectional":  # the earlier tokens' outputs now depend on the last token
        ids = torch.randint(0, VOCAB, (1, 8))  # a multiple of the dilated examples' longest segment
        changed = ids.clone()
        changed[0, -1] = (changed[0, -1] + 1) % VOCAB
        with torch.no_grad():
            assert not torch.allclose(with_option(ids).logits[0, :-1], with_option(changed).logits[0, :-1])
        return
    # Sub-LN adds the mixer's inner norm; multiway scope "all" adds per-modality copies of its projections
    without = build(model_config(mixers))
    for block_with, block_without in zip(with_option.decoder.blocks, without.decoder.blocks):
        grown = sum(p.numel() for p in block_with.mixer.parameters()) > sum(
            p.numel() for p in block_without.mixer.parameters())
        assert grown, f"{option} changed nothing in {type(block_with.mixer).__name__}"


def test_model_positions_reach_the_mixers_that_read_them(case):
    _, mixers = case
    readers = [m for m in mixers if m.support.model_positions]
    rotating = any(m.rotated_heads() is not None for m in mixers)
    if not rotating:  # its mixers carry their own positions: rotary or relative ones would be ignored
        for position in (sf.RoPE(), sf.T5Bias()):
            with pytest.raises(ConfigError):
                model_config(mixers, position=position)
        return
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        rotary = build(model_config(mixers))(ids).logits
        none = build(model_config(mixers, position=sf.NoPosition()))(ids).logits
    assert not torch.allclose(rotary, none)
    t5 = [m for m in readers if m.support.relative_bias]
    if len(t5) < len(readers):
        with pytest.raises(ConfigError, match="T5 relative bias"):
            model_config(mixers, position=sf.T5Bias())
