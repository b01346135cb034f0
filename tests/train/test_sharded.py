"""Sharded checkpoints in one process: the format, its checks, loading and export. (Several processes, FSDP2
and resharding: tests/train/test_distributed.py; kills at every step and a full disk: test_recovery.py.)"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import scaleformer as sf
from scaleformer.cli import main
from scaleformer.train.checkpoint import incomplete_reason, latest_checkpoint
from scaleformer.train.sharded import SHARDS
from scaleformer.train.trainer import TrainConfig, Trainer
from tests.train.test_recovery import _cfg, data  # noqa: F401  (fixture)

SHARD = "shard-00001-model-00001-of-00001.safetensors"


@pytest.fixture(scope="module")
def twin(tmp_path_factory, data):  # noqa: F811
    """The same 4-step run (dropout on) saved full and sharded, checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("twin")
    for fmt in ("full", "sharded"):
        Trainer(_cfg(data, root / fmt, checkpoint=fmt, save_every=2)).run()
    return root


def _copy(twin: Path, tmp_path: Path) -> Path:
    shutil.copytree(twin / "sharded", tmp_path / "run")
    return tmp_path / "run"


def test_the_sharded_format_holds_the_same_state_as_the_full_one(twin):
    full, sharded = latest_checkpoint(twin / "full"), latest_checkpoint(twin / "sharded")
    assert sorted(p.name for p in sharded.iterdir()) == ["config.json", "rng.safetensors", SHARDS, "tokenizer.json",
                                                         "trainer.json"]
    assert incomplete_reason(sharded) is None
    shards = load_file(str(sharded / SHARDS / SHARD))
    weights, optimizer = load_file(str(full / "model.safetensors")), load_file(str(full / "optimizer.safetensors"))
    # Every weight (a tied one once) and every optimizer tensor, bit for bit: one process holds everything.
    assert {k.removeprefix("model/") for k in shards if k.startswith("model/")} == set(weights)
    assert {k for k in shards if k.startswith("state/")} == set(optimizer)
    assert all(torch.equal(shards[f"model/{k}"], v) for k, v in weights.items())
    assert all(torch.equal(shards[k], v) for k, v in optimizer.items())
    with safe_open(str(sharded / SHARDS / SHARD), framework="pt") as handle:  # where each piece sits
        assert "DCP_SHARDING_INFO" in handle.metadata()
    state = json.loads((sharded / "trainer.json").read_text())
    assert state["shards"]["files"] == [SHARD] and state["optimizer"]["param_groups"]
    assert not any(p.suffix == ".metadata" or p.name == ".metadata" for p in sharded.rglob("*"))  # no pickle
    # scaleformer.load reads it as it reads the full one
    loaded = sf.load(sharded).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())


def test_a_sharded_run_resumes_bit_identically_and_across_formats(twin, data, tmp_path):  # noqa: F811
    whole = load_file(str(latest_checkpoint(twin / "full") / "model.safetensors"))
    for start, fmt in (("sharded", "sharded"), ("sharded", "full"), ("full", "sharded")):
        run = tmp_path / f"{start}-{fmt}"
        shutil.copytree(twin / start, run)
        shutil.rmtree(run / "checkpoints" / "step_0000004")
        (run / "checkpoints" / "latest").write_text("step_0000002")
        assert Trainer(_cfg(data, run, checkpoint=fmt, save_every=2)).run()["step"] == 4
        resumed = sf.load(latest_checkpoint(run)).state_dict()
        assert all(torch.equal(resumed[k], v) for k, v in whole.items()), (start, fmt)


@pytest.mark.parametrize("damage", ["missing", "extra", "truncated", "uncovered", "foreign-tensor", "bad-entry"])
def test_a_damaged_sharded_checkpoint_is_incomplete_and_the_run_falls_back(damage, twin, data, tmp_path, capsys):  # noqa: F811
    run = _copy(twin, tmp_path)
    newest = latest_checkpoint(run)
    shard, trainer_json = newest / SHARDS / SHARD, newest / "trainer.json"
    state = json.loads(trainer_json.read_text())
    if damage == "missing":
        shard.unlink()
    elif damage == "extra":  # a stray file would be read as more pieces
        shutil.copy(shard, newest / SHARDS / "shard-00002-model-00001-of-00001.safetensors")
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "uncovered":  # an optimizer tensor the description lists has no piece
        with safe_open(str(shard), framework="pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(str(shard))
        del tensors[next(k for k in tensors if k.startswith("state/"))]
        save_file(tensors, str(shard), metadata=metadata)
    elif damage == "foreign-tensor":
        tensors = load_file(str(shard))
        tensors["model/smuggled"] = torch.zeros(2)
        save_file(tensors, str(shard))
    else:
        state["shards"] = "everything"
        trainer_json.write_text(json.dumps(state))
    reason = incomplete_reason(newest)
    assert reason is not None and "\n" not in reason, reason
    assert latest_checkpoint(run).name == "step_0000002"
    # resuming passes over it with one note, and the run completes to the same weights
    assert Trainer(_cfg(data, run, checkpoint="sharded", save_every=2)).run()["step"] == 4
    assert "using step_0000002" in capsys.readouterr().err
    whole = sf.load(latest_checkpoint(twin / "sharded")).state_dict()
    assert all(torch.equal(sf.load(latest_checkpoint(run)).state_dict()[k], v) for k, v in whole.items())


def test_nan_in_a_shard_is_passed_over_when_loading(twin, data, tmp_path, capsys):  # noqa: F811
    run = _copy(twin, tmp_path)
    shard = latest_checkpoint(run) / SHARDS / SHARD
    tensors = load_file(str(shard))
    key = next(k for k in tensors if k.startswith("model/"))
    tensors[key][0] = float("nan")  # headers still complete: only loading can tell
    with safe_open(str(shard), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(tensors, str(shard), metadata=metadata)
    assert incomplete_reason(latest_checkpoint(run)) is None
    with pytest.raises(ValueError, match="NaN or infinite"):
        sf.load(latest_checkpoint(run))
    assert Trainer(_cfg(data, run, checkpoint="sharded", save_every=2)).run()["step"] == 4
    err = capsys.readouterr().err
    assert "NaN or infinite" in err and "using step_0000002" in err


def test_a_failing_shard_write_is_one_error_and_leaves_the_checkpoints_alone(
        twin, data, tmp_path, monkeypatch, capsys):  # noqa: F811
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

    run = _copy(twin, tmp_path)
    before = {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}

    def full_disk(self, plan, planner):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(HuggingFaceStorageWriter, "write_data", full_disk)
    argv = ["train", "--model", "retnet-tiny", "--tokenizer", "byte", "--seq-len", "16", "--batch-size", "2",
            "--steps", "5", "--eval-batches", "1", "--samples", "0", "--no-progress", "--data", str(data), "--out",
            str(run), "--checkpoint", "sharded", "--model-options", "dropout=0.1", "--warmup", "1",
            "--log-every", "1", "--save-every", "2", "--allow-changes"]
    assert main(argv) == 2  # DCP's CheckpointException (a BaseException) became the OSError it wraps
    err = capsys.readouterr().err.splitlines()  # a note that --steps changed, then the error
    assert len(err) == 2 and err[1].startswith("error: ") and "No space left on device" in err[1], err
    assert {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()} == before
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_export_writes_one_model_directory_from_either_format(twin, tmp_path, capsys):
    reference = sf.load(latest_checkpoint(twin / "full"))
    ids = torch.tensor([[5, 6, 7, 8]])
    for fmt in ("sharded", "full"):
        out = tmp_path / f"export-{fmt}"
        assert main(["export", str(twin / fmt), str(out)]) == 0
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
        model = sf.load(out)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.state_dict().items())
        assert torch.equal(sf.generate(model.eval(), ids, 6), sf.generate(reference.eval(), ids, 6))
    assert "wrote" in capsys.readouterr().out
    # --dtype casts; a second export replaces the first in one step
    assert main(["export", str(twin / "sharded"), str(tmp_path / "export-sharded"), "--dtype", "bfloat16"]) == 0
    assert {t.dtype for t in sf.load(tmp_path / "export-sharded").state_dict().values()} == {torch.bfloat16}
    # one line, nothing touched, for an output that is the checkpoint or holds other files
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    for out in (foreign, latest_checkpoint(twin / "sharded"), twin / "sharded"):
        capsys.readouterr()
        assert main(["export", str(twin / "sharded"), str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert (foreign / "mine.txt").read_text() == "keep"
    assert incomplete_reason(latest_checkpoint(twin / "sharded")) is None


def test_hf_export_reads_a_sharded_checkpoint(twin, tmp_path):
    pytest.importorskip("transformers")
    from scaleformer.hf import export_hf

    out = export_hf(twin / "sharded", tmp_path / "hf")
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    import scaleformer.hf  # noqa: F401  (registers the classes)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[5, 6, 7, 8]])
    reference = sf.load(latest_checkpoint(twin / "full")).eval()
    assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-6)


def test_train_config_takes_the_checkpoint_option():
    assert TrainConfig(checkpoint="sharded").checkpoint == "sharded"
