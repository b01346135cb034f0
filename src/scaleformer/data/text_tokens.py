"""Text corpora larger than memory: read as a stream, tokenized once into memory-mapped token files.

A text corpus (a .txt, .jsonl, .parquet or .arrow file, or a folder of them) is never held whole; Parquet and
Arrow files (a Hugging Face dataset's ``save_to_disk`` folder, say) are streamed by ``datasets``. It is read as one stream —
the files in sorted order (a JSONL or dataset file's "text" fields in order) joined by a blank line, exactly the
text runs always trained on — in two passes:

1. one pass computes its sha256 (the digest checkpoints record, the same as when corpora were read whole,
   so older runs resume) and checks every file (UTF-8, JSON lines);
2. when no cached copy exists, a second pass cuts it into documents at blank lines, tokenizes them in
   batches — BPE batches are encoded on every core by ``tokenizers`` — with a progress bar, and appends
   each document's ids and an end-of-document id to the train or the validation file (every
   ``every``-th document is held out, as before).

The result is cached under ``$SCALEFORMER_CACHE/token-files/<corpus sha256>-<tokenizer sha256>-every<E>/``:
``train.bin`` / ``val.bin`` (uint16 ids when the vocabulary fits, else uint32) and ``train-docs.bin`` /
``val-docs.bin`` (int64: where each document starts), described by ``meta.json``. The folder is written
beside its final name, fsync'ed, and renamed into place whole; a folder whose files do not have the sizes
its meta.json implies is rebuilt, and one whose files no longer hold what meta.json's sha256 digests recorded
when they were written (a same-size overwrite) is an error naming the file and how to rebuild it. Training memory-maps the files read-only and reads only each step's
windows (a pure function of seed and step), so a resumed run reads exactly what it would have read.

A BPE tokenizer is trained on the first ``TOKENIZER_SAMPLE`` characters of the stream (all of it for
corpora up to that size, so small corpora get the tokenizer they always got).
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from scaleformer import durable
from scaleformer.data.corpus import cache_dir
from scaleformer.data.tokenizer import ByteTokenizer
from scaleformer.files import check_file_digests, file_digests, jsonl_objects, one_line, read_json_object

__all__ = ["TextSource", "TextScan", "text_source", "scan_text", "tokenizer_sample", "documents", "tokenize_text",
           "TOKENIZER_SAMPLE", "MAX_DOCUMENT"]

TOKENIZER_SAMPLE = 32 << 20  # characters of the stream a BPE tokenizer is trained on
MAX_DOCUMENT = 64 << 20  # characters: a longer run of text without a blank line is cut there
READ = 1 << 20  # characters per read
BATCH = 4 << 20  # characters of documents per tokenizer call
FORMAT = 2  # 2: meta.json records each file's sha256, checked whenever the cache is reused


@dataclass(frozen=True)
class TextSource:
    """Where a text corpus comes from: the built-in corpus's text, or files read as a stream."""

    name: str  # "builtin" or the --data path
    files: tuple[Path, ...] = ()
    text: str | None = None  # the built-in corpus (small, already in memory)
    field: str = "text"  # the field of a JSONL line or of a dataset's record that holds the text

    def chunks(self) -> Iterator[str]:
        """The corpus text, in pieces whose concatenation is the whole text."""
        if self.text is not None:
            for start in range(0, len(self.text), READ):
                yield self.text[start:start + READ]
            return
        first = True
        for file in self.files:
            for part in _parts(file, self.field):
                if not first:
                    yield "\n\n"
                first = False
                yield from part


SUFFIXES = (".txt", ".jsonl", ".parquet", ".arrow")


def text_source(data: str | os.PathLike, field: str = "text") -> TextSource:
    """The files of ``--data`` (a .txt, .jsonl, .parquet or .arrow file, or a folder of them, sorted — e.g.
    a Hugging Face dataset written by ``save_to_disk``), checked to exist."""
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES) if path.is_dir() else [path]
    if path.is_dir() and not files:
        raise ValueError(f"--data {path}: the folder holds no {', '.join(SUFFIXES)} files")
    for file in files:
        if not file.is_file():  # a FIFO would hang the read, a device (/dev/zero) would never end
            raise ValueError(f"--data {file}: not a regular file")
    return TextSource(str(path), tuple(files), field=field)


def _parts(file: Path, field: str) -> Iterator[Iterator[str]]:
    """A .txt file is one part (read in pieces); a .jsonl, .parquet or .arrow file has one part per record
    (its ``field``)."""
    if file.suffix == ".jsonl":
        for where, record in jsonl_objects(_lines(file), file):
            if not isinstance(record.get(field), str):
                raise ValueError(f"{where}: each JSONL line needs a string field {field!r}")
            yield iter((record[field],))
    elif file.suffix in (".parquet", ".arrow"):
        yield from _dataset_parts(file, field)
    else:
        yield _read(file)


def _dataset_parts(file: Path, field: str) -> Iterator[Iterator[str]]:
    """The records of a Parquet or Arrow file, streamed by Hugging Face ``datasets`` (never loaded whole)."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"--data {file}: reading .parquet and .arrow files needs Hugging Face datasets "
                         "(pip install datasets)") from None
    logger = logging.getLogger("datasets")
    level, logger.level = logger.level, logging.CRITICAL  # its own log line would come before our one line
    try:
        records = None
        for index in itertools.count():
            try:
                if records is None:
                    records = iter(datasets.load_dataset(file.suffix[1:], data_files=[str(file)], split="train",
                                                         streaming=True))
                record = next(records)
            except StopIteration:
                return
            except Exception as error:  # noqa: BLE001 - datasets and pyarrow raise many types for a damaged file
                raise ValueError(f"--data {file}: not a readable {file.suffix[1:]} dataset "
                                 f"({one_line(error, 200)})") from None
            if not isinstance(record.get(field), str):
                raise ValueError(f"{file}: record {index} has no string field {field!r} (its fields: "
                                 f"{', '.join(sorted(record)[:8])}); pass --text-field")
            yield iter((record[field],))
    finally:
        logger.level = level


def _read(file: Path) -> Iterator[str]:
    # Text mode with universal newlines, as Path.read_text reads: "\r\n" and "\r" become "\n", also
    # across the boundary of two reads.
    with open(file, encoding="utf-8") as handle:
        try:
            while piece := handle.read(READ):
                yield piece
        except UnicodeDecodeError as error:
            raise ValueError(f"--data {file}: not UTF-8 text ({error.reason} in the bytes read); pass text, "
                             "JSONL or token ids in a .npy file") from None


def _lines(file: Path) -> Iterator[str]:
    buffer = ""
    for piece in _read(file):
        buffer += piece
        *lines, buffer = buffer.split("\n")
        yield from lines
    if buffer:
        yield buffer


@dataclass(frozen=True)
class TextScan:
    sha256: str
    characters: int


def scan_text(source: TextSource) -> TextScan:
    """One pass: the sha256 of the text's UTF-8 bytes and its length; every file checked on the way.
    Raises ``ValueError`` for an empty corpus (only whitespace)."""
    digest, characters, content = hashlib.sha256(), 0, False
    encoder = codecs.getincrementalencoder("utf-8")()
    for piece in source.chunks():
        digest.update(encoder.encode(piece))
        characters += len(piece)
        content = content or not piece.isspace()
    if not content:
        raise ValueError(f"--data {source.name}: the data is empty")
    return TextScan(digest.hexdigest(), characters)


def tokenizer_sample(source: TextSource) -> str:
    """The first TOKENIZER_SAMPLE characters of the text (the whole text when it is shorter)."""
    parts, size = [], 0
    for piece in source.chunks():
        parts.append(piece[:TOKENIZER_SAMPLE - size])
        size += len(parts[-1])
        if size >= TOKENIZER_SAMPLE:
            break
    return "".join(parts)


def documents(chunks: Iterator[str]) -> Iterator[str]:
    """The non-blank pieces of the text split at "\\n\\n", as ``text.split("\\n\\n")`` would cut them, without
    holding the text (a piece longer than MAX_DOCUMENT characters is cut into pieces of that size)."""
    carry = ""
    for chunk in chunks:
        *complete, carry = (carry + chunk).split("\n\n")
        for piece in complete:
            if piece.strip():
                yield piece
        while len(carry) > MAX_DOCUMENT:
            piece, carry = carry[:MAX_DOCUMENT], carry[MAX_DOCUMENT:]
            if piece.strip():
                yield piece
    if carry.strip():
        yield carry


def _tokenizer_digest(tokenizer) -> str:
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save(folder)
        return hashlib.sha256(Path(folder, "tokenizer.json").read_bytes()).hexdigest()


def _encode_batch(tokenizer, texts: list[str]) -> list[np.ndarray]:
    if isinstance(tokenizer, ByteTokenizer):  # its ids are the UTF-8 bytes: no per-byte Python objects
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]
    batch = getattr(getattr(tokenizer, "_tok", None), "encode_batch", None)
    if batch is not None:  # BPE: tokenizers encodes the batch on every core
        return [np.asarray(encoding.ids) for encoding in batch(texts)]
    return [np.asarray(tokenizer.encode(text)) for text in texts]


def tokenize_text(source: TextSource, scan: TextScan, tokenizer, every: int,
                  progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, train document starts, val document starts): read-only memory maps of the cached token
    files of this corpus, tokenizer and split, built first when there are none."""
    target = cache_dir() / "token-files" / f"{scan.sha256}-{_tokenizer_digest(tokenizer)[:16]}-every{every}"
    found = _open(target)
    if found is not None:
        return found
    durable.build_cache_dir(target, lambda folder: _write(source, scan, tokenizer, every, folder, progress), _usable)
    found = _open(target)
    if found is None:
        raise OSError(f"{target}: the cached token files could not be read back")
    return found


def _dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _write(source: TextSource, scan: TextScan, tokenizer, every: int, folder: Path, progress: bool) -> None:
    dtype, eos = _dtype(tokenizer.vocab_size), tokenizer.eos_id
    sides = {side: {"ids": open(folder / f"{side}.bin", "wb"), "docs": open(folder / f"{side}-docs.bin", "wb"),
                    "tokens": 0, "documents": 0} for side in ("train", "val")}
    bar = _bar(scan.characters) if progress else None
    index = 0  # documents so far: every `every`-th is held out

    def flush(batch: list[str]) -> None:
        nonlocal index
        for ids in _encode_batch(tokenizer, batch):
            side = sides["val" if index % every == every - 1 else "train"]
            np.asarray([side["tokens"]], dtype=np.int64).tofile(side["docs"])
            np.append(ids.astype(dtype), np.asarray(eos, dtype=dtype)).tofile(side["ids"])
            side["tokens"] += len(ids) + 1
            side["documents"] += 1
            index += 1
        if bar is not None:
            bar.update(sum(len(text) + 2 for text in batch))

    try:
        batch, size = [], 0
        for document in documents(source.chunks()):
            batch.append(document)
            size += len(document)
            if size >= BATCH:
                flush(batch)
                batch, size = [], 0
        flush(batch)
    finally:
        for side in sides.values():
            side["ids"].close()
            side["docs"].close()
        if bar is not None:
            bar.close()
    meta = {"format": FORMAT, "dtype": dtype.name, "corpus_sha256": scan.sha256, "every": every,
            **{f"{name}_{key}": side[key] for name, side in sides.items() for key in ("tokens", "documents")},
            "sha256": file_digests(folder, FILES)}
    durable.fault_point("write", folder / "meta.json")
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def _bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="char", unit_scale=True, desc="tokenizing", file=sys.stderr, dynamic_ncols=True)


def _map(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    if path.stat().st_size != count * dtype.itemsize:
        raise ValueError(f"{path} has the wrong size")
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype)


FILES = ("train.bin", "val.bin", "train-docs.bin", "val-docs.bin")


def _open(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """The cached files, when meta.json describes them and every file has the size it implies (None: stale
    or absent, to be rebuilt), after checking each file's content against the sha256 recorded when it was
    built (a ``ValueError`` naming the changed file: a damaged cache is never trained on)."""
    try:
        meta: dict[str, Any] = read_json_object(folder / "meta.json", "token files", 1 << 16)
        if meta.get("format") != FORMAT or meta.get("dtype") not in ("uint16", "uint32"):
            return None
        dtype = np.dtype(meta["dtype"])
        found = (_map(folder / "train.bin", dtype, int(meta["train_tokens"])),
                 _map(folder / "val.bin", dtype, int(meta["val_tokens"])),
                 _map(folder / "train-docs.bin", np.dtype(np.int64), int(meta["train_documents"])),
                 _map(folder / "val-docs.bin", np.dtype(np.int64), int(meta["val_documents"])))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    check_file_digests(folder, meta.get("sha256"), "the cached token file")
    return found


def _usable(folder: Path) -> bool:
    try:
        return _open(folder) is not None
    except ValueError:
        return False
