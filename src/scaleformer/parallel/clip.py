"""SparseClip: gradient-norm clipping that knows which gradients belong to experts.

Dense gradients are the same on every data-parallel rank; expert gradients are sharded (each rank holds
its experts) or, in one process, summed over few tokens each. SparseClip (TorchScale's MoE recipe)
computes the global norm with expert gradients divided by d = sqrt(max(world_size, experts)), sums the
expert part across ranks, and then multiplies EVERY gradient — experts included — by
min(1, max_norm / (norm + 1e-6)). (TorchScale's sample divides a copy of the expert gradients, so the clip
never reaches them.)
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from scaleformer.layers.moe import Experts, moe_layers

__all__ = ["sparse_clip_grad_norm_", "expert_parameters"]


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the experts (found by module type, not by parameter name)."""
    return [p for module in model.modules() if isinstance(module, Experts) for p in module.parameters()]


def _squared_norm(params: Iterable[nn.Parameter], scale: float) -> Tensor:
    """Σ (g / scale)² in float64. FSDP2-sharded gradients (DTensors) contribute their local shard, summed
    across the ranks that hold the shards."""
    total = torch.zeros((), dtype=torch.float64)
    sharded = torch.zeros((), dtype=torch.float64)
    any_sharded = False
    for p in params:
        if p.grad is None:
            continue
        g = p.grad.detach()
        if hasattr(g, "to_local"):  # a DTensor: this rank's shard
            g, any_sharded = g.to_local(), True
            target = "sharded"
        else:
            target = "total"
        # fp32 or wider, whatever the gradients' dtype (bf16 squares would lose most of their bits)
        value = g.to(torch.promote_types(g.dtype, torch.float32)).div(scale).pow(2).sum().double().cpu()
        if target == "sharded":
            sharded = sharded + value
        else:
            total = total + value
    if any_sharded:
        dist.all_reduce(sharded)
    return total + sharded


def sparse_clip_grad_norm_(model: nn.Module, max_norm: float, *, experts: int | None = None,
                           group: dist.ProcessGroup | None = None) -> Tensor:
    """Clip in place; return the (scaled) global norm before clipping.

    ``experts``: experts per MoE layer (default: those this rank holds, times the group size when they
    are sharded — the total). ``group``: the data/expert-parallel group (default: world, when
    torch.distributed is initialised).
    """
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size(group) if distributed else 1
    # Sharded experts (shard_experts): each rank holds different experts' gradients, summed across ranks.
    # Replicated experts (plain data parallelism): every rank already holds the same, averaged gradients.
    sharded = distributed and any(layer.expert_group is not None for layer in moe_layers(model))
    expert_params = expert_parameters(model)
    expert_ids = {id(p) for p in expert_params}
    dense_params = [p for p in model.parameters() if id(p) not in expert_ids]
    if experts is None:
        local = max((m.fc1.shape[0] for m in model.modules() if isinstance(m, Experts)), default=1)
        experts = local * world if sharded else local
    denom = math.sqrt(max(world, experts))
    dense = _squared_norm(dense_params, 1.0)
    sparse = _squared_norm(expert_params, denom).to(dense.device)
    if sharded:
        dist.all_reduce(sparse, group=group)
    total = torch.sqrt(dense + sparse)
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(coef)
    return total
