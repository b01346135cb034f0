"""Tokenizers: byte-level BPE (Hugging Face ``tokenizers``, optional) and a dependency-free byte tokenizer.

Both save to and load from a directory (``tokenizer.json``), so a checkpoint carries its tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from scaleformer.files import one_line, read_json_object

__all__ = ["Tokenizer", "ByteTokenizer", "BPETokenizer", "IdTokenizer", "train_tokenizer", "load_tokenizer"]

FILE = "tokenizer.json"


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def save(self, directory: str | Path) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; ``bos_id`` = 256, ``eos_id`` = 257, ``pad_id`` = 258."""

    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        """Special ids and ids outside the byte range are skipped; invalid UTF-8 is replaced."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        Path(directory, FILE).write_text(json.dumps({"scaleformer_tokenizer": "byte"}))


class BPETokenizer:
    """Byte-level BPE from Hugging Face ``tokenizers``; ids 0 and 1 are <bos> and <eos>."""

    bos_id, eos_id = 0, 1

    def __init__(self, tokenizer) -> None:  # a tokenizers.Tokenizer
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<eos>"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_chunks(text), trainer=trainer)
        return cls(tok)

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids = self._tok.encode(text).ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_long(self, text: str) -> list[int]:
        """Encode a whole corpus in paragraph-sized pieces (fast, and identical to joining their ids)."""
        return [i for batch in self._tok.encode_batch(list(_chunks(text))) for i in batch.ids]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if i > self.eos_id])

    def save(self, directory: str | Path) -> None:
        self._tok.save(str(Path(directory, FILE)))


class IdTokenizer:
    """For pre-tokenized data: "text" is whitespace-separated integer ids; ids < ``vocab_size``; no specials
    beyond ``eos_id`` = vocab_size - 1 (used only to stop generation)."""

    bos_id = 0

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.eos_id = vocab_size - 1

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        try:
            ids = [int(token) for token in text.split()]
        except ValueError:
            raise ValueError("this model was trained on token ids: give the prompt as space-separated integers") from None
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"prompt ids must be in [0, {self.vocab_size})")
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        return " ".join(str(i) for i in ids)

    def save(self, directory: str | Path) -> None:
        Path(directory, FILE).write_text(json.dumps({"scaleformer_tokenizer": "ids", "vocab_size": self.vocab_size}))


def _chunks(text: str, size: int = 4096):
    """Split at paragraph boundaries into pieces of about ``size`` characters (keeping every character)."""
    start = 0
    while start < len(text):
        end = text.find("\n\n", start + size)
        end = len(text) if end < 0 else end + 2
        yield text[start:end]
        start = end


def train_tokenizer(text: str, kind: str = "auto", vocab_size: int = 4096) -> ByteTokenizer | BPETokenizer:
    """kind "bpe" (needs ``tokenizers``), "byte", or "auto" (BPE when ``tokenizers`` is installed)."""
    if kind not in ("auto", "bpe", "byte"):
        raise ValueError(f"tokenizer must be 'auto', 'bpe' or 'byte', got {kind!r}")
    if kind == "byte":
        return ByteTokenizer()
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        if kind == "bpe":
            raise ImportError("the BPE tokenizer needs Hugging Face tokenizers: pip install 'scaleformer[bpe]'") from None
        return ByteTokenizer()
    return BPETokenizer.train(text, vocab_size)


MAX_TOKENIZER_BYTES = 256 << 20


def load_tokenizer(directory: str | Path) -> ByteTokenizer | BPETokenizer:
    path = Path(directory, FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the checkpoint has no tokenizer")
    data = read_json_object(path, "the tokenizer file", MAX_TOKENIZER_BYTES)
    if data.get("scaleformer_tokenizer") == "byte":
        return ByteTokenizer()
    if data.get("scaleformer_tokenizer") == "ids":
        size = data.get("vocab_size")
        if not isinstance(size, int) or isinstance(size, bool) or not 2 <= size <= 1 << 31:
            raise ValueError(f"{path}: the tokenizer file is damaged (vocab_size {str(size)[:40]!r})")
        return IdTokenizer(size)
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return BPETokenizer(HFTokenizer.from_file(str(path)))
    except Exception as error:  # noqa: BLE001 - tokenizers raises its own exception types
        raise ValueError(f"{path}: the tokenizer file is damaged ({one_line(error, 150)})") from None
