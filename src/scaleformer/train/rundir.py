"""The run directory: one writer at a time, leftovers of killed writers removed, metrics kept consistent.

``<run>/.lock`` is held (``flock``, exclusive) by the one ``scaleformer train`` process writing the run — rank 0
under torchrun. The kernel releases it when that process exits or is killed, so a lock left by a killed run
is stale by construction: the next run takes it without any clean-up. The file holds the holder's pid, for
the message a second process gets.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from scaleformer import durable

__all__ = ["RunLock", "RunDirError", "prepare_run_dir", "truncate_metrics"]


class RunDirError(ValueError):
    """The run directory cannot be used (not a directory, not writable, locked by another run)."""


class RunLock:
    """An exclusive lock on a run directory, released by :meth:`release` or when the process ends."""

    def __init__(self, run_dir: Path) -> None:
        path = run_dir / ".lock"
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise RunDirError(f"{run_dir} is in use by another scaleformer train (pid {holder}); wait for it to "
                              "finish, stop it, or train into another --out") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def prepare_run_dir(run_dir: Path) -> RunLock:
    """Create (if needed) and lock the run directory, then remove what killed writers left in it. Every
    failure is one :class:`RunDirError` line naming the directory."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--out {run_dir} is a file, not a directory; choose another --out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run_dir)
    except OSError as error:
        raise RunDirError(f"--out {run_dir}: cannot write there ({error.strerror or error}); choose a writable "
                          "--out with free space") from None
    try:
        for folder in (run_dir, run_dir / "checkpoints"):
            durable.remove_leftovers(folder)  # we hold the lock: nobody else is writing here
    except OSError as error:
        lock.release()
        raise RunDirError(f"--out {run_dir}: cannot clean up ({error.strerror or error})") from None
    return lock


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the metrics records of steps <= ``step`` (the checkpoint a run resumes from): the steps after it
    are replayed and logged again. A line cut short by a kill is dropped. Returns the records dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step
        except ValueError:
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        durable.atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped
