"""Pre-tokenized corpora larger than memory: a 1-D ``.npy`` array of token ids, read through a memory map.

The array is never loaded whole. One pass in chunks checks its range and computes its digest (the sha256 of
its ids as int64, the digest checkpoints record); the train/validation split — blocks of ``block`` tokens,
every ``every``-th one held out, each side concatenated, exactly as a run always split such data — is
written once, in chunks, to a cache directory named by that digest and the split, and read back as two
read-only memory maps. Training then reads only the windows of each step's batch (``batch_at``), a pure
function of (seed, step), so a resumed run reads the same windows it would have read.

The cached split is a directory put in place whole (written and fsync'ed beside it, then renamed), and is
used only when both files hold the sizes the split implies (anything else is rebuilt) and the contents whose
sha256 its meta.json recorded when it was written (a changed file is an error that names it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from scaleformer import durable
from scaleformer.data.corpus import cache_dir
from scaleformer.files import check_file_digests, file_digests, read_json_object

__all__ = ["scan_ids", "split_ids", "CHUNK"]

CHUNK = 1 << 22  # ids per pass through the array: 32 MB as int64


def scan_ids(ids: np.ndarray) -> tuple[int, int, str]:
    """(min, max, sha256 of the ids as int64) in one pass over ``ids`` in chunks."""
    low, high, digest = None, None, hashlib.sha256()
    for start in range(0, len(ids), CHUNK):
        part = np.asarray(ids[start:start + CHUNK]).astype(np.int64)
        low = int(part.min()) if low is None else min(low, int(part.min()))
        high = int(part.max()) if high is None else max(high, int(part.max()))
        digest.update(part.tobytes())
    if low is None or high is None:
        raise ValueError("no token ids")
    return low, high, digest.hexdigest()


def _held_out(index: np.ndarray, every: int) -> np.ndarray:
    return index % every == every - 1


def _sizes(total: int, block: int, every: int) -> tuple[int, int]:
    starts = np.arange(0, total, block)
    lengths = np.minimum(block, total - starts)
    val = int(lengths[_held_out(np.arange(len(starts)), every)].sum())
    return total - val, val


def split_ids(ids: np.ndarray, digest: str, block: int, every: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) int32 memory maps of ``ids`` split into blocks of ``block``, every ``every``-th held out."""
    train_size, val_size = _sizes(len(ids), block, every)
    if not train_size or not val_size:  # too small to train on: the caller says so; nothing to cache
        return np.zeros(train_size and len(ids), np.int32), np.zeros(val_size and len(ids), np.int32)
    target = cache_dir() / "token-splits" / f"{digest}-block{block}-every{every}"
    split = _open(target, train_size, val_size)
    if split is not None:
        return split
    durable.build_cache_dir(target, lambda folder: _write(ids, folder, block, every, train_size, val_size),
                            lambda folder: _usable(folder, train_size, val_size))
    split = _open(target, train_size, val_size)
    if split is None:
        raise OSError(f"{target}: the cached split could not be read back")
    return split


def _write(ids: np.ndarray, folder: Path, block: int, every: int, train_size: int, val_size: int) -> None:
    files = {name: np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.int32, shape=(size,))
             for name, size in (("train", train_size), ("val", val_size))}
    filled = {"train": 0, "val": 0}
    step = max(1, CHUNK // block) * block  # whole blocks per pass
    for start in range(0, len(ids), step):
        part = np.asarray(ids[start:start + step])
        for offset in range(0, len(part), block):
            name = "val" if ((start + offset) // block) % every == every - 1 else "train"
            piece = part[offset:offset + block]
            files[name][filled[name]:filled[name] + len(piece)] = piece
            filled[name] += len(piece)
    for array in files.values():
        array.flush()
    del files
    durable.fault_point("write", folder / "meta.json")
    (folder / "meta.json").write_text(json.dumps({"sha256": file_digests(folder, ("train.npy", "val.npy"))}, indent=1))


def _open(folder: Path, train_size: int, val_size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached split (None: absent or stale, to be rebuilt), after checking both files' contents against
    the sha256 recorded when they were written (a ``ValueError`` naming a changed file)."""
    try:
        meta = read_json_object(folder / "meta.json", "a token split's description", 1 << 12)
        train = np.load(folder / "train.npy", mmap_mode="r", allow_pickle=False)
        val = np.load(folder / "val.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if train.shape != (train_size,) or val.shape != (val_size,) or train.dtype != np.int32 or val.dtype != np.int32:
        return None
    check_file_digests(folder, meta.get("sha256"), "the cached token split")
    return train, val


def _usable(folder: Path, train_size: int, val_size: int) -> bool:
    try:
        return _open(folder, train_size, val_size) is not None
    except ValueError:
        return False
