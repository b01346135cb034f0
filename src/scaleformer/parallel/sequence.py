"""Sequence-parallel dilated attention lives with the op it splits: :mod:`scaleformer.ops.dilated_parallel`.
This name is kept for code written against it."""

from scaleformer.ops.dilated_parallel import CommStats, sequence_parallel_dilated_attention

__all__ = ["sequence_parallel_dilated_attention", "CommStats"]
