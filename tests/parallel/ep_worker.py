"""Worker for the expert-parallel tests: W processes (gloo, CPU), experts sharded with all-to-all."""

import copy

import torch
import torch.distributed as dist

from scaleformer.config import MoEConfig
from scaleformer.layers.moe import MoEFeedForward
from scaleformer.parallel import shard_experts, sparse_clip_grad_norm_
from tests.parallel.sp_worker import gather_to_file


def run(rank: int, world: int, port: int, top_k: int, out_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        cfg = MoEConfig(experts=8, top_k=top_k, capacity_factor=1.0, second_expert_policy="all")
        layer = MoEFeedForward(cfg, 16, 32, kind="glu", activation="swish", bias=True).double().train()
        reference = copy.deepcopy(layer)  # one process holding all experts
        # Every rank has its own tokens (different counts, so different capacities); all ranks can rebuild all.
        data = [(torch.randn(2, 13 + r, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + r)),
                 torch.randn(2, 13 + r, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(200 + r)))
                for r in range(world)]
        expected = []
        for x, weight in data:  # the reference sees each rank's tokens separately; gradients accumulate
            out = reference(x)
            ((out * weight).sum() + reference.aux_loss).backward()
            expected.append(out.detach())
        shard_experts(layer)
        x, weight = data[rank]
        out = layer(x)
        ((out * weight).sum() + layer.aux_loss).backward()
        errors = [(out - expected[rank]).abs().max().item()]
        for name, param in layer.router.named_parameters():  # replicated: sum of every rank's part
            grad = param.grad.clone()
            dist.all_reduce(grad)
            ref = dict(reference.router.named_parameters())[name].grad
            errors.append((grad - ref).abs().max().item() / max(ref.abs().max().item(), 1.0))
        local = cfg.experts // world
        for name, param in layer.experts.named_parameters():  # this rank's slice, fed by every rank's tokens
            ref = dict(reference.experts.named_parameters())[name].grad[rank * local:(rank + 1) * local]
            errors.append((param.grad - ref).abs().max().item() / max(ref.abs().max().item(), 1.0))
        # SparseClip across ranks: replicated (router) gradients summed as data parallelism would, expert
        # gradients sharded; the norm must equal the one-process norm with expert gradients / sqrt(8).
        for param in layer.router.parameters():
            dist.all_reduce(param.grad)
        ref_expert = sum(p.grad.pow(2).sum() for p in reference.experts.parameters()) / 8
        ref_dense = sum(p.grad.pow(2).sum() for p in reference.router.parameters())
        before = {name: p.grad.clone() for name, p in layer.named_parameters()}
        total = sparse_clip_grad_norm_(layer, max_norm=1e-3)
        errors.append(abs(total.item() - (ref_dense + ref_expert).sqrt().item()) / total.item())
        coef = 1e-3 / (total.item() + 1e-6)
        errors.extend((p.grad - before[name] * coef).abs().max().item() for name, p in layer.named_parameters())
        result = torch.tensor([errors[0], max(errors[1:]), float(layer.experts.fc1.shape[0])], dtype=torch.float64)
        gather_to_file(result, world, rank, out_path)
    finally:
        dist.destroy_process_group()
