"""Distributed execution: sequence parallelism (LongNet); data parallel training lives with the trainer."""

from scaleformer.parallel.clip import expert_parameters, sparse_clip_grad_norm_
from scaleformer.parallel.experts import shard_experts
from scaleformer.ops.dilated_parallel import CommStats, sequence_parallel_dilated_attention

__all__ = ["CommStats", "sequence_parallel_dilated_attention", "sparse_clip_grad_norm_", "expert_parameters",
           "shard_experts"]
