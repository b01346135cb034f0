"""Worker for the sequence-parallel tests: run by torch.multiprocessing in W processes (gloo, CPU)."""

import sys

import torch
import torch.distributed as dist

from scaleformer.ops.dilated import dilated_attention
from scaleformer.parallel import CommStats, sequence_parallel_dilated_attention


def run(rank: int, world: int, port: int, case: dict, out_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        b, h, t, d = 2, case["heads"], case["length"], 8
        q, k, v = (torch.randn(b, h, t, d, dtype=torch.float64 if case["fp64"] else torch.float32) for _ in range(3))
        grad = torch.randn(b, h, t, d, dtype=q.dtype)
        kwargs = dict(segment_lengths=case["segments"], dilation_rates=case["rates"], causal=case["causal"])
        # Single-process result on the whole sequence, for comparison.
        full = [x.clone().requires_grad_() for x in (q, k, v)]
        expected = dilated_attention(*full, **kwargs)
        expected.backward(grad)
        n = t // world
        shard = slice(rank * n, (rank + 1) * n)
        local = [x[:, :, shard].clone().requires_grad_() for x in (q, k, v)]
        stats = CommStats()
        out = sequence_parallel_dilated_attention(*local, stats=stats, **kwargs)
        out.backward(grad[:, :, shard])
        errors = [(out - expected[:, :, shard]).abs().max().item() / max(expected.abs().max().item(), 1.0)]
        for mine, whole in zip(local, full):
            ref = whole.grad[:, :, shard]
            errors.append((mine.grad - ref).abs().max().item() / max(ref.abs().max().item(), 1.0))
        result = torch.tensor(errors + [float(stats.sent_bytes), float(stats.gathered_bytes)], dtype=torch.float64)
        gathered = [torch.zeros_like(result) for _ in range(world)]
        dist.all_gather(gathered, result)
        if rank == 0:
            torch.save(torch.stack(gathered), out_path)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit("run through tests/parallel/test_sequence_parallel.py")
