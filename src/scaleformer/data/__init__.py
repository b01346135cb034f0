"""Corpora and tokenizers."""

from scaleformer.data.tokenizer import ByteTokenizer

__all__ = ["ByteTokenizer"]
