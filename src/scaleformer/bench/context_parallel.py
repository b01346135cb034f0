"""``scaleformer bench context-parallel``: one sequence split across CPU processes (gloo), against one process.

For each model (a RetNet, Gated DeltaNet, Mamba-2, a GPT and the GDN 3:1 hybrid, all of one width and
depth) and each sequence length, one training step (forward and backward of a batch of one) is run in one
process and split over W processes (each given one thread). Reported:

* **bytes sent per rank** (the rank that sends most; every context-parallel exchange, forward and backward;
  counted, not estimated):
  LASP's claim is that the recurrent layers' traffic does not grow with T — held when the bytes at the
  longest length equal those at the shortest; attention's all-gather of keys and values grows linearly.
* **activation memory per rank**: the bytes of every tensor saved for backward during the step (parameters
  excluded), counted exactly, on the rank that saves most; and the longest sequence whose activations fit in ``--memory-gib`` on one
  process and on each of W, extrapolated linearly from the two longest lengths measured.
* **causal balance** (models with softmax attention): the (query, key) pairs each rank's attention
  scores and the step time, with the work balanced (zig-zag chunks, the default) and with the contiguous
  split's (rank r over the keys of ranks ≤ r), the slowest rank deciding the step.
* **wall time** of the step, median of ``--repeats``: W processes sharing the machine's cores (cores / W
  threads each, at least one) against one process using them all. On a 2-core machine this shows the cost
  of splitting, not the gain of W devices: the processes share the cores one process already uses.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from typing import Any

import torch

import scaleformer as sf
from scaleformer.bench.common import machine_info, print_table, write_json

__all__ = ["add_arguments", "run", "models"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embed-dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384],
                        help="sequence lengths (each divisible by every world size)")
    parser.add_argument("--long", type=int, default=65536,
                        help="one more length for --long-models only (0: none)")
    parser.add_argument("--long-models", nargs="+", default=["retnet"],
                        help="models run at --long: at width 256 one process's activations at 64k tokens are about "
                             "9 GB for the RetNet, 20-24 GB for Gated DeltaNet and Mamba-2 (this machine has 24)")
    parser.add_argument("--models", nargs="+", default=None,
                        help="a subset of: retnet gdn mamba2 gpt gdn-hybrid (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-gib", type=float, default=16.0, help="activation memory budget for the fit")
    parser.add_argument("--device", default="cpu", help="cpu (gloo), or cuda: one GPU per rank over NCCL when there "
                        "are enough, else gloo with the ranks sharing the GPUs")
    parser.add_argument("--json", help="write the figures to this JSON file")


#: the models whose attention layers the causal balance applies to
ATTENTION = ("gpt", "gdn-hybrid")


def models(args: argparse.Namespace) -> dict[str, sf.ConfigBase]:
    d, n, h = args.embed_dim, args.layers, args.heads
    chosen = getattr(args, "models", None)
    every = {
        "retnet": sf.retnet(vocab_size=1024, embed_dim=d, value_dim=d, layers=n, heads=h, ffn_dim=2 * d,
                            chunk_size=64),
        "gdn": sf.delta_rule_lm(vocab_size=1024, embed_dim=d, layers=n, heads=h, head_dim=d // h),
        "mamba2": sf.mamba2_lm(vocab_size=1024, embed_dim=d, layers=n, state_dim=32),
        "gpt": sf.transformer(vocab_size=1024, embed_dim=d, layers=n, heads=h, ffn_dim=4 * d, position="rope"),
        "gdn-hybrid": sf.delta_rule_lm(vocab_size=1024, embed_dim=d, layers=n, heads=h, head_dim=d // h,
                                       attention_every=4, attention_heads=h, attention_kv_heads=h),
    }
    unknown = set(chosen or ()) - set(every)
    if unknown:
        raise ValueError(f"--models: unknown {sorted(unknown)}; choose from {list(every)}")
    return {name: config for name, config in every.items() if not chosen or name in chosen}


def _step(model: torch.nn.Module, ids: torch.Tensor, device: torch.device, **kwargs: Any) -> tuple[float, int]:
    """One forward and backward: (seconds, bytes saved for backward, parameters excluded)."""
    parameters = {p.data_ptr() for p in model.parameters()}
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        if tensor.data_ptr() not in parameters:
            saved += tensor.numel() * tensor.element_size()
        return tensor

    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = model(ids, **kwargs).logits
    logits.float().square().mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start, saved


def _cases(args: argparse.Namespace) -> list[tuple[str, int]]:
    names = list(models(args))
    cases = [(name, length) for length in args.lengths for name in names]
    if args.long:
        cases += [(name, args.long) for name in args.long_models]
    return cases


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    import torch.distributed as dist

    from scaleformer.parallel.context import COMM, causal_balance

    torch.set_num_threads(max(1, args.cores // world))  # the machine's cores shared out, as one process uses them
    device = torch.device("cpu")
    backend = "gloo"
    if args.device == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl" if torch.cuda.device_count() >= world else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = []
        configs = models(args)
        for name, length in _cases(args):
            torch.manual_seed(0)
            model = sf.build(configs[name]).to(device)
            ids = torch.randint(0, 1024, (1, length), generator=torch.Generator().manual_seed(1)).to(device)
            n = length // world
            shard = ids[:, rank * n:(rank + 1) * n]
            for balanced in ((True, False) if name in ATTENTION else (True,)):
                seconds, sent, saved, scored = [], 0, 0, 0
                with causal_balance(balanced):
                    for repeat in range(args.repeats + 1):  # the first is a warm-up
                        dist.barrier()
                        COMM.reset()
                        elapsed, saved = _step(model, shard, device, sequence_group=dist.group.WORLD)
                        sent, scored = COMM.sent, COMM.scored
                        if repeat:
                            seconds.append(elapsed)
                times = torch.tensor([statistics.median(seconds)], dtype=torch.float64, device=device)
                dist.all_reduce(times, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank's does
                # the busiest rank's attention work and activations: what decides the step and what must fit
                busiest = torch.tensor([scored, saved, sent], dtype=torch.float64, device=device)
                dist.all_reduce(busiest, op=dist.ReduceOp.MAX)
                results.append({"model": name, "length": length, "world": world, "balanced": balanced,
                                "sent_bytes": int(busiest[2]), "saved_bytes": int(busiest[1]), "seconds": float(times),
                                "most_scored": int(busiest[0])})
        if rank == 0:
            torch.save(results, out)
        dist.barrier()  # nobody leaves while a peer's last message may still be on its way
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_process(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(args.cores)
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    configs, rows = models(args), []
    for name, length in _cases(args):
        torch.manual_seed(0)
        model = sf.build(configs[name]).to(device)
        ids = torch.randint(0, 1024, (1, length), generator=torch.Generator().manual_seed(1)).to(device)
        runs = [_step(model, ids, device) for _ in range(args.repeats + 1)][1:]
        rows.append({"model": name, "length": length, "world": 1, "sent_bytes": 0, "saved_bytes": runs[-1][1],
                     "seconds": statistics.median(seconds for seconds, _ in runs)})
    return rows


def _fits(rows: list[dict[str, Any]], name: str, world: int, budget: float) -> int | None:
    """The longest sequence whose per-rank activations fit ``budget`` bytes: a line through the two longest
    lengths measured for this model (saved bytes are affine in the shard's length)."""
    points = sorted((r["length"], r["saved_bytes"]) for r in rows if r["model"] == name and r["world"] == world)
    if len(points) < 2:
        return None
    (t1, b1), (t2, b2) = points[-2:]
    slope = (b2 - b1) / (t2 - t1)
    return int((budget - (b2 - slope * t2)) / slope) if slope > 0 else None


def run(args: argparse.Namespace) -> int:
    import torch.multiprocessing as mp

    args.cores = torch.get_num_threads()  # torch's default: the cores this process may use
    if any(length % world for length in [*args.lengths, *([args.long] if args.long else [])] for world in args.worlds):
        raise ValueError("every length must be divisible by every world size")
    info = machine_info(torch.device("cuda" if args.device == "cuda" else "cpu"))
    print(f"Context parallelism on {info}: width {args.embed_dim}, {args.layers} layers, {args.heads} heads, fp32, "
          f"batch 1, one forward + backward; median of {args.repeats} after a warm-up")
    rows = _one_process(args)
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as folder:
            out = os.path.join(folder, "rows.pt")
            mp.spawn(_worker, args=(world, _free_port(), args, out), nprocs=world, join=True)
            rows += torch.load(out, weights_only=False)
    single = {(r["model"], r["length"]): r for r in rows if r["world"] == 1}
    for r in rows:
        r["vs_one_process"] = single[(r["model"], r["length"])]["seconds"] / r["seconds"]
    contiguous = [r for r in rows if r.get("balanced") is False]
    rows = [r for r in rows if r.get("balanced", True)]  # the default split, for the tables below
    print_table("bytes sent per rank (MB), activation memory per rank (MB), step time (s) and one process's "
                "time over it", ["model", "T", "W", "sent MB", "saved MB", "seconds", "speed-up"],
                [[r["model"], r["length"], r["world"], r["sent_bytes"] / 2**20, r["saved_bytes"] / 2**20,
                  r["seconds"], r["vs_one_process"]] for r in rows])
    balance = []
    for off in contiguous:
        on = next(r for r in rows if (r["model"], r["length"], r["world"]) == (off["model"], off["length"], off["world"]))
        balance.append({"model": off["model"], "length": off["length"], "world": off["world"],
                        "most_scored_balanced": on["most_scored"], "most_scored_contiguous": off["most_scored"],
                        "sent_balanced": on["sent_bytes"], "sent_contiguous": off["sent_bytes"],
                        "seconds_balanced": on["seconds"], "seconds_contiguous": off["seconds"]})
    if balance:
        print_table("causal balance: the busiest rank's scored (query, key) pairs (millions), bytes sent per rank "
                    "(MB) and the step (s), balanced against contiguous",
                    ["model", "T", "W", "pairs bal.", "pairs contig.", "MB bal.", "MB contig.", "s bal.",
                     "s contig.", "contig. / bal."],
                    [[b["model"], b["length"], b["world"], b["most_scored_balanced"] / 1e6,
                      b["most_scored_contiguous"] / 1e6, b["sent_balanced"] / 2**20, b["sent_contiguous"] / 2**20,
                      b["seconds_balanced"], b["seconds_contiguous"],
                      b["seconds_contiguous"] / b["seconds_balanced"]] for b in balance])
    held = []
    for name in models(args):
        for world in args.worlds:
            sent = [r["sent_bytes"] for r in sorted(rows, key=lambda r: r["length"])
                    if r["model"] == name and r["world"] == world]
            held.append({"model": name, "world": world, "sent_shortest": sent[0], "sent_longest": sent[-1],
                         "constant": sent[0] == sent[-1]})
    print_table("LASP's claim: bytes per rank independent of T (recurrent models)",
                ["model", "W", "shortest T MB", "longest T MB", "constant"],
                [[h["model"], h["world"], h["sent_shortest"] / 2**20, h["sent_longest"] / 2**20,
                  "held" if h["constant"] else "grows"] for h in held])
    budget = args.memory_gib * 2**30
    fits = [{"model": name, "world": world, "longest": _fits(rows, name, world, budget)}
            for name in models(args) for world in [1, *args.worlds]]
    print_table(f"longest sequence whose activations fit {args.memory_gib:g} GiB per process (extrapolated)",
                ["model", "W", "tokens"], [[f["model"], f["world"], f["longest"]] for f in fits])
    if args.json:
        write_json(args.json, {"benchmark": "context-parallel", "machine": info, "settings": {
            k: v for k, v in vars(args).items() if k not in ("json", "run", "command", "bench")},
            "results": rows, "contiguous": contiguous, "balance": balance, "lasp_claim": held, "fits": fits})
    return 0
