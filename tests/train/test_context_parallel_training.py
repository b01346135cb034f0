"""``scaleformer train --context-parallel N`` under torchrun (2 and 4 CPU processes, gloo): each sequence
split across processes, alone and beside data parallelism (DDP, FSDP2), follows the one-process loss curve;
a checkpoint resumes under another split; bad splits are refused up front. A tier of its own (marker
``distributed``: many processes)."""

import os
import subprocess
import sys

import pytest

from tests.train.test_distributed import COMMON, _port, _records, _restart_from_step_3, _train
from tests.train.test_trainer import text_file  # noqa: F401  (fixture)

pytestmark = pytest.mark.distributed


def test_context_parallel_training_follows_one_process_and_resumes_across_splits(tmp_path, text_file):  # noqa: F811
    # Each sequence split in 2 (2 processes), and 2 data-parallel groups of 2 under FSDP2 (4 processes):
    # the same global-batch loss at every step as one process, float32 rounding apart.
    one, split, both = tmp_path / "one", tmp_path / "split", tmp_path / "both"
    _train(["--data", str(text_file), "--out", str(one)], processes=1)
    _train(["--data", str(text_file), "--out", str(split), "--context-parallel", "2"], processes=2)
    _train(["--data", str(text_file), "--out", str(both), "--context-parallel", "2", "--parallel", "fsdp"], processes=4)
    records = [_records(run) for run in (one, split, both)]
    assert [r["step"] for r in records[1]] == [r["step"] for r in records[2]] == [1, 2, 3, 4, 5, 6]
    for x, y, z in zip(*records):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]), (x, y)
        assert abs(x["loss"] - z["loss"]) <= 1e-5 * abs(x["loss"]), (x, z)
    # The checkpoints do not depend on the split: the split run's step 3 resumes in one process, and split
    # in 4, and both continue the curve.
    for processes, flags in ((1, []), (4, ["--context-parallel", "4"])):
        again = tmp_path / f"again{processes}"
        _restart_from_step_3(split, again)
        _train(["--data", str(text_file), "--out", str(again), *flags], processes=processes)
        for x, y in zip(records[0], _records(again)):
            assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]), (processes, x, y)


def test_packed_documents_split_across_processes_follow_one_process(tmp_path):
    # Documents of 9 to 30 bytes: nearly every 33-byte window packs several, and most cross the split point.
    # A hybrid (Gated DeltaNet, its convolution and an attention layer): its loss curve split in 2 is one
    # process's, float32 rounding apart.
    rng = __import__("random").Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    corpus = tmp_path / "short.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(2, 5))) for _ in range(400)))
    one, split = tmp_path / "one", tmp_path / "split"
    flags = ["--data", str(corpus), "--pack-documents", "--model", "gdn-hybrid-tiny"]
    _train([*flags, "--out", str(one)], processes=1)
    _train([*flags, "--out", str(split), "--context-parallel", "2"], processes=2)
    for x, y in zip(_records(one), _records(split), strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]), (x, y)


def test_context_parallel_options_are_refused_up_front(tmp_path, text_file):  # noqa: F811
    def error(args, processes=1):
        launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                     f"--master_port={_port()}", "-m", "scaleformer"] if processes > 1 else [sys.executable, "-m",
                                                                                           "scaleformer"])
        result = subprocess.run([*launcher, "train", *COMMON, "--data", str(text_file), "--out", str(tmp_path / "x"),
                                 *args], capture_output=True, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode != 0
        return result.stderr
    assert "context_parallel 3 must divide seq_len (32)" in error(["--context-parallel", "3"])
    assert "--context-parallel 2 must divide the 1 processes" in error(["--context-parallel", "2"])
    assert error(["--context-parallel", "4"], processes=2).count("--context-parallel 4 must divide the 2 processes") == 2
