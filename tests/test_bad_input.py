"""Every bad or damaged input to the command line gets one line on stderr, exit code 2, and leaves the
checkpoints it touched byte-for-byte unchanged (table-driven: one row per case the audit found)."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import scaleformer as sf
from scaleformer.cli import main

TRAIN = ["--model", "retnet-tiny", "--tokenizer", "byte", "--seq-len", "32", "--batch-size", "2", "--eval-batches",
         "1", "--samples", "0", "--no-progress", "--steps", "2", "--save-every", "2", "--warmup", "1"]
CKPT = "checkpoints/step_0000002"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("trained")
    data = root / "corpus.txt"
    data.write_text("\n\n".join(topics[name] for name in sorted(topics)[:12]))
    assert main(["train", *TRAIN, "--data", str(data), "--out", str(root / "run")]) == 0
    return root


def _checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value))


def _edit_config(run: Path, **changes) -> None:
    config = json.loads((run / CKPT / "config.json").read_text())
    _write_json(run / CKPT / "config.json", {**config, **changes})


def _deepen(run: Path, count: int) -> None:
    """The checkpoint's config with its first layer repeated ``count`` times."""
    config = json.loads((run / CKPT / "config.json").read_text())
    _write_json(run / CKPT / "config.json", {**config, "layers": config["layers"][:1] * count})


def _edit_weights(run: Path, edit) -> None:
    path = run / CKPT / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _first_matrix(tensors):
    return next(name for name, t in tensors.items() if t.dim() == 2)


def _reshape_one(tensors):
    name = _first_matrix(tensors)
    tensors[name] = tensors[name].reshape(-1)


def _int64(tensors):
    for name in tensors:
        tensors[name] = tensors[name].long()


def _bfloat16(tensors):
    for name in tensors:
        tensors[name] = tensors[name].bfloat16()


def _nan(tensors):
    tensors[_first_matrix(tensors)][0, 0] = float("nan")


def _bad_rng_state(run):
    save_file({"torch/0": torch.zeros(7, dtype=torch.uint8)}, str(run / CKPT / "rng.safetensors"))


def _deep_json(path: Path) -> None:
    path.write_text("[" * 100_000 + "]" * 100_000)


def _fifo_data(run: Path) -> None:
    fifo = run.parent / "pipe.txt"
    os.mkfifo(fifo)
    _point_data_at(run, str(fifo))


def _point_data_at(run: Path, data: str) -> None:
    state = json.loads((run / CKPT / "trainer.json").read_text())
    _edit_trainer_state(run, train={**state["train"], "data": data})


def _edit_trainer_state(run: Path, **changes) -> None:
    state = json.loads((run / CKPT / "trainer.json").read_text())
    _write_json(run / CKPT / "trainer.json", {**state, **changes})


# (damage to a copy of the run, command (RUN, CKPT, TMP, DATA are filled in), what the line must say)
CASES = {
    "generate: truncated weights": (lambda r: _truncate(r / CKPT / "model.safetensors"), ["generate", "--checkpoint", "RUN"],
                                    "not a readable safetensors file"),
    "eval: truncated weights": (lambda r: _truncate(r / CKPT / "model.safetensors"), ["eval", "--checkpoint", "CKPT"],
                                "not a readable safetensors file"),
    "export-hf: truncated weights": (lambda r: _truncate(r / CKPT / "model.safetensors"), ["export-hf", "RUN", "TMP/hf"],
                                     "not a readable safetensors file"),
    "generate: pickled weights": (lambda r: torch.save({"x": torch.ones(2)}, r / CKPT / "model.safetensors"),
                                  ["generate", "--checkpoint", "CKPT"], "not a readable safetensors file"),
    "generate: wrong-shaped tensor": (lambda r: _edit_weights(r, _reshape_one), ["generate", "--checkpoint", "CKPT"],
                                      "but config.json builds"),
    "generate: int64 weights": (lambda r: _edit_weights(r, _int64), ["generate", "--checkpoint", "CKPT"],
                                "one floating dtype"),
    "train: bfloat16 weights in a training checkpoint": (lambda r: _edit_weights(r, _bfloat16),
                                                         ["train", *TRAIN, "--data", "DATA", "--out", "RUN"],
                                                         "training keeps float32 weights"),
    "generate: NaN weights": (lambda r: _edit_weights(r, _nan), ["generate", "--checkpoint", "CKPT"],
                              "holds NaN or infinite values"),
    "generate: config is a list": (lambda r: _write_json(r / CKPT / "config.json", [1, 2]),
                                   ["generate", "--checkpoint", "CKPT"], "a config must be a JSON object, got a list"),
    "eval: config is a string": (lambda r: _write_json(r / CKPT / "config.json", "retnet"),
                                 ["eval", "--checkpoint", "CKPT"], "a config must be a JSON object, got a str"),
    "export-hf: config deeply nested": (lambda r: _deep_json(r / CKPT / "config.json"), ["export-hf", "CKPT", "TMP/hf"],
                                        "not valid JSON"),
    "generate: 5 MB config": (lambda r: _write_json(r / CKPT / "config.json", "x" * 5_000_000),
                              ["generate", "--checkpoint", "CKPT"], "too large for a config"),
    "generate: 900 kB string inside the config": (lambda r: _edit_config(r, family="x" * 900_000),
                                                  ["generate", "--checkpoint", "CKPT"], "unknown config family"),
    "generate: vocab_size 2e8": (lambda r: _edit_config(r, vocab_size=200_000_000), ["generate", "--checkpoint", "CKPT"],
                                 "but config.json builds [200000000"),
    "generate: layers 1e3": (lambda r: _deepen(r, 1_000), ["generate", "--checkpoint", "CKPT"],
                             "asks for layers=1000, but the weights hold only"),
    "generate: an old flat config with layers 1e9": (
        lambda r: _write_json(r / CKPT / "config.json", {**sf.TransformerConfig(vocab_size=512).to_dict(),
                                                         "layers": 1_000_000_000}),
        ["generate", "--checkpoint", "CKPT"], "asks for layers=1000000000, but the weights hold only"),
    "train: trainer.json of another step": (lambda r: _edit_trainer_state(r, step=7),
                                            ["train", *TRAIN, "--data", "DATA", "--out", "RUN"],
                                            "trainer.json is for another step than its directory's"),
    "generate: damaged tokenizer": (lambda r: (r / CKPT / "tokenizer.json").write_text("{\"scaleformer_tok"),
                                    ["generate", "--checkpoint", "CKPT"], "the tokenizer file is damaged"),
    "generate: missing tokenizer": (lambda r: (r / CKPT / "tokenizer.json").unlink(), ["generate", "--checkpoint", "CKPT"],
                                    "tokenizer.json not found"),
    "export-hf: missing tokenizer": (lambda r: (r / CKPT / "tokenizer.json").unlink(), ["export-hf", "CKPT", "TMP/hf"],
                                     "lost its tokenizer"),
    "train: damaged rng file": (lambda r: (r / CKPT / "rng.safetensors").write_bytes(b"\x00" * 40),
                                ["train", *TRAIN, "--data", "DATA", "--out", "RUN"], "none is complete"),
    "train: rng state of the wrong size": (_bad_rng_state, ["train", *TRAIN, "--data", "DATA", "--out", "RUN"],
                                           "rng.safetensors"),
    "train: damaged optimizer": (lambda r: _truncate(r / CKPT / "optimizer.safetensors"),
                                 ["train", *TRAIN, "--data", "DATA", "--out", "RUN"], "optimizer.safetensors"),
    "train: damaged trainer.json": (lambda r: (r / CKPT / "trainer.json").write_text("{\"step\": "),
                                    ["train", *TRAIN, "--data", "DATA", "--out", "RUN"], "trainer.json: the trainer state is damaged"),
    "train: trainer.json is a list": (lambda r: _write_json(r / CKPT / "trainer.json", []),
                                      ["train", *TRAIN, "--data", "DATA", "--out", "RUN"], "the trainer state must be a JSON object, got a list"),
    "train: resume with another seed": (None, ["train", *TRAIN, "--data", "DATA", "--out", "RUN", "--seed", "5"],
                                        "trained with other options (seed 0 -> 5)"),
    "train: resume with another seq-len": (None, ["train", *TRAIN, "--data", "DATA", "--out", "RUN", "--seq-len", "16"],
                                           "seq_len 32 -> 16"),
    "train: resume with another lr": (None, ["train", *TRAIN, "--data", "DATA", "--out", "RUN", "--lr", "0.1"],
                                      "lr 0.003 -> 0.1"),
    "train: --out is a file": (None, ["train", *TRAIN, "--data", "DATA", "--out", "DATA"], "is a file, not a directory"),
    "train: --out cannot be created": (None, ["train", *TRAIN, "--data", "DATA", "--out", "/proc/scaleformer/run"],
                                       "cannot write there"),
    "train: --device tpu": (None, ["train", *TRAIN, "--data", "DATA", "--out", "TMP/new", "--device", "tpu"],
                            "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    "train: --grad-clip -1": (None, ["train", *TRAIN, "--data", "DATA", "--out", "TMP/new", "--grad-clip", "-1"],
                              "grad_clip must be a finite number >= 0"),
    "train: --warmup -5": (None, ["train", *TRAIN, "--data", "DATA", "--out", "TMP/new", "--warmup", "-5"],
                           "warmup must be a finite number >= 0"),
    "train: --lr nan": (None, ["train", *TRAIN, "--data", "DATA", "--out", "TMP/new", "--lr", "nan"],
                        "TrainConfig.lr must be a finite float, got nan"),
    "train: --config is a JSON list": (lambda r: _write_json(r.parent / "options.json", [1]),
                                       ["train", "--config", "TMP/options.json"], "must hold an object of train options"),
    "train: --config is unsafe YAML": (lambda r: (r.parent / "options.yaml").write_text(
        "steps: !!python/object/apply:os.system ['echo owned']\n"), ["train", "--config", "TMP/options.yaml"],
        "not plain YAML"),
    "train: --config is deeply nested YAML": (lambda r: (r.parent / "deep.yaml").write_text(
        "a: " + "[" * 5000 + "]" * 5000 + "\n"), ["train", "--config", "TMP/deep.yaml"], "not plain YAML"),
    "convert-torchscale: config is a list": (lambda r: (_write_json(r.parent / "ts.json", [1]),
                                                        torch.save({"a": torch.ones(2)}, r.parent / "ts.pt")),
                                             ["convert-torchscale", "--weights", "TMP/ts.pt", "--config",
                                              "TMP/ts.json", "--out", "TMP/converted"],
                                             "a TorchScale config must be a JSON object, got a list"),
    "export-hf: out is a file": (lambda r: (r.parent / "file").write_text("x"), ["export-hf", "RUN", "TMP/file"],
                                 "exists and is not a directory"),
    # writers never land on training state (issue 31): the source, a checkpoint, a run, or a folder holding one
    "export-hf: out is the checkpoint": (None, ["export-hf", "CKPT", "CKPT"], "is the source"),
    "export-hf: out is another checkpoint": (lambda r: shutil.copytree(r / CKPT, r / "checkpoints" / "step_0000001"),
                                             ["export-hf", "CKPT", "TMP/run/checkpoints/step_0000001"],
                                             "is a training checkpoint; export-hf would overwrite it"),
    "export-hf: out is the run": (None, ["export-hf", "CKPT", "RUN"], "is the source"),
    "export-hf: out inside a checkpoint": (None, ["export-hf", "RUN", "TMP/run/checkpoints/step_0000002/hf"], "is the source"),
    "export-hf: out holds the run": (None, ["export-hf", "CKPT", "TMP"], "is the source"),
    "export-hf: out holds another run": (lambda r: shutil.copytree(r, r.parent / "other" / "run2"),
                                         ["export-hf", "CKPT", "TMP/other"], "holds a run directory"),
    "export: out is a copy of the run": (lambda r: shutil.copytree(r, r.parent / "run2"),
                                         ["export", "RUN", "TMP/run2"], "is a run directory"),
    "pack-bitnet: out is the checkpoint": (None, ["pack-bitnet", "RUN", "CKPT"], "is the source"),
    "pack-bitnet: out in the run's checkpoints": (None, ["pack-bitnet", "RUN", "TMP/run/checkpoints/packed"],
                                                  "is inside"),
    "convert-torchscale: out is a checkpoint": (lambda r: torch.save({"a": torch.ones(2)}, r.parent / "ts.pt"),
                                                ["convert-torchscale", "--weights", "TMP/ts.pt", "--out", "CKPT"],
                                                "is a training checkpoint; convert-torchscale would overwrite it"),
    "train: --data is a FIFO": (lambda r: os.mkfifo(r.parent / "fifo.txt"),
                                ["train", *TRAIN, "--data", "TMP/fifo.txt", "--out", "TMP/new"], "not a regular file"),
    "generate: --temperature nan": (None, ["generate", "--checkpoint", "RUN", "--temperature", "nan"],
                                    "temperature must be a finite number >= 0"),
    "generate: --top-p 2": (None, ["generate", "--checkpoint", "RUN", "--top-p", "2"], "top_p must be in (0, 1]"),
    "eval: --batches 0": (None, ["eval", "--checkpoint", "RUN", "--batches", "0"], "--batches must be >= 1"),
    "eval: --batches -1": (None, ["eval", "--checkpoint", "RUN", "--batches", "-1"], "--batches must be >= 1"),
    "eval: recorded data is /etc/passwd": (lambda r: _point_data_at(r, "/etc/passwd"), ["eval", "--checkpoint", "RUN"],
                                           "/etc/passwd (the training data the checkpoint records): not the data the "
                                           "checkpoint was trained on"),
    "eval: recorded data is /dev/zero": (lambda r: _point_data_at(r, "/dev/zero"), ["eval", "--checkpoint", "RUN"],
                                         "not a regular file or folder"),
    "eval: recorded data is a FIFO": (_fifo_data, ["eval", "--checkpoint", "RUN"], "not a regular file or folder"),
    # issue 31: inputs that crashed, hung or exited 0 silently
    "compare --replot: a JSON list": (lambda r: _write_json(r.parent / "c.json", [1]),
                                      ["compare", "--replot", "TMP/c.json"], "must be a JSON object, got a list"),
    "compare --replot: no models": (lambda r: _write_json(r.parent / "c.json", {"settings": {}}),
                                    ["compare", "--replot", "TMP/c.json"], "not a compare.json written by scaleformer "
                                                                           "compare (no list of models)"),
    "compare --replot: a bad row": (lambda r: _write_json(r.parent / "c.json", {"models": [{"model": "x", "curve": [1]}]}),
                                    ["compare", "--replot", "TMP/c.json"], "its row 'x' is not a measured model"),
    "compare --replot: a binary file": (lambda r: (r.parent / "c.json").write_bytes(b"\x89PNG\xff\xfe" * 10),
                                        ["compare", "--replot", "TMP/c.json"], "not valid JSON"),
    "compare --contexts -5": (None, ["compare", "gpt-tiny", "--out", "TMP/new", "--contexts", "-5"],
                              "--contexts must be prompt lengths >= 1, got -5"),
    "compare --decode-steps -1": (None, ["compare", "gpt-tiny", "--out", "TMP/new", "--decode-steps", "-1"],
                                  "--decode-steps must be >= 1, got -1"),
    "reproduce --set steps=0": (None, ["reproduce", "deepnet", "--quick", "--out", "TMP/new", "--set", "steps=0"],
                                "setting `steps` must be a finite number > 0, got 0"),
    "reproduce --set steps=-1": (None, ["reproduce", "deepnet", "--quick", "--out", "TMP/new", "--set", "steps=-1"],
                                 "setting `steps` must be a finite number > 0, got -1"),
    "reproduce --set lr=nan": (None, ["reproduce", "deepnet", "--quick", "--out", "TMP/new", "--set", "lr=NaN"],
                               "setting `lr` must be a finite number > 0"),
    "reproduce --set mixers=[]": (None, ["reproduce", "mqar", "--quick", "--out", "TMP/new", "--set", "mixers=[]"],
                                  "setting `mixers` needs at least one value"),
    "reproduce --set depths=[0]": (None, ["reproduce", "deepnet", "--quick", "--out", "TMP/new", "--set", "depths=[0]"],
                                   "setting `depths` must be a finite number > 0, got 0"),
    "reproduce --device tpu": (None, ["reproduce", "deepnet", "--quick", "--out", "TMP/new", "--device", "tpu"],
                               "--device 'tpu': choose cpu, cuda or cuda:N"),
    "train: a huge --model json": (lambda r: _write_json(r.parent / "huge.json", {
        "family": "transformer", "arch": "decoder", "embed_dim": 65536, "heads": 16, "layers": 40}),
        ["train", *TRAIN, "--data", "DATA", "--out", "TMP/new", "--model", "TMP/huge.json"],
        "training needs about"),
    "train: --model-options layers=1e6": (None, ["train", *TRAIN, "--data", "DATA", "--out", "TMP/new",
                                                 "--model-options", "layers=1000000"], "more than 4096 layers"),
    "train: --task-options vocab_size=1e9": (None, ["train", "--task", "mqar", "--task-options", "vocab_size=1000000000",
                                                    "--steps", "2", "--out", "TMP/new", "--no-progress"],
                                             "vocab_size=1000000000 is beyond 1,048,576"),
    "train: --vocab-size 1e9": (None, ["train", *TRAIN, "--data", "DATA", "--out", "TMP/new", "--vocab-size",
                                       "1000000000"], "vocab_size must be <= 16,777,216"),
    "train: --lr 1e6 diverges": (None, ["train", "--model", "gpt-tiny", "--tokenizer", "byte", "--seq-len", "32",
                                        "--batch-size", "2", "--eval-batches", "1", "--samples", "0", "--no-progress",
                                        "--steps", "2", "--save-every", "2", "--data", "DATA", "--out", "TMP/new",
                                        "--lr", "1e6", "--warmup", "0"], "not finite"),
    "eval: missing checkpoint": (None, ["eval", "--checkpoint", "TMP/nothing"], "no such checkpoint or run directory"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_one_line_and_exit_2_and_damages_nothing(case, trained, tmp_path, capsys):
    damage, argv, expected = CASES[case]
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    if damage is not None:
        damage(run)
    before = _checksums(run)
    fill = {"RUN": str(run), "CKPT": str(run / CKPT), "DATA": str(trained / "corpus.txt")}
    argv = [fill.get(a, a.replace("TMP", str(tmp_path))) for a in argv]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err[:2000]
    assert expected in err, err[:2000]
    assert len(err) < 800
    assert _checksums(run) == before
    assert not (tmp_path / "new").exists() or not (tmp_path / "new" / "checkpoints").exists()


def test_cuda_device_without_cuda_is_one_line(tmp_path, trained, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", *TRAIN, "--data", str(trained / "corpus.txt"), "--out", str(tmp_path / "x"),
                 "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: CUDA is not available here" in err and err.count("\n") == 1


def test_a_read_only_out_is_one_line(tmp_path, trained, capsys, monkeypatch):
    """(As root, permissions cannot make a directory read-only here: the lock file's creation is refused.)"""
    import scaleformer.train.rundir as rundir

    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(rundir.os, "open", read_only)
    assert main(["train", *TRAIN, "--data", str(trained / "corpus.txt"), "--out", str(tmp_path / "ro")]) == 2
    err = capsys.readouterr().err
    assert "cannot write there (Permission denied)" in err and err.count("\n") == 1


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_checkpoint(tmp_path, trained, capsys, monkeypatch):
    import scaleformer.train.checkpoint as checkpoint

    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    before = _checksums(run / "checkpoints")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(run / "checkpoints" / "x"))

    monkeypatch.setattr(checkpoint, "save_file", full)
    argv = ["train", *TRAIN, "--data", str(trained / "corpus.txt"), "--out", str(run), "--steps", "3",
            "--allow-changes"]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("error:")] == [err[-1]]
    assert "No space left on device" in err[-1]
    assert _checksums(run / "checkpoints") == before
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no partial directory


def test_model_options_take_nested_configs(tmp_path, trained):
    out = tmp_path / "moe"
    assert main(["train", *TRAIN, "--data", str(trained / "corpus.txt"), "--out", str(out), "--model-options",
                 'moe={"experts": 2, "top_k": 1}']) == 0
    config = json.loads((out / CKPT / "config.json").read_text())
    assert [layer["ffn"]["kind"] for layer in config["layers"]] == ["glu", "moe"]  # X-MoE's every second layer
    assert config["layers"][1]["ffn"]["routing"]["experts"] == 2 and config["layers"][1]["ffn"]["routing"]["top_k"] == 1


def test_a_diverged_run_keeps_its_last_finite_checkpoint_and_saves_nothing_after(tmp_path, trained, capsys):
    """--lr 1e6: the loss before the last update is finite, the weights after it are not usable; the run
    stops with one line, exit 2, and the checkpoint of the step before stays the newest."""
    from scaleformer.train.checkpoint import latest_checkpoint

    argv = ["train", "--model", "gpt-tiny", "--tokenizer", "byte", "--seq-len", "32", "--batch-size", "2",
            "--eval-batches", "1", "--samples", "0", "--no-progress", "--steps", "3", "--save-every", "1", "--data",
            str(trained / "corpus.txt"), "--out", str(tmp_path / "run"), "--lr", "1e6", "--warmup", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: step ") and "not finite" in err and err.count("\n") == 1, err
    saved = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert 1 <= len(saved) < 3 and latest_checkpoint(tmp_path / "run") == saved[-1]
    for checkpoint in saved:  # no saved checkpoint holds a non-finite weight
        assert all(torch.isfinite(t).all() for t in load_file(str(checkpoint / "model.safetensors")).values())


def test_an_empty_prompt_generates_from_the_start_token(trained, capsys):
    assert main(["generate", "--checkpoint", str(trained / "run"), "--prompt", "", "--max-new-tokens", "3"]) == 0
    assert "output:" in capsys.readouterr().out
