"""Reading files that may be damaged or hostile (a checkpoint's JSON, a tokenizer): bounded, checked, and
every failure one short ``ValueError`` line that names the file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

__all__ = ["one_line", "read_json_object", "jsonl_objects", "file_digests", "check_file_digests"]


def one_line(error: BaseException | str, limit: int = 200) -> str:
    """An error's text as one bounded line (file contents can be echoed into messages)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"


def read_json_object(path: Path, what: str, max_bytes: int) -> dict[str, Any]:
    """The JSON object in ``path`` (``what`` it should be, for messages): at most ``max_bytes``, valid UTF-8
    JSON (not nested past Python's recursion limit), and an object."""
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path}: {size:,} bytes is too large for {what} (max {max_bytes:,})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"{path}: {what} is damaged (not valid JSON: {one_line(error, 100)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {what} must be a JSON object, got a {type(data).__name__}")
    return data


def jsonl_objects(text: str | Iterable[str], source: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """("source:line", object) for each non-blank line of JSONL ``text`` (a string, or an iterable of lines
    split at "\n", e.g. read from a file as a stream: they are split further as ``str.splitlines`` splits);
    a line that is not a JSON object is one ValueError naming the file and line."""
    lines = text.splitlines() if isinstance(text, str) else (piece for line in text for piece in line.splitlines() or [""])
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as error:
            raise ValueError(f"{where}: not valid JSON ({one_line(getattr(error, 'msg', error), 100)})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: each line must be a JSON object, got a {type(record).__name__}")
        yield where, record


def file_digests(folder: Path, names: Iterable[str]) -> dict[str, str]:
    """name -> sha256 of ``folder/name``, read in 8 MiB pieces (files may be larger than memory)."""
    digests = {}
    for name in names:
        digest = hashlib.sha256()
        with open(folder / name, "rb") as handle:
            while piece := handle.read(8 << 20):
                digest.update(piece)
        digests[name] = digest.hexdigest()
    return digests


def check_file_digests(folder: Path, recorded: Any, what: str) -> None:
    """Every file ``recorded`` (name -> sha256, as :func:`file_digests` wrote it at build time) still has its
    digest: one ``ValueError`` naming the first changed file and how to rebuild ``what`` otherwise. A full
    read, at sha256's speed (about 1-2 GB/s here): it catches any change, a same-size overwrite included."""
    if not isinstance(recorded, dict) or not recorded:
        raise ValueError(f"{folder / 'meta.json'}: records no digests of {what}")
    for name, digest in file_digests(folder, sorted(recorded)).items():
        if digest != recorded[name]:
            raise ValueError(f"{folder / name}: {what} changed since it was built (its sha256 no longer matches "
                             f"meta.json); delete {folder} and run again to rebuild it")
