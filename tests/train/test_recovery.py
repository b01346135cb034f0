"""Crash safety as a property: a kill before and after every file-system step of a checkpoint save and of
``scaleformer.save`` loses nothing; a run directory has one writer; damaged or hostile checkpoints are
passed over, never followed, and a run holding checkpoints never restarts from scratch."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import scaleformer as sf
from scaleformer import durable
from scaleformer.cli import main
from scaleformer.train.checkpoint import incomplete_reason, latest_checkpoint
from scaleformer.train.trainer import TrainConfig, Trainer
from tests.conftest import make_model, tiny


class SimulatedKill(BaseException):
    """Raised at a fault point; a BaseException, so `except Exception` clean-ups are skipped, as under SIGKILL."""


def _kill_at(n: int):
    calls = []

    def hook(step, path):
        calls.append((step, path.name))
        if len(calls) == n:
            raise SimulatedKill(f"killed before {step} {path.name}")

    return hook, calls


@pytest.fixture
def faults(monkeypatch):
    def install(hook):
        monkeypatch.setattr(durable, "FAULTS", hook)
    return install


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n\n".join(topics[name] for name in sorted(topics)[:12]))
    return path


def _cfg(data: Path, out: Path, **overrides) -> TrainConfig:
    base = dict(model="retnet-tiny", tokenizer="byte", seq_len=16, batch_size=2, eval_batches=1, samples=0,
                progress=False, data=str(data), out=str(out), warmup=1, steps=4, save_every=1, log_every=1,
                model_options=("dropout=0.1",))  # dropout: the RNG state must be restored too
    base.update(overrides)
    return TrainConfig(**base)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run) / "model.safetensors"))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """An uninterrupted 4-step run, and the same run stopped after step 2 (checkpoints 1 and 2)."""
    root = tmp_path_factory.mktemp("runs")
    Trainer(_cfg(data, root / "whole")).run()
    half = Trainer(_cfg(data, root / "half"))
    train_step = half.train_step

    def stop_after_two(step):  # what a SIGTERM after step 2 does: save at the step boundary and exit
        metrics = train_step(step)
        half.stop_requested = step + 1 >= 2
        return metrics

    half.train_step = stop_after_two
    assert half.run() == {"step": 2, "stopped": True, "signal": 15}  # as a SIGTERM would
    return root


def _interrupted_save(runs, data, work: Path, step: int, hook, checkpoint: str = "full") -> None:
    """Resume the half run in ``work``, reach ``step`` (2: re-save the step it resumed from, as a SIGTERM during
    set-up does; 3: a new step), and save with ``hook`` installed; the process then 'dies' (its lock goes)."""
    shutil.copytree(runs / "half", work)
    trainer = Trainer(_cfg(data, work, checkpoint=checkpoint))
    trainer._setup()
    while trainer.step < step:
        trainer.train_step(trainer.step)
        trainer.step += 1
    durable.FAULTS = hook
    try:
        trainer.save()
    except SimulatedKill:
        pass
    finally:
        durable.FAULTS = None
        trainer.lock.release()


@pytest.mark.parametrize("step, exchange, checkpoint", [(2, True, "full"), (3, True, "full"), (2, False, "full"),
                                                     (3, True, "sharded")],
                         ids=["re-save-of-the-resumed-step", "new-step", "re-save-without-RENAME_EXCHANGE",
                              "new-step-sharded"])
def test_a_kill_at_every_step_of_a_checkpoint_save_loses_nothing(step, exchange, checkpoint, runs, data, tmp_path,
                                                                  monkeypatch):
    """After a kill before (or after) any file-system step: `latest` names a complete checkpoint, it loads,
    and the resumed run ends bit-identical to one never interrupted. Where the file system cannot exchange
    two directories, re-saving a step has one window (between two renames) in which `latest` dangles; the
    next writer's clean-up finishes that install before it removes anything, so the checkpoint is kept. A sharded save (resumed from the
    full checkpoint before it: formats mix freely) has the same guarantee."""
    if not exchange:
        monkeypatch.setattr(durable, "_exchange", lambda a, b: False)
    hook, calls = _kill_at(10**9)
    _interrupted_save(runs, data, tmp_path / "count", step, hook, checkpoint)  # count a whole save's fault points
    assert len(calls) >= 15 and {"mkdir", "write", "fsync", "rename"} <= {c[0] for c in calls}
    if checkpoint == "sharded":
        assert ("write", "shards") in calls and ("fsync", "shard-00001-model-00001-of-00001.safetensors") in calls
    for n in range(1, len(calls) + 2):  # kill before each step, and (n = len + 1) after the last one
        work = tmp_path / f"kill{n}"
        _interrupted_save(runs, data, work, step, _kill_at(n)[0], checkpoint)
        pointer = (work / "checkpoints" / "latest").read_text()
        dangling = incomplete_reason(work / "checkpoints" / pointer)
        if not exchange and dangling is not None:  # only between the two renames, until the next writer
            assert calls[n - 2] == ("rename", "step_0000002") and calls[n - 1] == ("rename", "step_0000002"), n
            durable.remove_leftovers(work / "checkpoints")  # what it does first, holding the run's lock
            dangling = incomplete_reason(work / "checkpoints" / pointer)
        assert dangling is None, (n, calls[n - 1: n])
        sf.load(latest_checkpoint(work))  # the newest complete checkpoint loads
        assert Trainer(_cfg(data, work)).run()["step"] == 4
        _assert_same(_weights(work), _weights(runs / "whole"))  # and the resumed run is bit-identical
        assert not [p for p in (work / "checkpoints").iterdir() if p.name.startswith(".tmp") or ".tmp-" in p.name]


def test_a_kill_at_every_step_of_sf_save_leaves_the_old_or_the_new_model(tmp_path):
    old, new = make_model(tiny(), seed=0), make_model(tiny(layers=3), seed=1)
    ids = torch.randint(0, 97, (1, 6))
    expected = {name: m(ids).logits for name, m in (("old", old), ("new", new))}
    hook, calls = _kill_at(10**9)
    sf.save(old, tmp_path / "count")
    durable.FAULTS = hook
    try:
        sf.save(new, tmp_path / "count")
    finally:
        durable.FAULTS = None
    seen = set()
    for n in range(1, len(calls) + 2):
        target = tmp_path / f"kill{n}"
        sf.save(old, target)
        (target / "notes.txt").write_text("kept")  # other files of the directory survive a re-save
        durable.FAULTS = _kill_at(n)[0]
        try:
            sf.save(new, target)
        except SimulatedKill:
            pass
        finally:
            durable.FAULTS = None
        loaded = sf.load(target)  # config and weights always belong together
        which = "old" if loaded.config == old.config else "new"
        seen.add(which)
        assert torch.equal(loaded(ids).logits, expected[which]), n
        assert (target / "notes.txt").read_text() == "kept"
    assert seen == {"old", "new"}
    # The next save removes what killed writers left (their pid is gone), never a live writer's directory.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".kill1.tmp-{dead}-0123abcd").mkdir()
    (tmp_path / f".kill1.old-{dead}-0123abcd").mkdir()
    live = [p.name for p in tmp_path.iterdir() if p.name.startswith(".kill1.")]
    sf.save(new, tmp_path / "kill1")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".kill1.")) == sorted(
        name for name in live if f"-{dead}-" not in name)


def test_a_full_disk_while_writing_weights_keeps_the_old_pair(tmp_path, monkeypatch):
    import importlib

    build = importlib.import_module("scaleformer.build")  # (scaleformer.build is also the function)
    old = make_model(tiny(), seed=0)
    sf.save(old, tmp_path / "m")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(build, "save_file", full)
    with pytest.raises(OSError, match="No space left"):
        sf.save(make_model(tiny(layers=3), seed=1), tmp_path / "m")
    assert sf.load(tmp_path / "m").config == old.config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # the partial directory was removed


def test_a_second_train_on_the_same_out_is_refused_and_a_killed_ones_lock_is_stale(tmp_path, data, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from scaleformer.train.rundir import RunLock; RunLock(Path(sys.argv[1])); "
                               "print('locked', flush=True); time.sleep(600)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = ["train", "--model", "retnet-tiny", "--tokenizer", "byte", "--seq-len", "16", "--batch-size", "2",
                "--steps", "1", "--eval-batches", "1", "--samples", "0", "--no-progress", "--data", str(data),
                "--out", str(out)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"is in use by another scaleformer train (pid {holder.pid})" in err and err.count("\n") == 1
        assert not (out / "checkpoints").exists()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        assert main(argv) == 0  # the lock died with its process
        assert latest_checkpoint(out).name == "step_0000001"
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_the_same_process_cannot_train_twice_into_one_run(tmp_path, data):
    first = Trainer(_cfg(data, tmp_path / "run", steps=1))
    first._claim_run_dir()
    with pytest.raises(ValueError, match="is in use by another scaleformer train"):
        Trainer(_cfg(data, tmp_path / "run", steps=1)).run()
    first.lock.release()


@pytest.mark.parametrize("pointer", ["/etc", "../../..", "step_0000002/../../../x", "step_0000009", ""])
def test_latest_is_resolved_only_inside_the_run_and_falls_back_with_a_note(pointer, runs, data, tmp_path, capsys):
    work = tmp_path / "run"
    shutil.copytree(runs / "half", work)
    (work / "checkpoints" / "latest").write_text(pointer)
    capsys.readouterr()
    assert Trainer(_cfg(data, work)).run()["step"] == 4
    err = capsys.readouterr().err
    assert err.count("note: ") == 1 and "using step_0000002, the newest complete checkpoint" in err, err
    _assert_same(_weights(work), _weights(runs / "whole"))


def test_a_damaged_newest_checkpoint_is_passed_over_and_its_removal_is_safe(runs, data, tmp_path, capsys):
    """NaN weights pass every header check; loading them fails, and the run continues from step 1, exactly."""
    work = tmp_path / "run"
    shutil.copytree(runs / "half", work)
    path = work / "checkpoints" / "step_0000002" / "model.safetensors"
    tensors = load_file(str(path))
    name = next(iter(tensors))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(path))
    capsys.readouterr()
    assert Trainer(_cfg(data, work)).run()["step"] == 4
    err = capsys.readouterr().err
    assert "holds NaN or infinite values" in err and "using step_0000001" in err
    _assert_same(_weights(work), _weights(runs / "whole"))


def test_a_run_with_only_damaged_checkpoints_never_restarts_from_scratch(runs, data, tmp_path, capsys):
    work = tmp_path / "run"
    shutil.copytree(runs / "half", work)
    for checkpoint in (work / "checkpoints").glob("step_*"):
        (checkpoint / "trainer.json").write_text("{")
    argv = ["train", "--model", "retnet-tiny", "--tokenizer", "byte", "--data", str(data), "--out", str(work)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "holds checkpoints but none is complete" in err and "move checkpoints/ away" in err
    assert not (work / "checkpoints" / "step_0000000").exists() and len(list((work / "checkpoints").glob("step_*"))) == 2


def test_leftovers_of_killed_saves_are_removed_at_start_and_metrics_match_the_resumed_step(runs, data, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(runs / "whole", work)
    shutil.rmtree(work / "checkpoints" / "step_0000004")
    (work / "checkpoints" / "latest").write_text("step_0000003")
    leftovers = [work / "checkpoints" / ".tmp-step_0000004-99999", work / "checkpoints" / ".step_0000004.tmp-4242-0123abcd"]
    for folder in leftovers:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    (work / "checkpoints" / ".latest.tmp-4242-89abcdef").write_text("step_0000004")
    before = (work / "metrics.jsonl").read_text()
    assert Trainer(_cfg(data, work)).run()["step"] == 4
    assert not [p for p in (work / "checkpoints").iterdir() if p.name.startswith(".")]
    steps = [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # step 4 was logged before the kill and again after the resume: once
    def records(text):  # everything but the throughput is a function of the step
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in text.splitlines()]

    assert records((work / "metrics.jsonl").read_text()) == records(before)


def test_the_cuda_generator_state_is_saved_and_restored(tmp_path, monkeypatch):
    """GPU runs with dropout draw from the CUDA generator: its state goes into rng.safetensors (cuda/<rank>)."""
    from scaleformer.train import checkpoint

    model = make_model(tiny())
    from scaleformer.data.tokenizer import ByteTokenizer

    cuda_state = torch.arange(16, dtype=torch.uint8)
    checkpoint.save_checkpoint(tmp_path, 1, model, {"state": {}, "param_groups": []}, ByteTokenizer(),
                               {"train": {}}, cuda_rng_states=[cuda_state])
    states = load_file(str(tmp_path / "checkpoints" / "step_0000001" / "rng.safetensors"))
    assert torch.equal(states["cuda/0"], cuda_state) and "torch/0" in states
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append(state))
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoint.load_training_state(tmp_path / "checkpoints" / "step_0000001", model, optimizer,
                                   device=torch.device("cuda", 0))
    assert len(restored) == 1 and torch.equal(restored[0], cuda_state)


@pytest.fixture
def small_disk(tmp_path):
    """A real file system of 3 MiB (tmpfs): room for one tiny checkpoint, not two. Needs root."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()[:100]}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.parametrize("checkpoint", ["full", "sharded"])
def test_a_really_full_disk_is_one_line_and_keeps_the_last_checkpoint(checkpoint, small_disk, data, capsys):
    out = small_disk / "run"
    argv = ["train", "--model", "retnet-tiny", "--tokenizer", "byte", "--seq-len", "16", "--batch-size", "2",
            "--steps", "5", "--save-every", "1", "--eval-batches", "1", "--samples", "0", "--no-progress",
            "--data", str(data), "--out", str(out), "--checkpoint", checkpoint]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "No space left on device" in err, err
    saved = latest_checkpoint(out)
    assert saved is not None and incomplete_reason(saved) is None  # the save before the full one is intact
    sf.load(saved)
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")] == []  # nothing partial


def test_a_read_only_file_system_is_one_line_and_leaves_the_run_alone(small_disk, data, capsys):
    out = small_disk / "run"

    def argv(steps):
        return ["train", "--model", "retnet-tiny", "--tokenizer", "byte", "--seq-len", "16", "--batch-size", "2",
                "--steps", str(steps), "--eval-batches", "1", "--samples", "0", "--no-progress", "--data",
                str(data), "--out", str(out), "--allow-changes"]

    assert main(argv(1)) == 0
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(argv(2)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write there (Read-only file system)" in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_checkpoint_pruned_while_it_is_read_is_passed_over_not_a_crash(tmp_path, data, monkeypatch):
    """A reader (resume, a waiting script) lists the checkpoints while a live run prunes old ones: a file that
    vanishes mid-check makes that checkpoint incomplete to the reader, never an exception."""
    import scaleformer.train.checkpoint as checkpoint

    out = tmp_path / "run"
    argv = ["train", "--model", "retnet-tiny", "--tokenizer", "byte", "--seq-len", "16", "--batch-size", "2",
            "--steps", "2", "--save-every", "1", "--eval-batches", "1", "--samples", "0", "--no-progress",
            "--data", str(data), "--out", str(out)]
    assert main(argv) == 0
    newest = latest_checkpoint(out)
    steps = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    check = checkpoint.check_weights

    def vanishing(path, config):
        if path.parent == newest:
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return check(path, config)

    monkeypatch.setattr(checkpoint, "check_weights", vanishing)
    reason = incomplete_reason(newest)
    assert reason is not None and "changed while it was read" in reason
    assert steps == ["step_0000001", "step_0000002"] and newest.name == steps[-1]
    assert latest_checkpoint(out).name == steps[0]  # the reader moves on to the older complete one


def test_weights_pruned_between_reading_their_header_and_their_format_are_not_a_crash(tmp_path, data, monkeypatch):
    # The race a live run's pruning hit in CI: the weights file vanished after its header was read, while
    # the format was still to be read from it. One open now reads both.
    import sys

    build_module = sys.modules["scaleformer.build"]  # the package's `build` attribute is the function
    out = tmp_path / "run"
    assert main(["train", "--model", "retnet-tiny", "--tokenizer", "byte", "--seq-len", "16", "--batch-size", "2",
                 "--steps", "2", "--save-every", "1", "--eval-batches", "1", "--samples", "0", "--no-progress",
                 "--data", str(data), "--out", str(out)]) == 0
    newest = latest_checkpoint(out)
    real_open = build_module.safe_open

    class PrunedAfterReading:  # the live run prunes the file as soon as this read of it ends
        def __init__(self, path, **options):
            self.path, self.handle = Path(path), real_open(path, **options)

        def __enter__(self):
            return self.handle.__enter__()

        def __exit__(self, *exc):
            self.handle.__exit__(*exc)
            if self.path.parent == newest:
                self.path.unlink(missing_ok=True)

    monkeypatch.setattr(build_module, "safe_open", PrunedAfterReading)
    assert incomplete_reason(newest) is None  # what was read was complete; the next reader sees it gone
    monkeypatch.undo()
    assert "lacks model.safetensors" in incomplete_reason(newest)
    assert latest_checkpoint(out).name == "step_0000001"


def _halve(tensors: dict) -> dict:
    return dict(sorted(tensors.items())[::2])


def _wrong_shape(tensors: dict) -> dict:
    key = next(k for k in sorted(tensors) if k.endswith("exp_avg"))
    return {**tensors, key: torch.zeros(3, 5)}


def _nan(tensors: dict) -> dict:
    key = next(k for k in sorted(tensors) if k.endswith("exp_avg_sq"))
    return {**tensors, key: torch.full_like(tensors[key], float("nan"))}


@pytest.mark.parametrize("damage, says", [(_halve, "missing"), (_wrong_shape, "[3, 5]"), (_nan, "NaN")],
                         ids=["half-the-entries", "a-moment-of-the-wrong-shape", "nan-moments"])
@pytest.mark.parametrize("manifest", [True, False], ids=["recorded", "older-checkpoint"])
def test_a_damaged_optimizer_state_is_a_damaged_checkpoint(damage, says, manifest, runs, data, tmp_path, capsys):
    """The optimizer state is checked like the weights: the newest checkpoint's damaged Adam moments are
    passed over with a note, and the run continues from the one before, bit-identical. Checkpoints written
    before trainer.json recorded the optimizer's tensors are checked against the model's parameters."""
    work = tmp_path / "run"
    shutil.copytree(runs / "half", work)
    newest = work / "checkpoints" / "step_0000002"
    path = newest / "optimizer.safetensors"
    save_file(damage(load_file(str(path))), str(path))
    if not manifest:
        state = json.loads((newest / "trainer.json").read_text())
        del state["optimizer"]["tensors"]
        (newest / "trainer.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert Trainer(_cfg(data, work)).run()["step"] == 4
    err = capsys.readouterr().err
    assert err.count("note: ") == 1 and says in err and "using step_0000001" in err, err
    _assert_same(_weights(work), _weights(runs / "whole"))


def test_a_non_utf8_latest_is_passed_over_with_a_note(runs, data, tmp_path, capsys):
    work = tmp_path / "run"
    shutil.copytree(runs / "half", work)
    (work / "checkpoints" / "latest").write_bytes(b"step_\xff\xfe")
    capsys.readouterr()
    assert Trainer(_cfg(data, work)).run()["step"] == 4
    err = capsys.readouterr().err
    assert err.count("note: ") == 1 and "unreadable" in err and "using step_0000002" in err, err
    assert main(["generate", "--checkpoint", str(runs / "half"), "--prompt", "a", "--max-new-tokens", "2"]) == 0
    _assert_same(_weights(work), _weights(runs / "whole"))


def test_a_kill_before_latest_is_rewritten_resumes_from_the_newest_checkpoint(runs, data, tmp_path, capsys):
    """step_2 installed, then killed before `latest` moved from step_1: no save interval is redone."""
    work = tmp_path / "run"
    shutil.copytree(runs / "half", work)
    (work / "checkpoints" / "latest").write_text("step_0000001")
    trainer = Trainer(_cfg(data, work))
    capsys.readouterr()
    trainer._setup()
    trainer.lock.release()
    err = capsys.readouterr().err
    assert trainer.step == 2 and "step_0000002 is newer and complete" in err and err.count("note: ") == 1, err
    assert Trainer(_cfg(data, work)).run()["step"] == 4
    _assert_same(_weights(work), _weights(runs / "whole"))


def test_a_run_killed_before_its_first_checkpoint_keeps_no_dead_metrics(data, tmp_path):
    work = tmp_path / "run"
    work.mkdir()
    (work / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (1, 2, 3)))
    assert Trainer(_cfg(data, work, save_every=10)).run()["step"] == 4
    steps = [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and all(json.loads(line)["loss"] != 9.0 for line in
                                         (work / "metrics.jsonl").read_text().splitlines())
