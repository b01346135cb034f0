"""Hugging Face transformers: Auto* registration, generate() on our caches, save/load, export."""

import json
import os

import pytest
import torch

import scaleformer as sf
from tests.conftest import assert_close, make_model, tiny

transformers = pytest.importorskip("transformers")
sfhf = pytest.importorskip("scaleformer.hf")

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer  # noqa: E402

RETNET = sf.RetNetConfig(vocab_size=97, embed_dim=32, value_dim=48, heads=2, ffn_dim=48, layers=2, chunk_size=4)
CAUSAL = {
    "decoder-rope": tiny(position="rope"),
    "decoder-xpos-untied-deepnorm": tiny(position="xpos", tie_embeddings=False, norm="deepnorm"),
    "decoder-relative-subln": tiny(position="relative", norm="subln"),
    "decoder-gqa-window": tiny(position="rope", kv_heads=2, window=4),
    "decoder-diff-attention": tiny(position="rope", attention="diff"),
    "decoder-bitnet": tiny(position="rope", linear="bitlinear", norm_type="rmsnorm", bias=False),
    "decoder-s2-hybrid": tiny(position="rope", attention="s2", s2=sf.S2Config(block=2, local_blocks=2, vert_stride=2,
                                                                              dense_every=2)),
    "retnet": RETNET,
    "gated-retention": RETNET.replace(decay="gated", normalizer="none"),
    "yoco": sf.YOCOConfig(vocab_size=97, embed_dim=32, layers=4, self_heads=2, heads=4, kv_heads=2, ffn_dim=48,
                          chunk_size=4),
    "yoco-sliding-window": sf.YOCOConfig(vocab_size=97, embed_dim=32, layers=4, self_decoder="sliding_window",
                                         self_heads=2, heads=2, kv_heads=1, window=4, ffn_dim=48),
    "lightning": sf.ModelConfig(vocab_size=97, embed_dim=32, position=sf.NoPosition(), layers=sf.uniform(
        sf.LayerConfig(mixer=sf.Lightning(heads=4, chunk_size=4), ffn=sf.GLU(ffn_dim=48, activation="none")), 2)),
    "hybrid-retention-attention": sf.ModelConfig(
        vocab_size=97, embed_dim=32, position=sf.RoPE(),
        layers=(sf.LayerConfig(mixer=sf.Retention(heads=2, value_dim=48)), sf.LayerConfig(mixer=sf.Attention(heads=4)))),
    # Qwen3-Next's pattern: three Gated DeltaNet layers, then gated grouped-query attention with partial RoPE
    "gdn-hybrid": sf.load_preset("gdn-hybrid-tiny", vocab_size=97, chunk_size=4, rope_fraction=0.25),
    "mamba2": sf.load_preset("mamba2-tiny", vocab_size=97, chunk_size=4),  # blocks without an FFN
}


def _model(cfg):
    if isinstance(cfg, (sf.RetNetConfig, sf.YOCOConfig)):
        torch.manual_seed(0)
        return sf.build(cfg).eval()
    return make_model(cfg)


def test_importing_registers_the_auto_classes():
    config = AutoConfig.for_model("scaleformer", scaleformer=tiny().to_dict())
    assert isinstance(config, sfhf.ScaleformerConfig)
    assert isinstance(AutoModelForCausalLM.from_config(config), sfhf.ScaleformerForCausalLM)
    encoder = sfhf.ScaleformerConfig.from_scaleformer(tiny("encoder"))
    assert isinstance(AutoModelForMaskedLM.from_config(encoder), sfhf.ScaleformerForMaskedLM)
    with pytest.raises(ValueError, match="AutoModelForMaskedLM"):
        AutoModelForCausalLM.from_config(encoder)
    from transformers import AutoModelForSeq2SeqLM

    seq2seq = sfhf.ScaleformerConfig.from_scaleformer(tiny("encoder_decoder"))
    assert isinstance(AutoModelForSeq2SeqLM.from_config(seq2seq), sfhf.ScaleformerForSeq2SeqLM)


def _record_calls(model, monkeypatch, length_of=lambda args, kwargs: args[0].shape[1]):
    """Record (tokens fed, whether a live cache came with them) for every forward of our model."""
    calls = []
    forward = model.forward

    def spy(*args, **kwargs):
        cache = kwargs.get("cache")
        calls.append((length_of(args, kwargs), cache is not None and cache.length > 0))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    return calls


def _record_reorders(wrapped, monkeypatch):
    """Record the cache length each beam-search reorder sees (0 would mean there was no live cache)."""
    seen = []
    reorder = wrapped._reorder_cache

    def spy(cache, beam_idx):
        seen.append(cache.length if cache is not None else 0)
        return reorder(cache, beam_idx)

    monkeypatch.setattr(wrapped, "_reorder_cache", spy)
    return seen


@pytest.mark.parametrize("name", list(CAUSAL))
def test_greedy_generate_equals_ours_token_for_token(name, monkeypatch):
    model = _model(CAUSAL[name])
    wrapped = sfhf.wrap(model)
    calls = _record_calls(model, monkeypatch)
    prompts = torch.randint(1, 97, (3, 7))
    mask = torch.ones_like(prompts)
    mask[0, :3] = 0  # left padding, as HF batches prompts of different lengths
    prompts[0, :3] = 0
    ours = sf.generate(model, prompts, 9, attention_mask=mask)
    theirs = wrapped.generate(prompts, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0,
                              eos_token_id=None)
    assert torch.equal(theirs[:, prompts.shape[1]:], ours[:, -9:] if ours.shape[1] > 9 else ours)
    hf_calls = calls[len(calls) - 9:]  # ours ran first (prefill + 8 steps), then HF's 9 calls
    assert hf_calls == [(7, False)] + [(1, True)] * 8  # the prompt once, then one token per step on our cache


@pytest.mark.parametrize("name", ["decoder-rope", "decoder-gqa-window", "decoder-s2-hybrid", "retnet", "yoco", "gdn-hybrid", "mamba2",
                                  "yoco-sliding-window"])
def test_beam_search_reorders_our_cache_exactly(name, monkeypatch):
    """Beam search with our cache (reordered every step) = beam search recomputing from scratch."""
    model = _model(CAUSAL[name])
    wrapped = sfhf.wrap(model)
    prompts = torch.randint(1, 97, (2, 5))
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0, eos_token_id=None,
                  output_scores=True, return_dict_in_generate=True)
    calls, reorders = _record_calls(model, monkeypatch), _record_reorders(wrapped, monkeypatch)
    cached = wrapped.generate(prompts, use_cache=True, **kwargs)
    assert calls == [(5, False)] + [(1, True)] * 5  # beams x batch rows, one token per step on our cache
    assert reorders[:5] == [5, 6, 7, 8, 9]  # each reorder moved a live cache holding every token fed so far
    calls.clear()
    fresh = wrapped.generate(prompts, use_cache=False, **kwargs)
    assert calls == [(5 + step, False) for step in range(6)]  # the reference really ran without a cache
    assert torch.equal(cached.sequences, fresh.sequences)
    assert_close(cached.sequences_scores, fresh.sequences_scores)


@pytest.mark.parametrize("name", list(CAUSAL))
def test_save_pretrained_round_trips_offline_with_identical_logits(name, tmp_path):
    model = _model(CAUSAL[name])
    sfhf.wrap(model).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.model.config == model.config
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_masked_lm_round_trip_and_loss(tmp_path):
    model = make_model(tiny("encoder", position="relative"))
    sfhf.wrap(model).save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path, local_files_only=True)
    ids = torch.randint(0, 97, (2, 9))
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    with torch.no_grad():
        out = loaded(ids, labels=labels)
        logits = model(ids).logits
    assert torch.equal(out.logits, logits)
    assert_close(out.loss, torch.nn.functional.cross_entropy(logits[:, 3], ids[:, 3]))


def test_causal_lm_loss_is_next_token_cross_entropy():
    model = _model(RETNET)
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        out = sfhf.wrap(model)(ids, labels=ids)
        logits = model(ids).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    assert_close(out.loss, expected)


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_export_of_a_checkpoint_with_its_tokenizer(kind, tmp_path):
    from scaleformer.data.tokenizer import train_tokenizer

    text = "def add(a, b):\n    return a + b  # é, ü and ∑ too\n\n" * 40
    tokenizer = train_tokenizer(text, kind, vocab_size=300)
    model = _model(RETNET.replace(vocab_size=tokenizer.vocab_size))
    checkpoint = tmp_path / "ckpt"
    sf.save(model, checkpoint)
    tokenizer.save(checkpoint)
    out = sfhf.export_hf(checkpoint, tmp_path / "hf")

    hf_tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    sample = "return a + b  # ∑ é\n"
    assert hf_tokenizer(sample, add_special_tokens=False)["input_ids"] == tokenizer.encode(sample)
    assert hf_tokenizer.decode(tokenizer.encode(sample)) == sample
    assert hf_tokenizer.eos_token_id == tokenizer.eos_id
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    ids = torch.tensor([tokenizer.encode(sample, add_bos=True)])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.generation_config.eos_token_id == tokenizer.eos_id


def test_cli_export(tmp_path):
    from scaleformer.cli import main
    from scaleformer.data.tokenizer import ByteTokenizer

    model = _model(RETNET.replace(vocab_size=259))
    sf.save(model, tmp_path / "ckpt")
    ByteTokenizer().save(tmp_path / "ckpt")
    assert main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    ids = torch.randint(0, 259, (1, 6))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert main(["export-hf", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2


def test_seq2seq_generate_equals_ours_and_round_trips(tmp_path, monkeypatch):
    from transformers import AutoModelForSeq2SeqLM

    model = make_model(tiny("encoder_decoder", position="rope", norm="deepnorm"))
    wrapped = sfhf.wrap(model)
    calls = _record_calls(model, monkeypatch, length_of=lambda args, kwargs: args[1].shape[1])
    source = torch.randint(2, 97, (2, 9))
    source_mask = torch.ones_like(source)
    source_mask[1, :4] = 0  # a left-padded source row
    start = torch.ones(2, 1, dtype=torch.long)
    ours = sf.generate(model, start, 7, source_ids=source, source_mask=source_mask)
    calls.clear()
    theirs = wrapped.generate(source, attention_mask=source_mask, decoder_start_token_id=1, max_new_tokens=7,
                              do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(theirs[:, 1:], ours[:, -7:])
    assert calls == [(1, False)] + [(1, True)] * 6  # the start token, then one token per step on our cache
    beams = dict(max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0, eos_token_id=None,
                 decoder_start_token_id=1)
    reorders = _record_reorders(wrapped, monkeypatch)
    assert torch.equal(wrapped.generate(source, use_cache=True, **beams), wrapped.generate(source, use_cache=False, **beams))
    assert reorders[:4] == [1, 2, 3, 4]  # the cached run reordered a live cache every step

    wrapped.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, local_files_only=True)
    target = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=source, decoder_input_ids=target).logits, model(source, target).logits)


def test_export_of_a_training_run_directory(tmp_path):
    from pydoc_data.topics import topics

    from scaleformer.data.tokenizer import load_tokenizer
    from scaleformer.train.checkpoint import resolve_checkpoint
    from scaleformer.train.trainer import TrainConfig, Trainer

    data = tmp_path / "corpus.txt"
    data.write_text("\n\n".join(topics[name] for name in sorted(topics)[:10]))
    run = tmp_path / "run"
    Trainer(TrainConfig(model="retnet-tiny", tokenizer="bpe", vocab_size=300, seq_len=32, batch_size=2, steps=3,
                        eval_batches=1, samples=0, progress=False, data=str(data), out=str(run), warmup=1)).run()
    out = sfhf.export_hf(run, tmp_path / "hf")
    checkpoint = resolve_checkpoint(run)
    ours, tokenizer = sf.load(checkpoint).eval(), load_tokenizer(checkpoint)
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    hf_tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "The while statement is used for repeated execution"
    ids = tokenizer.encode(text, add_bos=True)
    assert [tokenizer.bos_id, *hf_tokenizer(text, add_special_tokens=False)["input_ids"]] == ids
    with torch.no_grad():
        assert torch.equal(loaded(torch.tensor([ids])).logits, ours(torch.tensor([ids])).logits)
    # the export names its source checkpoint, not where it lay on this disk
    assert json.loads((out / "scaleformer_source.json").read_text()) == {"exported_from": checkpoint.name}
    assert str(tmp_path) not in "".join(p.read_text(errors="replace") for p in out.iterdir() if p.suffix == ".json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "hf", "run"]  # built beside, put in place


def test_saved_directory_loads_with_remote_code_in_a_fresh_process(tmp_path):
    """Without `import scaleformer.hf` (e.g. lm_eval's own `--model hf`), trust_remote_code finds our classes."""
    import os
    import subprocess
    import sys

    model = _model(RETNET)
    sfhf.wrap(model).save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 97, (1, 7))
    torch.save({"ids": ids, "logits": model(ids).logits.detach()}, tmp_path / "expected.pt")
    script = (
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r}, trust_remote_code=True, "
        "local_files_only=True)\n"
        f"expected = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "with torch.no_grad():\n"
        "    assert torch.equal(model(expected['ids']).logits, expected['logits'])\n"
        "print('loaded', type(model).__name__)\n")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loaded ScaleformerForCausalLM" in result.stdout


@pytest.mark.parametrize("name", ["decoder-rope", "retnet"])
def test_an_export_in_the_older_parameter_layout_loads_with_identical_logits(name, tmp_path):
    """Directories exported before format 2 name the mixer self_attn/retention, wrap single-way FFNs and norms
    in ways.0, and keep RetNet's blocks at the top: they load through the rename table, not as fresh weights."""
    import json
    import re

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model = _model(CAUSAL[name])
    sfhf.wrap(model).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config.pop("scaleformer_format") == 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    mixer = "retention" if name == "retnet" else "self_attn"
    old = {}
    for key, tensor in load_file(str(tmp_path / "model.safetensors")).items():
        key = re.sub(r"\.mixer\.", f".{mixer}.", re.sub(r"\.mixer_norm\.", f".{mixer}_norm.", key))
        if name == "retnet":
            key = re.sub(r"^model\.decoder\.(blocks|final_norm)\.", r"model.\1.", key)
        else:
            key = re.sub(r"\.(ffn|ffn_norm|self_attn_norm)\.", r".\1.ways.0.", key)
        old[key] = tensor
    assert any(".ways.0." in k or "model.blocks." in k for k in old)
    save_file(old, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(1, 97, (2, 6))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_decoding_layout_reaches_the_models_inside_the_wrapper():
    """`with sf.decoding_layout(wrapped)` around HF's generate: the wrapper's linears and tied head are laid out
    (it walks modules), the greedy tokens are the same, and every weight is back in place afterwards."""
    model = _model(RETNET)
    wrapped = sfhf.wrap(model)
    before = {name: p.detach().clone() for name, p in wrapped.named_parameters()}
    prompts = torch.randint(1, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    standard = wrapped.generate(prompts, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with sf.decoding_layout(wrapped) as count:
        assert count > 0 and model.head_weight.t().is_contiguous()  # tied: the embedding
        laid_out = wrapped.generate(prompts, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(laid_out, standard)
    assert all(p.is_contiguous() and torch.equal(p, before[name]) for name, p in wrapped.named_parameters())


def test_an_exported_tokenizer_loads_in_a_fresh_process_without_a_prompt(tmp_path):
    """transformers 5 reads config.json (whose auto_map points at our remote code) before any tokenizer, and
    asks "run the custom code? [y/N]" on a terminal; trust_remote_code=False, the documented line, loads the
    tokenizer with no question and without importing scaleformer."""
    import subprocess
    import sys

    from scaleformer.data.tokenizer import ByteTokenizer

    sf.save(_model(RETNET.replace(vocab_size=259)), tmp_path / "ckpt")
    ByteTokenizer().save(tmp_path / "ckpt")
    out = sfhf.export_hf(tmp_path / "ckpt", tmp_path / "hf")
    script = ("import sys\nfrom transformers import AutoTokenizer\n"
              f"tokenizer = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=False)\n"
              "assert 'scaleformer' not in sys.modules\n"
              "print(tokenizer('abc')['input_ids'], tokenizer.eos_token_id)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["[97,", "98,", "99]", "257"]
    assert "custom code" not in result.stdout + result.stderr
