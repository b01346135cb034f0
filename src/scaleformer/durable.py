"""Crash-safe file-system steps: every checkpoint write in scaleformer goes through these.

The rules they implement, so that a kill (SIGKILL, power loss, a full disk) at any moment leaves either the
old state or the new one, never a mix:

* new content is written under a temporary name in the same directory, fsync'ed, then renamed over the
  old name (rename is atomic within a file system), and the directory is fsync'ed so the rename itself
  survives a power loss;
* a directory that must change as a whole (a checkpoint: config + weights + optimizer + ...) is built
  complete under a temporary name and then swapped with the old one in one ``renameat2(RENAME_EXCHANGE)``
  (Linux): at every instant the final name holds a complete directory;
* cleanup (removing temporaries) is never needed for correctness: a kill leaves only names starting with
  ``.`` that the next writer removes (:func:`remove_leftovers`).

Each step first calls :func:`fault_point` with its name. Tests set :data:`FAULTS` to a function that raises
at the n-th point, which simulates a kill before (and, through the next point, after) every step. A
simulated kill is a ``BaseException``: like SIGKILL, it skips the ``except Exception`` cleanups.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable

__all__ = ["FAULTS", "fault_point", "write_safetensors", "fsync_dir", "fsync_tree", "atomic_write", "atomic_write_text", "install_dir",
           "remove_tree", "remove_leftovers", "temporary_name", "build_cache_dir", "check_output_dir"]

#: test hook: called as FAULTS(step, path) before every file-system step (None in normal use)
FAULTS: Callable[[str, Path], None] | None = None


def fault_point(step: str, path: str | os.PathLike) -> None:
    if FAULTS is not None:
        FAULTS(step, Path(path))


def write_safetensors(write: Callable[..., None], path: Path, data: object, metadata: dict[str, str] | None = None) -> None:
    """Run a safetensors writer (``save_file``/``save_model``): its I/O failures (a full disk) come back
    as ``SafetensorError``; they are re-raised as the ``OSError`` they are, naming the file."""
    fault_point("write", path)
    try:
        write(data, str(path), metadata=metadata)
    except Exception as error:  # noqa: BLE001 - safetensors' own error type
        if type(error).__name__ != "SafetensorError":
            raise
        message = " ".join(str(error).split())
        raise OSError(errno.ENOSPC if "os error 28" in message else errno.EIO, message, str(path)) from None
    os.chmod(path, _file_mode())  # safetensors creates files 0600; every other file we write follows the umask


def _file_mode() -> int:
    """The mode ``open()`` gives a new file under the process's umask (0644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def temporary_name(target: Path, kind: str = "tmp") -> Path:
    """A unique hidden sibling of ``target``: ``.<name>.<kind>-<pid>-<random>``."""
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _fsync_path(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fault_point("fsync", path)
    _fsync_path(Path(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory under ``root`` (files first, then their directories)."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fault_point("fsync", Path(folder, name))
            _fsync_path(Path(folder, name), os.O_RDONLY)
        fsync_dir(folder)


def atomic_write(target: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Replace ``target`` by what ``write(path)`` writes at a temporary path: all of it or none of it."""
    target = Path(target)
    tmp = temporary_name(target)
    try:
        fault_point("write", tmp)
        write(tmp)
        fault_point("fsync", tmp)
        _fsync_path(tmp, os.O_RDONLY)
        fault_point("rename", target)
        os.replace(tmp, target)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    atomic_write(target, lambda path: path.write_text(text))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where it is unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # the file system cannot exchange: fall back to two renames
    raise OSError(code, os.strerror(code), str(b))


def install_dir(new: Path, target: Path) -> None:
    """Put the complete directory ``new`` at ``target``, replacing what is there in one step.

    ``new`` must be a sibling of ``target`` and already fsync'ed (:func:`fsync_tree`). With an existing
    ``target`` the two are exchanged atomically and the old contents removed afterwards. On file systems
    without RENAME_EXCHANGE, ``new`` is first renamed to a *ready* name (``.<target>.ready-...``: complete,
    to be installed), then the old directory aside (``.old-``) and the ready one into place. A kill inside
    that window leaves ``target`` missing for a moment, never lost: :func:`remove_leftovers` finishes the
    install from the ready copy (or, without one, puts the old copy back) before it removes anything.
    """
    fault_point("rename", target)
    if not target.exists():
        os.rename(new, target)
    elif _exchange(new, target):
        fsync_dir(target.parent)
        remove_tree(new)  # now holds the old contents
        return
    else:
        _install_by_renames(new, target)
        return
    fsync_dir(target.parent)


def _install_by_renames(new: Path, target: Path) -> None:
    """The two-rename install (no RENAME_EXCHANGE), with every state a kill can leave recoverable."""
    ready = temporary_name(target, "ready")
    os.rename(new, ready)
    fsync_dir(target.parent)  # the ready name is durable before the old directory leaves ``target``
    aside = temporary_name(target, "old")
    fault_point("rename", target)
    if target.exists():
        os.rename(target, aside)
    fault_point("rename", target)
    os.rename(ready, target)
    fsync_dir(target.parent)
    remove_tree(aside)


def remove_tree(path: Path) -> None:
    """Delete a directory that no reader depends on any more (a replaced or stale one)."""
    fault_point("remove", path)
    shutil.rmtree(path, ignore_errors=True)


_LEFTOVER = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|old|ready)-(?P<pid>\d+)-[0-9a-f]{8}$"  # temporary_name()
                       r"|^\.tmp-step_\d+-(?P<pid01>\d+)$|^\.latest-(?P<pid01b>\d+)$")  # scaleformer 0.1's names


def _writer_pid(match: re.Match) -> int:
    return int(match["pid"] or match["pid01"] or match["pid01b"])


def _finish_installs(folder: Path, prefix: str, only_dead: bool) -> None:
    """Complete what a killed :func:`_install_by_renames` left: a *ready* directory is complete and was being
    installed, so it goes in place; an *old* one whose target is missing is the only complete copy (left by a writer
    killed between the renames of earlier scaleformer code, which had no ready name), so it goes back."""
    entries = [(entry, match) for entry in sorted(folder.iterdir())
               if entry.name.startswith(prefix) and (match := _LEFTOVER.match(entry.name)) and match["kind"]
               in ("ready", "old") and entry.is_dir() and not entry.is_symlink()
               and not (only_dead and _alive(_writer_pid(match)))]
    for entry, match in sorted(entries, key=lambda item: item[1]["kind"] != "ready"):  # ready ones first
        target = folder / match["target"]
        if match["kind"] == "ready":
            _install_by_renames(entry, target)
        elif not target.exists() and not target.is_symlink():
            fault_point("rename", target)
            os.rename(entry, target)
            fsync_dir(folder)


def remove_leftovers(folder: Path, prefix: str = ".", only_dead: bool = False) -> list[Path]:
    """Remove the temporaries killed writers left in ``folder`` (names from :func:`temporary_name` that
    start with ``prefix``), after finishing the installs they were killed in (:func:`_finish_installs`), so a
    complete copy is never removed while its target is missing. With ``only_dead``, only those whose writer
    process no longer runs; without it the caller must hold the folder's writer lock. Returns what was
    removed."""
    removed = []
    if not folder.is_dir():
        return removed
    _finish_installs(folder, prefix, only_dead)
    for entry in folder.iterdir():
        match = _LEFTOVER.match(entry.name)
        if not match or not entry.name.startswith(prefix):
            continue
        if only_dead and _alive(_writer_pid(match)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            remove_tree(entry)
        else:
            fault_point("remove", entry)
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def build_cache_dir(target: Path, write: Callable[[Path], None], usable: Callable[[Path], bool]) -> None:
    """Make ``target`` (a cache directory several processes may build at once) by ``write``-ing it complete
    under a temporary name beside it, fsync'ing it and renaming it into place. When another process put a
    copy there meanwhile, that copy is kept if ``usable``, else replaced. Leftovers of killed builders go."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target.parent, prefix=f".{target.name}.", only_dead=True)
    building = temporary_name(target)
    building.mkdir()
    try:
        try:
            write(building)
        except OSError as error:  # a full disk while writing: say where (file objects' errors name no path)
            if error.filename is None:
                raise OSError(error.errno, error.strerror or str(error), str(target)) from None
            raise
        fsync_tree(building)
        try:
            os.rename(building, target)
        except OSError:
            if not usable(target):
                install_dir(building, target)
        fsync_dir(target.parent)
    finally:
        if building.exists():
            remove_tree(building)


def _training_kind(folder: Path) -> str | None:
    """"checkpoint" (it has trainer.json), "run directory" (checkpoints/ or run.json) or None."""
    if (folder / "trainer.json").is_file():
        return "training checkpoint"
    if (folder / "checkpoints").is_dir() or (folder / "run.json").is_file():
        return "run directory"
    return None


def check_output_dir(out: str | os.PathLike, writer: str, source: str | os.PathLike | None = None) -> Path:
    """Refuse (one ``ValueError``) an output directory where ``writer`` would damage training state: a
    training checkpoint or run directory, a folder inside a checkpoint or a run's checkpoints/, one that holds one (within two levels), or
    ``source`` itself, inside it or holding it. Returns ``out`` resolved. Every command that writes a model
    directory calls it before writing anything."""
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory; {writer} writes into a new or empty directory")
    if source is not None:
        src = Path(source).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise ValueError(f"{out} is the source {src} itself, inside it or holds it; {writer} writes into "
                             "another directory")
    for folder in (out, *out.parents):  # a run directory's other subfolders (an export beside it) are fine
        kind = _training_kind(folder)
        if folder != out and kind == "run directory" and folder / "checkpoints" not in (out, *out.parents):
            continue
        if kind is not None:
            where = "is" if folder == out else f"is inside {folder}, which is"
            raise ValueError(f"{out} {where} a {kind}; {writer} would overwrite it: write into another directory")
    if out.is_dir():
        children = [c for c in out.iterdir() if c.is_dir() and not c.is_symlink()][:1000]
        for folder in children + [g for c in children[:100] for g in c.iterdir() if g.is_dir()][:1000]:
            kind = _training_kind(folder)
            if kind is not None:
                raise ValueError(f"{out} holds a {kind} ({folder}); {writer} would replace it: write into another "
                                 "directory")
    return out
