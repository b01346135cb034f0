"""scaleformer.compiled_decoding: a recurrent model's decoding step as one compiled function.

The default tier (with the conformance suite's check of every mixer's ``decode_step``,
tests/models/test_mixer_contract.py) checks the step's arithmetic and its bookkeeping with the "eager" backend (dynamo traces
the whole step — fullgraph, so a graph break fails — and runs the traced graph without generating code):
every model option the step covers against the model's own forward, in float64, and every refusal. The
`compiled` tier (``python -m pytest -q -m compiled``, a CI step of its own: inductor compiles C++ for each
model, 10–35 s apiece on 2 cores) checks inductor's generated code the same way, in float64 and float32,
and the places that use it: ``generate(compile=True)``, ``scaleformer generate --compile`` and ``scaleformer
bench torchscale``'s compiled cells.
"""

from __future__ import annotations

import copy

import pytest
import torch

import scaleformer as sf
from scaleformer.compiled_decoding import CompiledDecoding, compiled_step, unsupported_reason
from tests.conftest import assert_close

VOCAB = 61


def _retnet(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = sf.RetNetConfig(**{**dict(vocab_size=VOCAB, embed_dim=16, value_dim=24, ffn_dim=24, heads=2, layers=2),
                            **options})
    model = sf.build(cfg).double().eval()
    with torch.no_grad():  # norms off 1, so a norm left out or applied twice shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def _retention_model(**options) -> torch.nn.Module:
    """A ModelConfig of retention layers, for the options a RetNetConfig does not have."""
    torch.manual_seed(0)
    layers = tuple(sf.LayerConfig(mixer=sf.Retention(heads=2, value_dim=24), ffn=sf.MLP(ffn_dim=24)) for _ in range(2))
    cfg = sf.ModelConfig(**{**dict(vocab_size=VOCAB, embed_dim=16, layers=layers, position=sf.NoPosition()), **options})
    return sf.build(cfg).double().eval()


def _assert_steps_agree(model, backend: str, dtype: torch.dtype = torch.float64, scale: float = 1.0,
                        batch: int = 2) -> None:
    """From a left-padded prefill and from an empty cache, three steps each: the compiled step's logits,
    states, positions and lengths are the model's own."""
    step = CompiledDecoding(model, backend=backend)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (batch, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        theirs = model(ids[:, :4], attention_mask=mask[:, :4], use_cache=True).cache
        ours = copy.deepcopy(theirs)
        empty_theirs, empty_ours = model.new_cache(), model.new_cache()
        for t in range(4, 7):
            token = ids[:, t:t + 1]
            assert_close(step(token, ours).logits, model(token, cache=theirs).logits, dtype, scale)
            assert_close(step(token, empty_ours).logits, model(token, cache=empty_theirs).logits, dtype, scale)
    for a, b in ((ours, theirs), (empty_ours, empty_theirs)):
        assert torch.equal(a.next_position, b.next_position) and a.length == b.length
        for x, y in zip(a.layers, b.layers):
            assert x.state.dtype == y.state.dtype
            assert_close(x.state, y.state, dtype, scale)


@pytest.mark.parametrize("options", [
    {}, {"decay": "gated", "normalizer": "none"}, {"decay": "gated"}, {"normalizer": "torchscale"},
    {"decay": "paper", "ffn": "mlp", "activation": "gelu"}, {"norm": "deepnorm", "layers": 3},
    {"tie_embeddings": False, "scale_embeddings": False, "embedding_norm": True, "norm_type": "layernorm"},
], ids=["retnet", "gated-none", "gated-smooth", "torchscale", "paper-mlp", "deepnorm", "untied-layernorm"])
def test_the_step_is_the_models_own_for_every_retnet_option(options):
    _assert_steps_agree(_retnet(**options), backend="eager")


@pytest.mark.parametrize("options", [
    {"position": sf.LearnedPosition(max_positions=16)}, {"position": sf.SinusoidalPosition()},
    {"residual": sf.PostNorm()}, {"final_norm": False, "tie_embeddings": False},
], ids=["learned", "sinusoidal", "post", "no-final-norm"])
def test_the_step_is_the_models_own_for_positions_and_residual_schemes(options):
    _assert_steps_agree(_retention_model(**options), backend="eager")


def test_a_learned_position_table_too_short_is_refused_as_the_model_refuses_it():
    model = _retention_model(position=sf.LearnedPosition(max_positions=3))
    step = CompiledDecoding(model, backend="eager")
    with torch.no_grad():
        cache = model(torch.ones(1, 3, dtype=torch.long), use_cache=True).cache
        before = (cache.next_position.clone(), cache.length, [layer.state.clone() for layer in cache.layers])
        with pytest.raises(ValueError, match="beyond the learned position table"):
            step(torch.ones(1, 1, dtype=torch.long), cache)
    assert torch.equal(cache.next_position, before[0]) and cache.length == before[1]
    assert all(torch.equal(layer.state, state) for layer, state in zip(cache.layers, before[2]))


@pytest.mark.parametrize("preset, part", [
    ("gpt-tiny", "layer 0's mixer (SoftmaxAttention) has no decode_step"),
    ("gdn-hybrid-tiny", "has no decode_step"),
    ("yoco-tiny", "has no decode_step"),
    ("retnet-moe-tiny", "feed-forward (MoEFeedForward) is not covered"),
    ("mt-tiny", "decoder-only language models"),
    ("bert-tiny", "decoder-only language models"),
])
def test_models_it_does_not_cover_are_refused_by_name(preset, part):
    model = sf.build(sf.load_preset(preset))
    reason = unsupported_reason(model)
    assert reason is not None and part in reason and "\n" not in reason
    with pytest.raises(ValueError, match="compiled decoding: "):
        CompiledDecoding(model, backend="eager")


def test_bitnet_linears_are_refused():
    model = sf.build(sf.RetNetConfig(vocab_size=VOCAB, embed_dim=16, value_dim=24, ffn_dim=24, heads=2, layers=1,
                                     linear="bitlinear"))
    assert "bitlinear" in unsupported_reason(model)


def test_bad_calls_get_one_line_and_leave_the_cache_as_it_was():
    model = _retnet()
    step = CompiledDecoding(model, backend="eager")
    with torch.no_grad():
        cache = model(torch.ones(2, 3, dtype=torch.long), use_cache=True).cache
    before = (cache.next_position.clone(), cache.length, [layer.state.clone() for layer in cache.layers])
    calls = {"two tokens": (torch.ones(2, 2, dtype=torch.long), cache, "one new token per row"),
             "an id past the vocabulary": (torch.full((2, 1), VOCAB), cache, "vocab"),
             "another batch": (torch.ones(3, 1, dtype=torch.long), cache, "the cache holds 2 rows"),
             "a KV cache": (torch.ones(2, 1, dtype=torch.long), sf.build(sf.load_preset("gpt-tiny")).new_cache(),
                            "the model's own cache")}
    for name, (ids, target, message) in calls.items():
        with pytest.raises(ValueError, match=message):
            step(ids, target)
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        step(torch.ones(2, 1, dtype=torch.long), cache)
    assert torch.equal(cache.next_position, before[0]) and cache.length == before[1]
    assert all(torch.equal(layer.state, state) for layer, state in zip(cache.layers, before[2]))


def test_the_step_is_kept_on_the_model_and_not_copied_with_it():
    model = _retnet()
    step = compiled_step(model, backend="eager")
    assert compiled_step(model, backend="eager") is step
    twin = copy.deepcopy(model)  # a compiled function is not copied: the copy compiles its own when asked
    assert compiled_step(twin, backend="eager") is not step and compiled_step(twin, backend="eager").model is twin


def test_generate_refuses_compile_with_a_draft_or_model_options():
    model = _retnet()
    ids = torch.ones(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="not with draft="):
        sf.generate(model, ids, 2, compile=True, draft=_retnet())
    with pytest.raises(ValueError, match="compiled decoding: layer 0's mixer"):
        sf.generate(sf.build(sf.load_preset("gpt-tiny")), ids, 2, compile=True)


# ------------------------------------------------------------------------------------------------------------
# The `compiled` tier: inductor's generated code.
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.compiled
@pytest.mark.parametrize("options", [{"normalizer": "torchscale"}, {"decay": "gated", "normalizer": "none"}],
                         ids=["torchscale-normalizer", "gated"])
def test_inductors_step_is_the_models_own_in_float64(options):
    _assert_steps_agree(_retnet(**options), backend="inductor")


@pytest.mark.compiled
@pytest.mark.parametrize("preset", ["gdn-tiny", "mamba2-tiny"])
def test_inductors_step_for_the_delta_rule_and_mamba2_in_float64(preset):
    torch.manual_seed(0)
    _assert_steps_agree(sf.build(sf.load_preset(preset)).double().eval(), backend="inductor")


@pytest.mark.compiled
def test_inductors_step_in_float32_laid_out_for_decoding_and_for_another_batch_size():
    """float32: the generated code sums the same products in another order (fused reductions, other vector
    widths), so the outputs differ by rounding. Each is built from sums of at most 48 products (the widths
    here), whose reassociation moves a sum by at most 48·2⁻²⁴ ≈ 3e-6 of its terms' magnitudes; two layers
    and the head compound that to ~1e-5 of the logits' scale in the worst case. The tolerance, 3e-5 relative
    (assert_close's float32 1e-5 × 3), is that bound with margin, and far below a wrong operation (O(1e-1))."""
    from scaleformer.runtime import decoding_layout

    model = _retnet(embed_dim=32, value_dim=48, ffn_dim=48).float()
    with decoding_layout(model):
        _assert_steps_agree(model, backend="inductor", dtype=torch.float32, scale=3)
        _assert_steps_agree(model, backend="inductor", dtype=torch.float32, scale=3, batch=3)


@pytest.mark.compiled
def test_generate_with_compile_gives_the_tokens_of_generate_without():
    model = _retnet()
    prompts = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(prompts)
    mask[1, :2] = 0
    plain = sf.generate(model, prompts, 12, attention_mask=mask, stop_tokens=None)
    compiled = sf.generate(model, prompts, 12, attention_mask=mask, stop_tokens=None, compile=True)
    assert torch.equal(compiled, plain)
    sampled = [sf.generate(model, prompts, 12, attention_mask=mask, stop_tokens=None, temperature=1.0,
                           generator=torch.Generator().manual_seed(5), compile=flag) for flag in (False, True)]
    assert torch.equal(sampled[0], sampled[1])  # float64: the probabilities agree far below a sample's resolution


@pytest.mark.compiled
def test_the_cli_generates_the_same_text_with_compile(capsys):
    from scaleformer.cli import main

    outputs = []
    for flags in ([], ["--compile"]):
        assert main(["generate", "--preset", "retnet-tiny", "--max-new-tokens", "12", *flags]) == 0
        outputs.append(next(line for line in capsys.readouterr().out.splitlines() if line.startswith("output:")))
    assert outputs[0] == outputs[1]
    assert main(["generate", "--preset", "gpt-tiny", "--compile"]) != 0
    assert "--compile: layer 0's mixer (SoftmaxAttention) has no decode_step" in capsys.readouterr().err


@pytest.mark.compiled
def test_the_torchscale_benchmark_times_the_compiled_step(tmp_path):
    from tests.bench.test_bench import run_torchscale_benchmark

    data = run_torchscale_benchmark(tmp_path)
    rows = {(r["model"], r["library"]): r["ms"] for r in data["decoding"]}
    assert rows[("retnet", "scaleformer+compiled")] > 0 and ("decoder", "scaleformer+compiled") not in rows


@pytest.mark.compiled
def test_the_generate_benchmark_times_eager_against_compiled_steps(tmp_path):
    import json

    from scaleformer.cli import main

    out = tmp_path / "g.json"
    assert main(["bench", "generate", "--embed-dim", "16", "--layers", "4", "--heads", "4", "--vocab-size", "300",
                 "--batches", "1", "--prompt", "5", "--steps", "2", "--rounds", "5", "--prompts", "20",
                 "--prefix-block", "8", "--requests", "0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["compiled"]
    covered = {(r["model"], r["batch"]) for r in rows if "batch" in r}
    assert covered == {(m, b) for m in ("retnet", "gdn") for b in (1, 4)}
    assert all(r["eager_ms"] > 0 and r["compiled_ms"] > 0 for r in rows if "batch" in r)
    refused = {r["model"]: r["not_covered"] for r in rows if "batch" not in r}
    assert set(refused) == {"gpt", "gdn-hybrid"} and all("has no decode_step" in why for why in refused.values())
