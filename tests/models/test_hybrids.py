"""The hybrid presets (Samba and Jamba with Mamba-2, YOCO with a Mamba-2 self-decoder, Qwen3-Next's GDN 3:1):
their layouts are the published ones, they decode exactly with their mixed state, padding and packed
documents change nothing, they train from the command line, and Hugging Face's generate gives our tokens."""

import json

import pytest
import torch

import scaleformer as sf
from tests.conftest import assert_close, assert_rows_alone, decode_step_by_step

HYBRIDS = {
    "samba-tiny": dict(vocab_size=97, chunk_size=4, window=5),
    "jamba-tiny": dict(vocab_size=97, chunk_size=4),
    "yoco-mamba2-tiny": dict(vocab_size=97, chunk_size=4),
    "gdn-hybrid-tiny": dict(vocab_size=97, chunk_size=4),
}


def _model(name, dtype=torch.float64):
    torch.manual_seed(0)
    model = sf.build(sf.load_preset(name, **HYBRIDS[name])).to(dtype).eval()
    with torch.no_grad():  # norms and biases away from their fresh 1 and 0, so the checks see them
        for parameter_name, parameter in model.named_parameters():
            if "norm" in parameter_name or parameter_name.endswith("bias"):
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def test_the_layouts_are_the_published_ones():
    samba = sf.load_preset("samba-base")
    assert [layer.mixer.kind for layer in samba.layers] == ["mamba2", "attention"] * 6
    assert {layer.mixer.window for layer in samba.layers if layer.mixer.kind == "attention"} == {2048}
    assert all(layer.ffn.kind == "glu" for layer in samba.layers) and samba.position.kind == "rope"
    jamba = sf.load_preset("jamba-tiny")
    assert [layer.mixer.kind for layer in jamba.layers] == ["mamba2"] * 4 + ["attention"] + ["mamba2"] * 3
    assert [layer.ffn.kind for layer in jamba.layers] == ["glu", "moe"] * 4 and jamba.position.kind == "none"
    routing = jamba.layers[1].ffn.routing
    assert (routing.router, routing.top_k, routing.normalize_gates, routing.capacity_factor) == ("softmax", 2, False, 2.0)
    yoco = sf.load_preset("yoco-mamba2-tiny")
    assert [layer.mixer.kind for layer in yoco.layers] == ["mamba2"] * 2 + ["cross_decoder"] * 2
    with pytest.raises(sf.ConfigError, match=r"attention_offset \(8\) must be in \[0, attention_every = 8\)"):
        sf.load_preset("jamba-tiny", attention_offset=8)
    with pytest.raises(sf.ConfigError, match="state_dim"):  # a knob that changes nothing is refused
        sf.load_preset("yoco-tiny", state_dim=32)


@pytest.mark.parametrize("name", list(HYBRIDS))
def test_prefill_then_steps_equal_the_full_forward(name):
    model = _model(name)
    ids = torch.randint(0, 97, (2, 13))
    full = model(ids).logits
    for prefill in (1, 6):
        assert_close(decode_step_by_step(model, ids, prefill), full, torch.float64)


@pytest.mark.parametrize("name", list(HYBRIDS))
def test_left_padding_and_packed_documents_change_nothing(name):
    assert_rows_alone(_model(name), [9, 4, 6], torch.float64)


@pytest.mark.parametrize("name", ["samba-tiny", "jamba-tiny", "yoco-mamba2-tiny"])
def test_it_trains_from_the_command_line(name, tmp_path):
    from scaleformer.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", name, "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-every", "4",
                 "--out", str(out), "--samples", "0", "--no-progress"]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("name", list(HYBRIDS))
def test_hugging_face_export_generates_our_tokens(name, tmp_path):
    sfhf = pytest.importorskip("scaleformer.hf")
    from transformers import AutoModelForCausalLM

    model = _model(name, torch.float32)
    sfhf.wrap(model).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    prompts = torch.randint(1, 97, (2, 6))
    ours = sf.generate(model, prompts, 8)
    theirs = loaded.generate(prompts, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(theirs[:, 6:], ours[:, -8:])


def test_mqar_takes_the_hybrids_and_diff_v2():
    """Each joins `reproduce mqar` with its published layout at MQAR's size, and trains there for a step."""
    from scaleformer.reproduce.mqar import FIXED_STATE, MIXERS

    layouts = {"diff_attention_v2": ["diff_attention_v2"] * 2, "samba": ["mamba2", "attention"],
               "jamba": ["mamba2", "mamba2", "attention", "mamba2"],
               "gdn_hybrid": ["gated_deltanet"] * 3 + ["attention"], "yoco_mamba2": ["mamba2", "cross_decoder"]}
    for name, kinds in layouts.items():
        cfg = MIXERS[name](32, 2, 2, 64, 64)
        assert [layer.mixer.kind for layer in cfg.layers] == kinds
        model = sf.build(cfg)
        ids = torch.randint(0, 64, (2, 64))
        torch.nn.functional.cross_entropy(model(ids).logits.flatten(0, 1), ids.flatten()).backward()
    assert sf.model_config(MIXERS["samba"](32, 2, 2, 64, 64)).layers[1].mixer.window == 16  # local: a quarter
    assert "samba" in FIXED_STATE and not {"jamba", "gdn_hybrid", "yoco_mamba2", "diff_attention_v2"} & FIXED_STATE


def test_the_hybrid_verdict_reads_the_share_of_the_gap_closed():
    from scaleformer.reproduce.mqar import _hybrid_verdict

    s = {"widths": [32, 64], "pairs": [16]}
    table = {("attention", 32): 1.0, ("mamba2", 32): 0.2, ("attention", 64): 1.0, ("mamba2", 64): 0.95}

    def acc_with(hybrid_at_32):
        return lambda mixer, width, pairs: {**table, ("jamba", 32): hybrid_at_32, ("jamba", 64): 0.5}[mixer, width]

    held = _hybrid_verdict("jamba", "mamba2", acc_with(0.7), s)  # (0.7 − 0.2) / 0.8 = 62% at the only gap
    assert held.held is True and "w32 16 pairs 62%" in held.measured
    assert _hybrid_verdict("jamba", "mamba2", acc_with(0.5), s).held is False  # 38%
    no_gap = {**table, ("mamba2", 32): 0.95}
    undecided = _hybrid_verdict("jamba", "mamba2", lambda m, w, p: {**no_gap, ("jamba", 32): 0.9, ("jamba", 64): 0.9}[m, w], s)
    assert undecided.held is None and "nothing to close" in undecided.measured
