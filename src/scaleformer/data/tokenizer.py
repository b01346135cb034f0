"""A dependency-free byte-level tokenizer: ids 0..255 are the UTF-8 bytes, then a few special ids."""

from __future__ import annotations

__all__ = ["ByteTokenizer"]


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
