"""Text corpora are read as a stream and tokenized once into cached, memory-mapped token files: the same
ids, split and digest as reading the whole text, without ever holding it."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from scaleformer.data import text_tokens
from scaleformer.data.corpus import builtin_corpus
from scaleformer.data.text_tokens import documents, scan_text, text_source, tokenize_text
from scaleformer.data.tokenizer import train_tokenizer
from scaleformer.files import jsonl_objects
from scaleformer.train.trainer import TrainConfig, prepare_data


def _read_whole(path) -> str:
    """The reference: how corpora were read before streaming (whole files, read_text, joined)."""
    from pathlib import Path

    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    parts = []
    for file in files:
        content = file.read_text(encoding="utf-8")
        if file.suffix == ".jsonl":
            parts.extend(record["text"] for _, record in jsonl_objects(content, file))
        else:
            parts.append(content)
    return "\n\n".join(parts)


def _split_whole(text: str, tokenizer, every: int):
    """The reference split: paragraphs, every `every`-th held out, each followed by eos."""
    pieces = [p for p in text.split("\n\n") if p.strip()]
    train, val = [], []
    for index, piece in enumerate(pieces):
        (val if index % every == every - 1 else train).extend(tokenizer.encode(piece) + [tokenizer.eos_id])
    return np.asarray(train), np.asarray(val)


@pytest.fixture
def folder(tmp_path):
    """Text files with CRLF and CR line ends, runs of blank lines, non-ASCII text, and a JSONL file."""
    root = tmp_path / "corpus"
    root.mkdir()
    rng = np.random.default_rng(0)
    words = ["alpha", "béta", "γάμμα", "delta", "\u2028", "x" * 30, "\t", "ok."]
    for index in range(3):
        paragraphs = [" ".join(rng.choice(words, size=rng.integers(1, 40))) for _ in range(60)]
        separators = rng.choice(["\n\n", "\n\n\n", "\r\n\r\n", "\n \n\n", "\r\r"], size=len(paragraphs))
        text = "".join(p + s for p, s in zip(paragraphs, separators))
        (root / f"part{index}.txt").write_bytes(text.encode("utf-8"))
    lines = [json.dumps({"text": f"record {i}\n\nits second paragraph ü", "id": i}) for i in range(50)]
    (root / "records.jsonl").write_text("\n".join(lines[:25]) + "\n\n" + "\n".join(lines[25:]) + "\n")
    return root


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_streamed_tokens_equal_the_whole_text_computation(kind, folder, tmp_path, monkeypatch):
    if kind == "bpe":
        pytest.importorskip("tokenizers")
    monkeypatch.setenv("SCALEFORMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(text_tokens, "READ", 97)  # reads that cut lines, separators and characters' runs
    monkeypatch.setattr(text_tokens, "BATCH", 500)  # many tokenizer batches
    text = _read_whole(folder)
    source = text_source(folder)
    scan = scan_text(source)
    assert scan.sha256 == hashlib.sha256(text.encode("utf-8")).hexdigest() and scan.characters == len(text)
    assert "".join(source.chunks()) == text
    assert list(documents(source.chunks())) == [p for p in text.split("\n\n") if p.strip()]
    tokenizer = train_tokenizer(text, kind, 300)
    train, val, train_starts, val_starts = tokenize_text(source, scan, tokenizer, every=10)
    expected_train, expected_val = _split_whole(text, tokenizer, 10)
    assert isinstance(train, np.memmap) and not train.flags.writeable and train.dtype == np.uint16
    assert np.array_equal(train, expected_train) and np.array_equal(val, expected_val)
    # the document index: each document starts after the previous one's eos
    for ids, starts in ((train, train_starts), (val, val_starts)):
        ends = np.flatnonzero(np.asarray(ids) == tokenizer.eos_id)
        assert np.array_equal(starts, np.concatenate([[0], ends[:-1] + 1]))
    # the second time the cache is used as it is; a damaged copy is rebuilt
    monkeypatch.setattr(text_tokens, "_write", lambda *args: pytest.fail("rebuilt valid token files"))
    assert np.array_equal(tokenize_text(source, scan, tokenizer, every=10)[0], expected_train)
    monkeypatch.undo()
    monkeypatch.setenv("SCALEFORMER_CACHE", str(tmp_path / "cache"))
    cached = next((tmp_path / "cache" / "token-files").iterdir())
    (cached / "val.bin").write_bytes((cached / "val.bin").read_bytes()[:-2])
    assert np.array_equal(tokenize_text(source, scan, tokenizer, every=10)[1], expected_val)
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # nothing temporary left
    # a same-size overwrite is caught by the sha256 recorded at build time, named, and never trained on
    damaged = np.asarray(train).copy()
    damaged[len(damaged) // 2] ^= 1
    (cached / "train.bin").write_bytes(damaged.tobytes())
    with pytest.raises(ValueError, match=f"{cached / 'train.bin'}: the cached token file changed since it was "
                                         f"built .*delete {cached} and run again to rebuild it"):
        tokenize_text(source, scan, tokenizer, every=10)
    shutil.rmtree(cached)
    assert np.array_equal(tokenize_text(source, scan, tokenizer, every=10)[0], expected_train)


def test_a_full_disk_under_the_token_cache_names_the_cache(folder, tmp_path, monkeypatch):
    import errno

    monkeypatch.setenv("SCALEFORMER_CACHE", str(tmp_path / "cache"))

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")  # what a file object's write raises: no path

    monkeypatch.setattr(text_tokens, "_write", full)
    source = text_source(folder)
    with pytest.raises(OSError) as caught:
        tokenize_text(source, scan_text(source), train_tokenizer(_read_whole(folder), "byte", 300), every=10)
    assert caught.value.errno == errno.ENOSPC and str(tmp_path / "cache" / "token-files") in caught.value.filename
    assert list((tmp_path / "cache" / "token-files").iterdir()) == []  # the partial copy is gone


def test_the_default_run_gets_the_same_data_and_digest_as_before(tmp_path, monkeypatch):
    """The built-in corpus with the default BPE tokenizer: the ids the README's run trained on."""
    pytest.importorskip("tokenizers")
    monkeypatch.setenv("SCALEFORMER_CACHE", str(tmp_path / "cache"))
    cfg = TrainConfig(progress=False)
    data = prepare_data(cfg)
    corpus = builtin_corpus()
    assert data.corpus.sha256 == corpus.sha256 and data.corpus.source == "builtin"
    expected_train, expected_val = _split_whole(corpus.text, data.tokenizer, 10)
    assert np.array_equal(data.train, expected_train) and np.array_equal(data.val, expected_val)


def test_a_long_document_is_cut_and_bad_files_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(text_tokens, "MAX_DOCUMENT", 1000)
    monkeypatch.setattr(text_tokens, "READ", 64)
    pieces = list(documents(iter(["a" * 2500, "\n\nb"])))
    assert pieces == ["a" * 1000, "a" * 1000, "a" * 500, "b"]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text\n" * 20 + b"\xff\xfe broken")
    with pytest.raises(ValueError, match="not UTF-8 text"):
        scan_text(text_source(bad))
    record = tmp_path / "bad.jsonl"
    record.write_text('{"text": "ok"}\n\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: each JSONL line needs a string field"):
        scan_text(text_source(record))
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n \n")
    with pytest.raises(ValueError, match="the data is empty"):
        scan_text(text_source(empty))


CHILD = r"""
import resource, sys
from scaleformer.cli import main
import scaleformer.commands  # torch and the trainer load before the limit is measured (the cli itself is light)

def data_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmData:"):
            return int(line.split()[1])

# private memory may grow by 140 MB from here: the corpus (160 MB of text) cannot be read whole
limit = (data_kb() + 140 * 1024) * 1024
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
try:
    open(sys.argv[1], encoding="utf-8").read()
    sys.exit("the whole corpus fitted under the limit: the test would prove nothing")
except MemoryError:
    pass
sys.exit(main(["train", "--data", sys.argv[1], "--tokenizer", "byte", "--model", "gpt-tiny", "--seq-len", "32",
               "--batch-size", "4", "--steps", "4", "--save-every", "2", "--precision", "float32",  # bf16 kernels hold memory of their own
               "--eval-batches", "1", "--samples", "0", "--no-progress", "--out", sys.argv[2]]))
"""


def test_a_text_corpus_larger_than_the_memory_limit_trains_and_resumes(tmp_path):
    corpus = tmp_path / "big.txt"
    rng = np.random.default_rng(0)
    words = np.array([w.encode() for w in ("the", "of", "scale", "former", "retention", "näive", "a", "b")])
    with open(corpus, "wb") as handle:
        while handle.tell() < 160 << 20:
            chosen = words[rng.integers(0, len(words), size=200_000)]
            handle.write(b" ".join(chosen) + b"\n\n")
    env = {**os.environ, "SCALEFORMER_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}

    def train(out):
        result = subprocess.run([sys.executable, "-c", CHILD, str(corpus), str(out)], capture_output=True, text=True,
                                env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]

    from safetensors.torch import load_file
    from scaleformer.train.checkpoint import latest_checkpoint

    train(tmp_path / "whole")
    files = list((tmp_path / "cache" / "token-files").iterdir())
    assert len(files) == 1 and (files[0] / "train.bin").stat().st_size > 250 << 20  # uint16 ids of 160 MB
    # Interrupted after step 2 (its final checkpoint removed) and run again: it continues at step 3 from the
    # cached token files, reading the same windows, and ends with the uninterrupted run's weights.
    shutil.copytree(tmp_path / "whole", tmp_path / "half")
    shutil.rmtree(latest_checkpoint(tmp_path / "half"))
    (tmp_path / "half" / "checkpoints" / "latest").write_text("step_0000002")
    train(tmp_path / "half")
    assert latest_checkpoint(tmp_path / "half").name == "step_0000004"
    a = load_file(str(latest_checkpoint(tmp_path / "whole") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "half") / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_parquet_and_arrow_datasets_stream_like_jsonl(tmp_path, monkeypatch):
    """Hugging Face datasets' files (Parquet; Arrow, as `save_to_disk` writes) give the text a JSONL file
    with the same records gives, read by `datasets` in streaming mode; --text-field picks the field."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("SCALEFORMER_CACHE", str(tmp_path / "cache"))
    records = [{"body": f"record {i}\n\nsecond paragraph ü {i % 7}", "id": i} for i in range(300)]
    (tmp_path / "lines").mkdir()
    (tmp_path / "lines" / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    table = datasets.Dataset.from_list(records)
    table.to_parquet(str(tmp_path / "r.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))  # a folder with data-00000-of-00001.arrow and JSON metadata
    expected = _read_whole_field(tmp_path / "lines", "body")
    for data in (tmp_path / "r.parquet", tmp_path / "saved", tmp_path / "lines"):
        source = text_source(data, field="body")
        assert "".join(source.chunks()) == expected, data
    cfg = TrainConfig(data=str(tmp_path / "saved"), text_field="body", tokenizer="byte", seq_len=16, progress=False)
    data = prepare_data(cfg)
    assert data.corpus.sha256 == hashlib.sha256(expected.encode()).hexdigest()
    assert np.array_equal(data.train, _split_whole(expected, data.tokenizer, 10)[0])
    with pytest.raises(ValueError, match=r"record 0 has no string field 'text' \(its fields: body, id\)"):
        scan_text(text_source(tmp_path / "r.parquet"))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="not a readable parquet dataset"):
        scan_text(text_source(tmp_path / "broken.parquet"))


def _read_whole_field(folder, field):
    return "\n\n".join(json.loads(line)[field] for file in sorted(folder.iterdir())
                       for line in file.read_text().splitlines())
