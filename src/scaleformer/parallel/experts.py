"""Expert parallelism: shard each MoE layer's experts across the ranks of a process group."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from scaleformer.layers.moe import MoEFeedForward

__all__ = ["shard_experts"]


def shard_experts(model: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Keep only this rank's slice of every MoE layer's experts (in place) and route through all-to-all.

    Rank j keeps experts [j·E/W, (j+1)·E/W) of each layer; routers and everything else stay replicated.
    Call it on identically initialised (or loaded) models on every rank. Each rank then processes its own
    tokens; its experts receive tokens from every rank. E must be divisible by the group size.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_experts needs torch.distributed initialised (e.g. under torchrun)")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    for layer in (m for m in model.modules() if isinstance(m, MoEFeedForward)):
        experts = layer.cfg.experts
        if experts % world:
            raise ValueError(f"{experts} experts cannot be split evenly over {world} ranks")
        if layer.expert_group is not None:
            raise ValueError("this model's experts are already sharded")
        local = experts // world
        keep = slice(rank * local, (rank + 1) * local)
        for name, param in list(layer.experts.named_parameters(recurse=False)):
            setattr(layer.experts, name, nn.Parameter(param.detach()[keep].clone(), requires_grad=param.requires_grad))
        layer.expert_group = group if group is not None else dist.group.WORLD
    return model
