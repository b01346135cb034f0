"""The crash-safe directory install without RENAME_EXCHANGE (file systems that cannot swap two directories):
a kill before every file-system step of it, then the clean-up the next writer runs, leaves the old or the
new directory in place, complete, and never deletes the only complete copy."""

from pathlib import Path

import pytest

from scaleformer import durable


class SimulatedKill(BaseException):
    """A kill: a BaseException, so `except Exception` clean-ups are skipped, as under SIGKILL."""


def _directory(path: Path, content: str) -> Path:
    path.mkdir()
    for name in ("a.txt", "b.txt"):
        (path / name).write_text(f"{content} {name}")
    return path


def _content(path: Path) -> str | None:
    texts = {(path / name).read_text() for name in ("a.txt", "b.txt")}
    assert len(texts) == 2 and sorted(texts)[0].endswith("a.txt"), texts  # both files of one version
    return sorted(texts)[0].split()[0]


def _install_killed_at(folder: Path, n: int, with_old: bool) -> list[tuple[str, str]]:
    calls = []

    def hook(step, path):
        calls.append((step, path.name))
        if len(calls) == n:
            raise SimulatedKill(step)

    target = folder / "step_0000002"
    if with_old:
        _directory(target, "old")
    new = _directory(durable.temporary_name(target), "new")
    durable.FAULTS = hook
    try:
        durable.install_dir(new, target)
    except SimulatedKill:
        pass
    finally:
        durable.FAULTS = None
    return calls


@pytest.mark.parametrize("with_old", [True, False], ids=["replacing", "first-install"])
def test_a_kill_at_every_step_of_the_two_rename_install_loses_nothing(tmp_path, monkeypatch, with_old):
    monkeypatch.setattr(durable, "_exchange", lambda a, b: False)  # the fallback, forced
    (tmp_path / "count").mkdir()
    calls = _install_killed_at(tmp_path / "count", 10**9, with_old)
    assert ("rename", "step_0000002") in calls
    seen = set()
    for n in range(1, len(calls) + 2):  # before every step, and after the last one
        folder = tmp_path / f"kill{n}"
        folder.mkdir()
        _install_killed_at(folder, n, with_old)
        durable.remove_leftovers(folder)  # what the next writer does, holding the lock
        target = folder / "step_0000002"
        assert [p.name for p in folder.iterdir()] == (["step_0000002"] if target.exists() else []), n
        if target.exists():
            seen.add(_content(target))
        else:  # only a first install killed before its rename leaves nothing, and nothing was there
            assert not with_old and n == 1, n
    assert seen == ({"old", "new"} if with_old else {"new"})


def test_the_only_complete_copy_left_by_older_code_is_put_back(tmp_path):
    """Code without the ready name left, when killed between its renames, the old directory aside and a new
    one that cannot be told complete: the clean-up puts the old one back instead of deleting both."""
    target = tmp_path / "step_0000002"
    _directory(durable.temporary_name(target, "old"), "old")
    _directory(durable.temporary_name(target), "new")  # possibly half-written: removed
    durable.remove_leftovers(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000002"] and _content(target) == "old"


def test_a_live_writers_install_is_left_alone(tmp_path):
    import os

    target = tmp_path / "model"
    ready = _directory(tmp_path / f".model.ready-{os.getpid()}-0123abcd", "new")
    durable.remove_leftovers(tmp_path, only_dead=True)
    assert ready.exists() and not target.exists()
