"""The trainer: bit-exact resume after SIGKILL, clean SIGTERM, atomic checkpoints, bad input, quality."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scaleformer.cli import main
from scaleformer.train.checkpoint import latest_checkpoint
from scaleformer.train.trainer import TrainConfig, Trainer, TrainingError

SMALL = ["--model", "retnet-tiny", "--tokenizer", "byte", "--seq-len", "32", "--batch-size", "4", "--eval-batches",
         "2", "--samples", "0", "--no-progress", "--model-options", "dropout=0.1", "--warmup", "5"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n\n".join(topics[name] for name in sorted(topics)[:30]))
    return path


def _run(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "scaleformer.cli", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(out) / "model.safetensors"))


def _wait_for_step(out: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        latest = latest_checkpoint(out)
        if latest is not None and int(latest.name.split("_")[1]) >= step:
            return int(latest.name.split("_")[1])
        assert process.poll() is None, process.communicate()
        time.sleep(0.005)
    raise AssertionError("no checkpoint in time")


def test_sigkill_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, text_file):
    common = SMALL + ["--data", str(text_file), "--steps", "60", "--save-every", "1", "--log-every", "5"]
    whole = tmp_path / "whole"
    assert _run(common + ["--out", str(whole)]).wait(timeout=300) == 0
    killed = tmp_path / "killed"
    process = _run(common + ["--out", str(killed)])
    at = _wait_for_step(killed, 10, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    interrupted_at = int(latest_checkpoint(killed).name.split("_")[1])
    assert at <= interrupted_at < 60, "the run finished before it could be killed"
    assert _run(common + ["--out", str(killed)]).wait(timeout=300) == 0  # --resume auto
    a, b = _final_weights(whole), _final_weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 60


def test_sigterm_saves_and_exits_cleanly(tmp_path, text_file):
    out = tmp_path / "run"
    process = _run(SMALL + ["--data", str(text_file), "--steps", "100000", "--save-every", "1000", "--out", str(out)])
    time.sleep(0.5)
    deadline = time.time() + 60
    while time.time() < deadline and not ((out / "metrics.jsonl").exists()
                                          and (out / "metrics.jsonl").read_text().strip()):
        time.sleep(0.05)  # training has started: the first metrics line is written
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr  # stopped early, and says so (saved: rerun to go on)
    assert "stopped by signal (SIGTERM) at step" in stdout and "run the same command again to continue" in stdout
    step = int(latest_checkpoint(out).name.split("_")[1])
    assert 0 < step < 100000  # saved at the step it stopped, not at a save_every multiple


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, text_file, monkeypatch):
    cfg = TrainConfig(**_kwargs(text_file, tmp_path, steps=4, save_every=2))
    trainer = Trainer(cfg)
    trainer.run()
    before = latest_checkpoint(tmp_path)
    weights = (before / "model.safetensors").read_bytes()
    import scaleformer.train.checkpoint as checkpoint

    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", broken)
    trainer.step = 6
    with pytest.raises(OSError, match="No space left"):
        trainer.save()
    assert latest_checkpoint(tmp_path) == before and (before / "model.safetensors").read_bytes() == weights


def _kwargs(text_file, out, **overrides):  # noqa: D103
    base = dict(model="retnet-tiny", tokenizer="byte", seq_len=32, batch_size=4, eval_batches=2, samples=0,
                progress=False, data=str(text_file), out=str(out), warmup=2)
    base.update(overrides)
    return base


def test_short_run_beats_the_unigram_baseline_and_eval_generate_work(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    result = Trainer(TrainConfig(**_kwargs(text_file, out, steps=150, lr=5e-3, tokenizer="bpe", vocab_size=512,
                                           samples=1))).run()
    assert result["val_loss"] < result["unigram_loss"] - 0.3, result
    run = json.loads((out / "run.json").read_text())
    assert len(run["corpus"]["sha256"]) == 64 and run["tokenizer"] == "BPETokenizer"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--batches", "4"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(out), "--prompt", "The ", "--max-new-tokens", "5"]) == 0
    assert " tokens in " in capsys.readouterr().out


@pytest.mark.parametrize("model", ["gpt-tiny", "longnet-tiny", "gpt-moe-tiny", "gret-tiny", "diff-tiny", "bitnet-tiny",
                                   "yoco-tiny", "tnl-tiny"])
def test_other_presets_train(model, tmp_path, text_file):
    out = tmp_path / model
    Trainer(TrainConfig(**_kwargs(text_file, out, model=model, steps=6, log_every=3))).run()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6 and all(r["loss"] == r["loss"] for r in records)
    if "moe" in model:
        assert records[-1]["aux_loss"] > 0 and "moe0_max_load" in records[-1]


def test_bad_input_gives_one_line_errors(tmp_path, text_file, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "ok"}\n{"txt": 3}\n')
    cases = [
        (["--data", str(tmp_path / "missing.txt")], "no such file or folder"),
        (["--data", str(empty)], "the data is empty"),
        (["--data", str(bad_jsonl)], "bad.jsonl:2: each JSONL line needs a string field"),
        (["--data", str(text_file), "--seq-len", "10000000"], "the data is too small"),
        (["--data", str(text_file), "--model", "gpt-tny"], "did you mean `gpt-tiny`"),
        (["--data", str(text_file), "--model-options", "layer=3"], "did you mean `layers`"),
        (["--data", str(text_file), "--steps", "0"], "steps must be >= 1"),
        (["--data", str(text_file), "--model", "gpt-tiny", "--model-options", "max_positions=16"],
         "beyond the learned position table (max_positions=16)"),
    ]
    for args, message in cases:
        assert main(["train", *SMALL, "--out", str(tmp_path / "x"), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_resume_refuses_a_mismatched_checkpoint_and_leaves_it_alone(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    same = [*SMALL, "--data", str(text_file), "--out", str(out), "--steps", "2", "--save-every", "2"]
    assert main(["train", *same]) == 0
    latest = latest_checkpoint(out)
    weights = (latest / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train", *same, "--model", "gpt-tiny"]) == 2
    assert "was trained with other options (model 'retnet-tiny' -> 'gpt-tiny')" in capsys.readouterr().err
    assert main(["train", *same, "--model", "gpt-tiny", "--allow-changes"]) == 2
    assert "do not fit this model" in capsys.readouterr().err
    assert main(["train", *same, "--resume", "never"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert (latest / "model.safetensors").read_bytes() == weights
    (latest / "optimizer.safetensors").write_bytes(b"\x00garbage")  # a corrupt file: refused in one line
    assert main(["train", *same]) == 2
    err = capsys.readouterr().err
    assert "holds checkpoints but none is complete" in err and "optimizer.safetensors" in err and err.count("\n") == 1
    assert (latest / "model.safetensors").read_bytes() == weights


def test_nan_loss_stops_with_a_clear_error(tmp_path, text_file):
    trainer = Trainer(TrainConfig(**_kwargs(text_file, tmp_path, steps=3, lr=1e30, warmup=1, grad_clip=0.0)))
    with pytest.raises(TrainingError, match="not finite"):
        trainer.run()
    skip = tmp_path / "skip"
    skipping = Trainer(TrainConfig(**_kwargs(text_file, skip, steps=4, on_nan="skip", log_every=1, save_every=1,
                                             eval_every=100)))
    real_step, real_loss, current = skipping.train_step, skipping._loss, {}
    poisoned = {2, 3}  # the third and fourth batches give a NaN loss, as a corrupt batch would

    def train_step(step):
        current["step"] = step
        return real_step(step)

    def loss(inputs, targets, model=None):
        value, aux = real_loss(inputs, targets, model)
        return (value * float("nan"), aux) if model is not None and current["step"] in poisoned else (value, aux)

    skipping.train_step, skipping._loss = train_step, loss
    skipping.run()
    records = [json.loads(line) for line in (skip / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # the run went on
    assert [r.get("skipped") == 1.0 for r in records] == [False, False, True, True]
    assert all(math.isnan(r["loss"]) for r in records[2:]) and all(math.isfinite(r["loss"]) for r in records[:2])
    # A skipped step leaves the weights alone: checkpoints 3 and 4 (the two kept) hold the same bytes.
    saved = [(skip / "checkpoints" / f"step_000000{s}" / "model.safetensors") for s in (3, 4)]
    assert saved[0].read_bytes() == saved[1].read_bytes()
    # Weights that an update made non-finite (lr 1e30) are never saved, even when NaN losses are skipped.
    ruined = Trainer(TrainConfig(**_kwargs(text_file, tmp_path / "ruined", steps=4, lr=1e30, warmup=1, grad_clip=0.0,
                                           on_nan="skip", log_every=1, save_every=1, eval_every=100)))
    with pytest.raises(TrainingError, match="weights hold NaN or infinite values"):
        ruined.run()
    for checkpoint in (tmp_path / "ruined" / "checkpoints").glob("step_*"):
        assert all(torch.isfinite(t).all() for t in load_file(str(checkpoint / "model.safetensors")).values())


def test_pre_tokenized_ids_train_and_out_of_vocabulary_ids_are_refused(tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = np.tile(np.arange(50, dtype=np.int32), 400) + rng.integers(0, 2, 20000).astype(np.int32)  # learnable
    path = tmp_path / "ids.npy"
    np.save(path, ids)
    result = Trainer(TrainConfig(**{**_kwargs(path, tmp_path / "run", steps=40, samples=1), "vocab_size": 64})).run()
    assert result["val_loss"] < result["unigram_loss"] - 1.0
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "1 2 3", "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    assert main(["train", *SMALL, "--data", str(path), "--vocab-size", "40", "--out", str(tmp_path / "x")]) == 2
    assert "token ids out of the vocabulary: they span [0, 50] but --vocab-size is 40" in capsys.readouterr().err
    np.save(tmp_path / "floats.npy", np.zeros(10))
    assert main(["train", *SMALL, "--data", str(tmp_path / "floats.npy"), "--out", str(tmp_path / "y")]) == 2
    assert "1-D integer array" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["retnet-tiny", "gpt-tiny"])
def test_bfloat16_autocast_trains_and_tracks_float32(model, tmp_path, text_file):
    runs = {}
    for precision in ("float32", "bfloat16"):
        out = tmp_path / precision
        Trainer(TrainConfig(**_kwargs(text_file, out, model=model, steps=30, log_every=5, precision=precision,
                                      model_options=()))).run()
        runs[precision] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert min(runs["bfloat16"][1:]) < runs["bfloat16"][0] - 0.5  # it learns
    assert all(abs(a - b) < 0.1 * a for a, b in zip(runs["float32"], runs["bfloat16"]))  # bf16 rounding only
    assert runs["float32"] != runs["bfloat16"]  # and the autocast really ran


def test_auto_precision_follows_the_hardware_and_a_resume_compares_what_ran(tmp_path, text_file, monkeypatch):
    import scaleformer.train.trainer as trainer_module
    from scaleformer.train.checkpoint import trainer_state

    wide = ("embed_dim=128",)
    for native, options, ran in ((True, wide, "bfloat16"), (False, wide, "float32"), (True, (), "float32")):
        monkeypatch.setattr(trainer_module, "native_bfloat16", lambda device, native=native: native)
        out = tmp_path / f"{ran}-{len(options)}"
        Trainer(TrainConfig(**_kwargs(text_file, out, steps=2, model_options=options))).run()
        assert trainer_state(latest_checkpoint(out))["train"]["precision"] == ran  # width 64: float32 on a CPU
    # The bfloat16 run continued on a machine where "auto" means float32: a change of result, so refused
    # (and named) like any other, unless --allow-changes.
    monkeypatch.setattr(trainer_module, "native_bfloat16", lambda device: False)
    with pytest.raises(ValueError, match="precision 'bfloat16' -> 'float32'"):
        Trainer(TrainConfig(**_kwargs(text_file, tmp_path / "bfloat16-1", steps=4, model_options=wide))).run()
    Trainer(TrainConfig(**_kwargs(text_file, tmp_path / "bfloat16-1", steps=4, model_options=wide,
                                  allow_changes=True))).run()
    assert trainer_state(latest_checkpoint(tmp_path / "bfloat16-1"))["step"] == 4


def test_compiled_training_matches_eager(tmp_path, text_file):
    losses = {}
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        Trainer(TrainConfig(**_kwargs(text_file, out, model="retnet-tiny", steps=3, log_every=1, compile=compiled,
                                      model_options=(), precision="float32"))).run()  # bf16 fuses differently
        losses[compiled] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(abs(a - b) <= 1e-4 * a for a, b in zip(losses[False], losses[True])), losses


def test_options_from_json_or_yaml_files_with_flags_overriding(tmp_path):
    from scaleformer.cli import make_parser
    from scaleformer.commands import _train_config

    (tmp_path / "run.yaml").write_text("model: gpt-tiny\nsteps: 7\nmodel_options: [layers=3]\nprogress: false\n")
    (tmp_path / "run.json").write_text(json.dumps({"model": "longnet-tiny", "lr": 0.001}))
    parse = lambda *argv: _train_config(make_parser().parse_args(["train", *argv]))  # noqa: E731
    cfg = parse("--config", str(tmp_path / "run.yaml"), "--steps", "9")
    assert (cfg.model, cfg.steps, cfg.model_options, cfg.progress) == ("gpt-tiny", 9, ("layers=3",), False)
    cfg = parse("--config", str(tmp_path / "run.json"))
    assert (cfg.model, cfg.lr, cfg.steps) == ("longnet-tiny", 0.001, TrainConfig().steps)
    (tmp_path / "bad.json").write_text(json.dumps({"stepz": 3}))
    with pytest.raises(ValueError, match="did you mean `steps`"):
        parse("--config", str(tmp_path / "bad.json"))
    help_text = make_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "peak learning rate (AdamW)" in help_text and "--model-options" in help_text


def test_metrics_go_to_tensorboard_when_it_is_installed(tmp_path, text_file):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    Trainer(TrainConfig(**_kwargs(text_file, out, steps=4, log_every=2))).run()
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("loss")]
    jsonl = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(abs(a - b) < 1e-6 for a, b in zip(losses, jsonl))


@pytest.mark.parametrize("model", ["gpt-tiny", "retnet-tiny", "longnet-tiny", "yoco-tiny"])
def test_packed_documents_loss_is_each_documents_own_loss(model, tmp_path, text_file):
    """With pack_documents, the loss of a batch is the mean over its documents' own next-token losses (each
    run alone), leaving out the one target that crosses a boundary."""
    import torch.nn.functional as F

    from scaleformer.train.trainer import batch_at, document_ids

    trainer = Trainer(TrainConfig(**_kwargs(text_file, tmp_path / "run", model=model, steps=2, pack_documents=True,
                                            precision="float32")))  # compared below with float32 arithmetic
    trainer.run()  # it trains; then its loss is checked on the trained model
    eos = trainer.data.tokenizer.eos_id
    assert document_ids(torch.tensor([[5, eos, 6, 7, eos, eos, 8]]), eos).tolist() == [[0, 0, 1, 1, 1, 2, 3]]
    trainer.model.eval()
    batch = batch_at(trainer.data.train, 0, 0, 4, 32)
    assert int((batch[:, :-1] == eos).sum()) >= 2  # the windows really cross document ends
    losses, count = 0.0, 0
    for row in batch:
        docs = document_ids(row[None, :-1], eos)[0]
        for d in docs.unique():
            span = (docs == d).nonzero()[:, 0]
            inputs, targets = row[span], row[span + 1]
            keep = inputs != eos
            if keep.any():
                logits = trainer.model(inputs[None]).logits[0]
                losses += F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
                count += int(keep.sum())
    loss, _ = trainer._loss(batch[:, :-1], batch[:, 1:])
    assert loss.item() == pytest.approx(losses / count, rel=1e-5)


def test_a_model_config_file_trains_a_hybrid(tmp_path, text_file):
    """--model takes a JSON model config: here retention, then sliding-window grouped-query attention."""
    import scaleformer as sf

    hybrid = sf.ModelConfig(vocab_size=512, embed_dim=32, position=sf.RoPE(), layers=(
        sf.LayerConfig(mixer=sf.Retention(heads=2, value_dim=48), ffn=sf.GLU(ffn_dim=64)),
        sf.LayerConfig(mixer=sf.Attention(heads=4, kv_heads=2, window=16), ffn=sf.GLU(ffn_dim=64))))
    path = tmp_path / "hybrid.json"
    path.write_text(hybrid.to_json())
    out = tmp_path / "run"
    assert main(["train", *SMALL[2:], "--model", str(path), "--steps", "4", "--data", str(text_file),
                 "--out", str(out)]) == 0
    model = sf.load(latest_checkpoint(out))
    assert model.config == hybrid.replace(vocab_size=model.config.vocab_size, dropout=0.1)  # --model-options applied
    assert main(["train", "--model", str(tmp_path / "missing.json"), "--out", str(tmp_path / "other")]) == 2


def test_a_synthetic_task_trains_with_the_loss_only_on_its_answers(tmp_path, capsys):
    import torch.nn.functional as F

    out = tmp_path / "mqar"
    trainer = Trainer(TrainConfig(model="gpt-tiny", task="mqar", task_options=("vocab_size=64", "pairs=4"), seq_len=32,
                                  batch_size=8, steps=6, warmup=2, eval_batches=2, samples=0, progress=False,
                                  out=str(out), precision="float32"))  # its loss is recomputed below in float32
    result = trainer.run()
    assert result["task"] == "mqar" and result["total"] == 2 * 8 * 4  # 16 held-out examples × 4 queries
    assert 0 <= result["accuracy_low"] <= result["accuracy"] <= result["accuracy_high"] <= 1
    assert trainer.model.config.vocab_size == 64 and "accuracy" in capsys.readouterr().out
    inputs, labels = trainer._batch(0)
    again, _ = trainer._batch(0)
    assert torch.equal(inputs, again) and not torch.equal(inputs, trainer._batch(1)[0])  # a function of the step
    assert int((labels != -100).sum()) == 8 * 4
    trainer.model.eval()
    logits = trainer.model(inputs).logits
    asked = labels != -100
    assert trainer._loss(inputs, labels)[0].item() == pytest.approx(F.cross_entropy(logits[asked], labels[asked]).item())
    run = json.loads((out / "run.json").read_text())
    assert run["corpus"]["source"] == "task:mqar" and run["corpus"]["task_options"]["pairs"] == 4
    # The CLI: the same run scored on its task, and on passkey at two depths (a byte model is needed there).
    assert main(["eval", "--checkpoint", str(out), "--task", "mqar", "--count", "8"]) == 0
    assert "mqar length 32: accuracy" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(out), "--task", "passkey", "--count", "2", "--lengths", "128",
                 "--depths", "0", "1"]) == 2
    assert "uses ids up to 258, but the model's vocabulary is 64" in capsys.readouterr().err


def test_passkey_training_and_its_depth_grid(tmp_path, capsys):
    out = tmp_path / "passkey"
    Trainer(TrainConfig(model="gpt-tiny", task="passkey", seq_len=128, batch_size=4, steps=3, warmup=1,
                        eval_batches=1, samples=0, progress=False, out=str(out))).run()
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--task", "passkey", "--count", "3", "--depths", "0", "0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": passkey ")[1].split(":")[0] for line in lines] == ["length 128, depth 0", "length 128, depth 0.5"]


def test_task_options_are_checked(tmp_path, capsys):
    assert main(["train", "--task", "mqr", "--out", str(tmp_path / "a")]) == 2
    assert "did you mean `mqar`" in capsys.readouterr().err
    assert main(["train", "--task", "mqar", "--task-options", "paris=4", "--out", str(tmp_path / "b")]) == 2
    assert "task mqar" in capsys.readouterr().err
    assert main(["train", "--task", "mqar", "--pack-documents", "--out", str(tmp_path / "c")]) == 2
    assert main(["train", "--task-options", "pairs=4", "--out", str(tmp_path / "d")]) == 2


def test_resume_refuses_a_model_that_a_changed_preset_default_would_build(tmp_path, text_file, capsys):
    """S2's head_offset default moved from 0 to DKernel's 1: a run saved with 0 is not continued as 1."""
    import json

    out = tmp_path / "run"
    same = ["--model", "s2-tiny", "--tokenizer", "byte", "--seq-len", "32", "--batch-size", "2", "--eval-batches", "1",
            "--samples", "0", "--no-progress", "--data", str(text_file), "--out", str(out), "--steps", "2"]
    assert main(["train", *same]) == 0
    config_file = latest_checkpoint(out) / "config.json"
    config = json.loads(config_file.read_text())
    config["layers"][0]["mixer"]["head_offset"] = 0  # what the earlier default wrote
    config_file.write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["train", *same]) == 2
    err = capsys.readouterr().err
    assert "was trained with other options (model layers.0.mixer.head_offset 0 -> 1)" in err, err


def test_the_console_says_what_the_run_does(tmp_path, text_file, capsys):
    """A header (model, parameters, data, precision and why, where it writes, where it starts), a line per
    evaluation, the final loss labelled with what it averages, and a closing line; a resume says where from."""
    argv = [*SMALL, "--data", str(text_file), "--out", str(tmp_path / "run"), "--steps", "4", "--eval-every", "2",
            "--save-every", "2"]
    assert main(["train", *argv]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("model: retnet-tiny (ModelConfig, ") and " parameters; 2 layers: retention×2" in lines[0]
    assert lines[1].startswith(f"data: {text_file}: ") and " training and " in lines[1]
    assert lines[2].startswith("precision: float32 (") and lines[4] == "starting from step 0"
    assert "run: " in lines[3] and "4 steps of" in lines[3]
    evals = [line for line in lines if line.startswith("step ") and "validation loss" in line]
    assert [line.split(":")[0] for line in evals] == ["step 2/4", "step 4/4"]
    assert all("mean over 2 fixed validation batches" in line for line in evals)
    assert "mean over 32 fixed validation batches" in out and lines[-1].startswith("done: 4 steps (")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert f"validation loss {records[-1]['val_loss']:.4f}" in evals[-1]  # the line is the logged number
    assert main(["train", *argv[:-4], "--steps", "6", "--eval-every", "2", "--save-every", "2",
                 "--allow-changes"]) == 0
    assert "resuming from step_0000004 (step 4 of 6)" in capsys.readouterr().out



def test_the_header_says_when_threads_slow_the_machine_down(tmp_path, text_file, capsys, monkeypatch):
    import scaleformer.train.trainer as trainer

    monkeypatch.setattr(trainer, "thread_advice", lambda: "2 threads multiply matrices 9.0x slower than 1")
    assert main(["train", *SMALL, "--data", str(text_file), "--out", str(tmp_path / "run"), "--steps", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[5] == "note: 2 threads multiply matrices 9.0x slower than 1"


@pytest.mark.parametrize("preset, what", [("bert-tiny", "a bidirectional encoder"), ("mt-tiny", "an encoder-decoder")])
def test_a_model_that_is_not_a_causal_lm_is_one_line_before_any_data_is_read(preset, what, tmp_path, capsys):
    """The trainer's objective is next-token prediction: an encoder or an encoder-decoder preset is refused in
    one line (it once reached the forward and died in a traceback), and the run directory is not created."""
    assert main(["train", "--model", preset, "--steps", "1", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {preset} is {what}") and err.count("\n") == 1
    assert "scaleformer train trains causal language models" in err
    assert not (tmp_path / "run").exists()
