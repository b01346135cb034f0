"""Distributed execution: sequence parallelism (LongNet); data parallel training lives with the trainer."""

from scaleformer.parallel.sequence import CommStats, sequence_parallel_dilated_attention

__all__ = ["CommStats", "sequence_parallel_dilated_attention"]
