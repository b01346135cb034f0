"""Data-parallel training under torchrun (2 and 4 CPU processes, gloo; and 2 "nodes" of one process each,
rendezvous on localhost) follows the single-process run; sharded checkpoints resume on other numbers of
processes."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import scaleformer as sf

from scaleformer.train.checkpoint import incomplete_reason, latest_checkpoint
from tests.train.test_trainer import text_file  # noqa: F401  (fixture)

COMMON = ["--model", "gpt-tiny", "--tokenizer", "byte", "--seq-len", "32", "--batch-size", "4", "--steps", "6",
          "--eval-batches", "2", "--samples", "0", "--no-progress", "--warmup", "2", "--save-every", "3",
          "--log-every", "1", "--precision", "float32"]  # the equivalences with one process are float32's


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(args, processes: int) -> None:
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                 f"--master_port={_port()}", "-m", "scaleformer"] if processes > 1 else [sys.executable, "-m",
                                                                                       "scaleformer"])
    result = subprocess.run([*launcher, "train", *COMMON, *args], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


def _assert_same_weights_but_noise_fed_ones(a: dict, b: dict) -> None:
    """Equal weights (normwise 1e-5), except key biases: softmax ignores them, so their true gradient is 0
    and each run feeds Adam its own rounding noise (~1e-10), which Adam normalizes into lr-sized steps
    (measured: 84% and 109% normwise apart). Those must only stay as small as such steps make them."""
    for name in a:
        if name.endswith("k_proj.bias"):
            assert a[name].norm() < 0.01 and b[name].norm() < 0.01, name  # 6 steps of at most lr = 3e-3
            continue
        assert (a[name] - b[name]).norm() <= 1e-5 * a[name].norm(), name


def test_two_ranks_follow_one_process_with_the_global_batch(tmp_path, text_file):  # noqa: F811
    one, two = tmp_path / "one", tmp_path / "two"
    _train(["--data", str(text_file), "--out", str(one)], processes=1)
    _train(["--data", str(text_file), "--out", str(two)], processes=2)
    # The loss curve (global-batch loss at every step, and the final validation loss) is the same, and so
    # are the weights, but for those that only rounding noise moves (see the helper).
    records = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)]
    assert [r["step"] for r in records[0]] == [r["step"] for r in records[1]] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(*records):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]), (x, y)
    assert abs(records[0][-1]["val_loss"] - records[1][-1]["val_loss"]) <= 1e-5 * records[0][-1]["val_loss"]
    b = load_file(str(latest_checkpoint(two) / "model.safetensors"))
    _assert_same_weights_but_noise_fed_ones(load_file(str(latest_checkpoint(one) / "model.safetensors")), b)
    assert json.loads((two / "run.json").read_text())["processes"] == 2
    # The distributed checkpoint resumes: a second launch finds it complete and only reports.
    rng = load_file(str(latest_checkpoint(two) / "rng.safetensors"))
    assert sorted(rng) == ["torch/0", "torch/1"]
    _train(["--data", str(text_file), "--out", str(two)], processes=2)
    c = load_file(str(latest_checkpoint(two) / "model.safetensors"))
    assert all(torch.equal(b[k], c[k]) for k in b)
    # A full checkpoint of 2 processes resumes in one: the loss curve continues as the 2-process run's did.
    _restart_from_step_3(two, tmp_path / "alone")
    _train(["--data", str(text_file), "--out", str(tmp_path / "alone")], processes=1)
    for x, y in zip(records[1], _records(tmp_path / "alone")):
        assert x["step"] == y["step"] and abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]), (x, y)
    _assert_same_weights_but_noise_fed_ones(c, load_file(str(latest_checkpoint(tmp_path / "alone") / "model.safetensors")))


def _kill_script(folder, rank: int, step: int):
    """A `scaleformer` entry point whose rank ``rank`` SIGKILLs itself where it would start writing its shard
    of the step-``step`` checkpoint."""
    script = folder / "killed_rank.py"
    script.write_text(f"""import os, signal, sys
from scaleformer import durable
from scaleformer.cli import main

def kill(point, path):
    if (int(os.environ["RANK"]) == {rank} and (point, path.name) == ("write", "shards")
            and path.parent.name.startswith(".step_{step:07d}.")):
        os.kill(os.getpid(), signal.SIGKILL)

durable.FAULTS = kill
sys.exit(main(sys.argv[1:]))
""")
    return script


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _restart_from_step_3(run, copy) -> None:
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step_0000006")
    (copy / "checkpoints" / "latest").write_text("step_0000003")


@pytest.mark.distributed  # 1 + 2 + 4 + 2 processes, ~33 s: the many-process tier (CI runs it as a step of its own)
def test_fsdp2_writes_sharded_checkpoints_and_resumes_on_2_and_4_processes(tmp_path, text_file):  # noqa: F811
    one, two = tmp_path / "one", tmp_path / "fsdp"
    _train(["--data", str(text_file), "--out", str(one)], processes=1)
    _train(["--data", str(text_file), "--out", str(two), "--parallel", "fsdp"], processes=2)
    records = [_records(run) for run in (one, two)]
    assert [r["step"] for r in records[1]] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(*records):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]), (x, y)
    # Under FSDP2 each rank wrote its own shard of every weight (nothing gathered): two files, each about
    # half of the state, and together the weights of the one-process run up to a sharded reduction's rounding.
    saved = latest_checkpoint(two)
    shards = sorted((saved / "shards").iterdir())
    assert [p.name for p in shards] == [f"shard-0000{r}-model-00001-of-00001.safetensors" for r in (1, 2)]
    pieces = [load_file(str(p)) for p in shards]
    name = "model/decoder.blocks.0.ffn.fc1.weight"
    assert pieces[0][name].shape[0] + pieces[1][name].shape[0] == sf.load(saved).state_dict()[name[6:]].shape[0]
    a = load_file(str(latest_checkpoint(one) / "model.safetensors"))
    b = sf.load(saved).state_dict()
    _assert_same_weights_but_noise_fed_ones(a, {k: b[k] for k in a})
    # Rank 1 is SIGKILLed while the step-6 checkpoint is being saved (rank 0 has made its temporary
    # directory and is writing its shard); torchrun then stops rank 0. The run keeps step 3, complete, and
    # the same command resumes from it on 2 processes: bit-identical to the uninterrupted run.
    again = tmp_path / "again"
    _restart_from_step_3(two, again)
    killed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_port()}",
         str(_kill_script(tmp_path, rank=1, step=6)), "train", *COMMON, "--data", str(text_file), "--out", str(again),
         "--parallel", "fsdp"], capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-2000:]
    assert latest_checkpoint(again).name == "step_0000003" and incomplete_reason(latest_checkpoint(again)) is None
    _train(["--data", str(text_file), "--out", str(again), "--parallel", "fsdp"], processes=2)
    # the killed save's temporary directory is gone (rank 0 removed it when its collective failed, or the
    # next start would have)
    assert not [p.name for p in (again / "checkpoints").iterdir() if p.name.startswith(".")]
    c = sf.load(latest_checkpoint(again)).state_dict()
    assert all(torch.equal(b[k], c[k]) for k in b)
    # Resharded: resume the 2-process checkpoint on 4 processes; the loss curve continues (global batch).
    _restart_from_step_3(two, tmp_path / "four")
    _train(["--data", str(text_file), "--out", str(tmp_path / "four"), "--parallel", "fsdp"], processes=4)
    resumed = _records(tmp_path / "four")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(records[1], resumed):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]), (x, y)
    assert len(list((latest_checkpoint(tmp_path / "four") / "shards").iterdir())) == 4
    _assert_same_weights_but_noise_fed_ones(b, sf.load(latest_checkpoint(tmp_path / "four")).state_dict())


def test_ddp_writes_sharded_checkpoints_spread_over_ranks_and_one_process_resumes(tmp_path, text_file):  # noqa: F811
    ddp = tmp_path / "ddp"
    _train(["--data", str(text_file), "--out", str(ddp), "--checkpoint", "sharded"], processes=2)
    # Every rank holds every tensor; DCP gives each to one rank, so both ranks write part of the state.
    shards = sorted((latest_checkpoint(ddp) / "shards").iterdir())
    keys = [set(load_file(str(p))) for p in shards]
    assert len(keys) == 2 and all(keys) and not keys[0] & keys[1]
    # One process resumes the 2-process checkpoint (formats mix: it writes full ones) and continues the curve.
    _restart_from_step_3(ddp, tmp_path / "one")
    _train(["--data", str(text_file), "--out", str(tmp_path / "one"), "--checkpoint", "full"], processes=1)
    for x, y in zip(_records(ddp), _records(tmp_path / "one")):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]), (x, y)
    _assert_same_weights_but_noise_fed_ones(load_file(str(latest_checkpoint(tmp_path / "one") / "model.safetensors")),
                                            sf.load(latest_checkpoint(ddp)).state_dict())


def test_two_nodes_follow_one_process(tmp_path, text_file):  # noqa: F811
    # Two torchrun launches, as on two machines: c10d rendezvous at one endpoint, one process per node, a
    # shared run directory (multi-node runs need shared storage for it). Both nodes' processes have
    # LOCAL_RANK 0, so this also checks that nothing takes the local rank for the global one.
    one, nodes = tmp_path / "one", tmp_path / "nodes"
    _train(["--data", str(text_file), "--out", str(one)], processes=1)
    port = _port()
    launches = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
         f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes", "-m", "scaleformer", "train", *COMMON,
         "--data", str(text_file), "--out", str(nodes)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        for _ in range(2)]
    for launch in launches:
        _, stderr = launch.communicate(timeout=300)
        assert launch.returncode == 0, stderr[-3000:]
    records = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, nodes)]
    assert [r["step"] for r in records[1]] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(*records):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]), (x, y)
    assert json.loads((nodes / "run.json").read_text())["processes"] == 2
    _assert_same_weights_but_noise_fed_ones(load_file(str(latest_checkpoint(one) / "model.safetensors")),
                                            load_file(str(latest_checkpoint(nodes) / "model.safetensors")))

