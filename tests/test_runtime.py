"""The training loop's allocator setting: large tensors freed in one step are reused by the next without
page-faulting fresh memory in (what made the default run's cross-entropy three times slower)."""

import os
import subprocess
import sys

import pytest

PROBE = """
import pathlib, resource, sys, torch
from scaleformer.cli import main
corpus = pathlib.Path(sys.argv[1]) / "corpus.txt"
corpus.write_text("\\n\\n".join(f"line {i} of a small corpus for one training step." for i in range(400)))
assert main(["train", "--model", "retnet-tiny", "--tokenizer", "byte", "--seq-len", "16", "--batch-size", "2",
             "--steps", "1", "--eval-batches", "1", "--samples", "0", "--no-progress", "--data", str(corpus),
             "--out", str(pathlib.Path(sys.argv[1]) / "run")]) == 0
def faults_of_a_fresh_40mb_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(10 * 2**20).fill_(1.0)  # 40 MiB, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_fresh_40mb_tensor()
print(min(faults_of_a_fresh_40mb_tensor() for _ in range(5)))
"""


def _faults(tmp_path, env_value: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "SCALEFORMER_MALLOC"}
    if env_value is not None:
        env["SCALEFORMER_MALLOC"] = env_value
    folder = tmp_path / str(env_value)
    folder.mkdir()
    env["SCALEFORMER_CACHE"] = str(folder / "cache")
    result = subprocess.run([sys.executable, "-c", PROBE, str(folder)], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_cpu_training_run_reuses_freed_memory_and_can_be_told_not_to(tmp_path):
    pages = 10 * 2**20 * 4 // 4096
    assert _faults(tmp_path, None) < pages // 20  # reused: almost no page is faulted in again
    assert _faults(tmp_path, "system") > pages // 2  # glibc's default: every page of every 40 MiB tensor faults in
