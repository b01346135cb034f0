"""Train-step a LongNet model with its sequence split across processes.

    torchrun --nproc_per_node=2 examples/longnet_sequence_parallel.py            # CPU, gloo
    torchrun --nproc_per_node=8 examples/longnet_sequence_parallel.py --cuda     # GPUs, nccl

Every rank holds one shard of each sequence; dilated attention exchanges only the sparsified keys and
values of segments that span ranks. Gradients are summed across ranks (as data parallelism would), so
the step equals a single-process step on the whole sequence: rank 0 checks that and prints the error.
"""

import argparse
import os

import torch
import torch.distributed as dist

import scaleformer as sf


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--length", type=int, default=512)
    args = parser.parse_args()
    dist.init_process_group("nccl" if args.cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.cuda else "cpu")
    cfg = sf.load_preset("longnet-tiny", segment_lengths=(64, 128, args.length), dilation_rates=(1, 2, 8))
    torch.manual_seed(0)  # same weights and data on every rank
    model = sf.build(cfg).to(device)
    ids = torch.randint(0, cfg.vocab_size, (2, args.length + 1), device=device)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    shard = slice(rank * args.length // world, (rank + 1) * args.length // world)

    logits = model(inputs[:, shard], sequence_group=dist.group.WORLD).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[:, shard].flatten(), reduction="sum")
    loss.backward()
    for param in model.parameters():
        dist.all_reduce(param.grad)
    total = loss.detach().clone()
    dist.all_reduce(total)

    if rank == 0:  # the same step on one process, for comparison
        reference = sf.build(cfg).to(device)
        reference.load_state_dict(model.state_dict())
        ref_logits = reference(inputs).logits
        ref_loss = torch.nn.functional.cross_entropy(ref_logits.flatten(0, 1), targets.flatten(), reduction="sum")
        ref_loss.backward()
        grad_error = max(((p.grad - r.grad).abs().max() / r.grad.abs().max().clamp(min=1)).item()
                         for p, r in zip(model.parameters(), reference.parameters()))
        print(f"{world} ranks x {args.length // world} tokens: loss {total.item() / ids[:, 1:].numel():.4f} "
              f"(one process: {ref_loss.item() / ids[:, 1:].numel():.4f}), worst gradient error {grad_error:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
