"""Worker for the sequence-parallel tests: run by torch.multiprocessing in W processes.

gloo on CPU by default; a case may name ``device="cuda"`` and a ``backend`` (nccl needs one GPU per rank;
gloo moves CUDA tensors through host memory, so it also runs several ranks on one GPU)."""

import sys

import torch
import torch.distributed as dist

from scaleformer.ops.dilated import dilated_attention
from scaleformer.parallel import CommStats, sequence_parallel_dilated_attention


def gather_to_file(result: torch.Tensor, world: int, rank: int, out_path: str) -> None:
    """Collect every rank's result row; rank 0 saves them, stacked, for the test process to read."""
    gathered = [torch.zeros_like(result) for _ in range(world)]
    dist.all_gather(gathered, result)
    if rank == 0:
        torch.save(torch.stack(gathered).cpu(), out_path)


def _device(rank: int, case: dict) -> torch.device:
    if case.get("device", "cpu") == "cpu":
        return torch.device("cpu")
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def run(rank: int, world: int, port: int, case: dict, out_path: str) -> None:
    device = _device(rank, case)
    dist.init_process_group(case.get("backend", "gloo"), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        b, h, t, d = 2, case["heads"], case["length"], case.get("head_dim", 8)
        dtype = torch.float64 if case["fp64"] else torch.float32
        q, k, v = (torch.randn(b, h, t, d, dtype=dtype).to(device) for _ in range(3))
        grad = torch.randn(b, h, t, d, dtype=q.dtype).to(device)
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
        gather_to_file(result.to(device), world, rank, out_path)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit("run through tests/parallel/test_sequence_parallel.py")


def run_model(rank: int, world: int, port: int, arch: str, out_path: str) -> None:
    """A LongNet model on sequence shards: logits and (all-reduced) gradients vs one process."""
    import scaleformer as sf

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = sf.TransformerConfig(arch=arch, vocab_size=97, embed_dim=32, layers=2, heads=4, ffn_dim=48,
                                   norm="subln", position="xpos", xpos_scale_base=16.0, attention="dilated",
                                   segment_lengths=(4, 8, 16), dilation_rates=(1, 2, 4))
        torch.manual_seed(0)
        model = sf.build(cfg)
        ids = torch.randint(0, 97, (2, 16))
        weights = torch.randn(2, 16, 97)
        full = model(ids).logits
        (full * weights).sum().backward()
        expected = {name: p.grad.clone() for name, p in model.named_parameters()}
        model.zero_grad()
        n = 16 // world
        shard = slice(rank * n, (rank + 1) * n)
        local = model(ids[:, shard], sequence_group=dist.group.WORLD).logits
        (local * weights[:, shard]).sum().backward()
        errors = [(local - full[:, shard]).abs().max().item() / full.abs().max().item()]
        for name, param in model.named_parameters():
            dist.all_reduce(param.grad)  # what data-parallel gradient averaging does, as a sum
            errors.append((param.grad - expected[name]).abs().max().item() / max(expected[name].abs().max().item(), 1.0))
        result = torch.tensor([errors[0], max(errors[1:])], dtype=torch.float64)
        gather_to_file(result, world, rank, out_path)
    finally:
        dist.destroy_process_group()


def run_bad_layout(rank: int, world: int, port: int, case: dict, out_path: str) -> None:
    """A layout the algorithm cannot split: every rank must raise before any collective (none may hang)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        n = case["length"] // world
        q = torch.randn(1, 2, n, 4)
        try:
            sequence_parallel_dilated_attention(q, q, q, segment_lengths=case["segments"],
                                                dilation_rates=case["rates"], causal=True)
            raised = ""
        except ValueError as error:
            raised = str(error)
        dist.barrier()  # reached by every rank only if none is stuck inside a collective
        with open(f"{out_path}.{rank}", "w") as f:
            f.write(raised)
    finally:
        dist.destroy_process_group()


def run_longvit(rank: int, world: int, port: int, case: dict, out_path: str) -> None:
    """LongViT on horizontal strips of an image, one per rank: logits and (all-reduced) gradients vs one
    process on the whole image."""
    import scaleformer as sf

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = sf.LongViTConfig(img_size=64, patch_size=8, embed_dim=36, layers=2, heads=6, ffn_dim=64, num_classes=3,
                               segment_lengths=(8, 16, 64), dilation_rates=(1, 2, 4),
                               head_offsets=case.get("head_offsets", "modulo"))
        torch.manual_seed(0)
        model = sf.build(cfg).double()
        images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
        labels = torch.tensor([0, 2])
        full = model(images, labels)
        full.loss.backward()
        expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        rows = 64 // world
        local = model(images[:, :, rank * rows:(rank + 1) * rows], labels, sequence_group=dist.group.WORLD)
        local.loss.backward()
        errors = [(local.logits - full.logits).abs().max().item()]
        for name, param in model.named_parameters():
            if param.requires_grad:
                # every rank computes the whole loss: averaging the ranks' gradients (what data parallelism
                # does) gives the exact gradient
                dist.all_reduce(param.grad)
                errors.append((param.grad / world - expected[name]).abs().max().item())
        gather_to_file(torch.tensor([errors[0], max(errors[1:])], dtype=torch.float64), world, rank, out_path)
    finally:
        dist.destroy_process_group()
