"""Pre-tokenized .npy corpora are read through memory maps: split once into a cache, never loaded whole."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from scaleformer.data import token_ids
from scaleformer.data.token_ids import scan_ids, split_ids
from scaleformer.train.checkpoint import latest_checkpoint


def _split_in_memory(ids, block, every):
    """The split as runs always made it: blocks of `block`, every `every`-th held out, each side joined."""
    blocks = [ids[i:i + block] for i in range(0, len(ids), block)]
    val = [b for i, b in enumerate(blocks) if i % every == every - 1]
    train = [b for i, b in enumerate(blocks) if i % every != every - 1]
    return np.concatenate(train).astype(np.int32), np.concatenate(val).astype(np.int32)


def test_scan_and_split_equal_the_whole_array_computation(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALEFORMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(token_ids, "CHUNK", 1000)  # many chunks, and blocks that straddle them
    ids = np.random.default_rng(0).integers(0, 300, size=25_013).astype(np.uint16)
    low, high, digest = scan_ids(ids)
    assert (low, high) == (int(ids.min()), int(ids.max()))
    assert digest == hashlib.sha256(ids.astype(np.int64).tobytes()).hexdigest()
    train, val = split_ids(ids, digest, block=96, every=10)
    expected_train, expected_val = _split_in_memory(ids, 96, 10)
    assert isinstance(train, np.memmap) and not train.flags.writeable
    assert np.array_equal(train, expected_train) and np.array_equal(val, expected_val)
    # The second time the cached split is used as it is; a damaged one is rebuilt.
    folder = next((tmp_path / "cache" / "token-splits").iterdir())
    monkeypatch.setattr(token_ids, "_write", lambda *args: pytest.fail("rebuilt a valid split"))
    again, _ = split_ids(ids, digest, block=96, every=10)
    assert np.array_equal(again, expected_train)
    monkeypatch.undo()
    monkeypatch.setenv("SCALEFORMER_CACHE", str(tmp_path / "cache"))
    (folder / "train.npy").write_bytes((folder / "train.npy").read_bytes()[:200])
    killed = folder.parent / f".{folder.name}.tmp-999999999-0123abcd"  # a builder killed mid-write (no such pid)
    killed.mkdir()
    (killed / "train.npy").write_bytes(b"partial")
    rebuilt, _ = split_ids(ids, digest, block=96, every=10)
    assert np.array_equal(rebuilt, expected_train)
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary directory left behind
    # a same-size overwrite is caught by the sha256 recorded when the split was written
    changed = np.asarray(rebuilt).copy()
    changed[7] += 1
    np.save(folder / "train.npy", changed)
    with pytest.raises(ValueError, match=f"{folder / 'train.npy'}: the cached token split changed since it was "
                                         f"built .*delete {folder} and run again to rebuild it"):
        split_ids(ids, digest, block=96, every=10)


CHILD = r"""
import os, resource, sys
import numpy as np
from scaleformer.cli import main
import scaleformer.commands  # torch and the trainer load before the limit is measured (the cli itself is light)

def data_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmData:"):
            return int(line.split()[1])

# private memory may grow by 160 MB from here: the corpus (192 MB of int32 ids) cannot be loaded whole
limit = (data_kb() + 160 * 1024) * 1024
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
try:
    np.load(sys.argv[1])
    sys.exit("the whole corpus fitted under the limit: the test would prove nothing")
except MemoryError:
    pass
sys.exit(main(["train", "--data", sys.argv[1], "--vocab-size", "512", "--model", "gpt-tiny", "--seq-len", "32",
               "--batch-size", "4", "--steps", "4", "--save-every", "2", "--eval-batches", "1", "--samples", "0",
               "--no-progress", "--out", sys.argv[2]]))
"""


def test_a_corpus_larger_than_the_memory_limit_trains_and_resumes(tmp_path):
    corpus = tmp_path / "ids.npy"
    np.save(corpus, np.random.default_rng(1).integers(0, 512, size=48 * 2**20, dtype=np.int32))
    env = {**os.environ, "SCALEFORMER_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}

    def train(run):
        result = subprocess.run([sys.executable, "-c", CHILD, str(corpus), str(run)], capture_output=True,
                                text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-3000:]

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(whole)
    meta = json.loads((whole / "run.json").read_text())
    assert meta["corpus"]["train_tokens"] + meta["corpus"]["val_tokens"] == 48 * 2**20
    # Interrupted after step 2 (its final checkpoint removed) and run again: it continues at step 3 with the
    # same windows of the corpus, and ends with the uninterrupted run's weights.
    train(resumed)
    shutil.rmtree(latest_checkpoint(resumed))
    (resumed / "checkpoints" / "latest").write_text("step_0000002")
    train(resumed)
    assert latest_checkpoint(resumed).name == "step_0000004"
    a, b = (load_file(str(latest_checkpoint(run) / "model.safetensors")) for run in (whole, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
