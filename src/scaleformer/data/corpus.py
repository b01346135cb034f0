"""Text corpora: the built-in one (made offline from text that ships with Python) and user data.

The built-in corpus concatenates the standard library's ``pydoc_data`` topics (the language reference
pages behind ``help()``) and the docstrings of the standard library's modules, read with ``ast`` from the
source files — nothing is imported or executed, nothing is downloaded. It is built once and cached under
the user cache directory; its sha256 identifies it in every run's metadata.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path


__all__ = ["Corpus", "builtin_corpus", "cache_dir"]


@dataclass(frozen=True)
class Corpus:
    text: str  # the built-in corpus's text; "" for user data, which is read as a stream, never whole
    source: str  # "builtin" or the path it came from
    sha256: str


def cache_dir() -> Path:
    """$SCALEFORMER_CACHE, else $XDG_CACHE_HOME/scaleformer, else ~/.cache/scaleformer."""
    if os.environ.get("SCALEFORMER_CACHE"):
        return Path(os.environ["SCALEFORMER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "scaleformer"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _stdlib_docstrings() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/__init__.py")):
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        if doc and len(doc) > 80:
            texts.append(doc.strip())
    return texts


def _build_builtin_text() -> str:
    from pydoc_data.topics import topics

    parts = [topics[name].strip() for name in sorted(topics)] + _stdlib_docstrings()
    return "\n\n".join(parts) + "\n"


def builtin_corpus() -> Corpus:
    """The built-in corpus, from the cache when a verified copy is there."""
    directory = cache_dir() / "corpus"
    text_path, meta_path = directory / "builtin.txt", directory / "builtin.json"
    if text_path.is_file() and meta_path.is_file():
        text = text_path.read_text(encoding="utf-8")
        if json.loads(meta_path.read_text()).get("sha256") == _digest(text):
            return Corpus(text, "builtin", _digest(text))
    text = _build_builtin_text()
    digest = _digest(text)
    directory.mkdir(parents=True, exist_ok=True)
    for path, content in ((text_path, text), (meta_path, json.dumps({"sha256": digest, "chars": len(text)}))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, path)
    return Corpus(text, "builtin", digest)
