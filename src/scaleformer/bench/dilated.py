"""``scaleformer bench dilated``: LongNet's dilated attention against dense attention, and its traffic.

(a) Forward+backward time and peak memory of one attention call, dilated vs dense SDPA (causal), for
    T = 4k … 64k, with the log-log slope of each curve.
(b) Bytes communicated per rank by sequence-parallel dilated attention (gloo, CPU processes spawned
    here) at a fixed sequence length for several world sizes: the gathered sparse keys/values
    (the paper's quantity: w/r rows per head per pattern that spans ranks) and the bytes each rank sends.
(c) The same with a fixed number of tokens per rank (the sequence grows with the ranks, as LongNet scales).
"""

from __future__ import annotations

import argparse
import os
import statistics
import socket
import tempfile
from typing import Any

import torch
import torch.nn.functional as F

from scaleformer.bench.common import (attention_step, log_log_slope, machine_info, peak_memory, print_table,
                                       time_call, write_json)
from scaleformer.ops.dilated import dilated_attention

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--segments", type=int, nargs="+", default=[1024, 2048, 4096, 8192],
                        help="segment lengths of the dilated patterns (table a)")
    parser.add_argument("--rates", type=int, nargs="+", default=[1, 2, 4, 8], help="dilation rates (table a)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--max-dense", type=int, default=32768, help="longest T at which dense SDPA is timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worlds", type=int, nargs="*", default=[2, 4], help="process counts for table b (none: skip)")
    parser.add_argument("--comm-length", type=int, default=32768, help="sequence length for table b")
    parser.add_argument("--comm-segments", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 32768])
    parser.add_argument("--comm-rates", type=int, nargs="+", default=[1, 2, 4, 8, 32])
    parser.add_argument("--weak-tokens-per-rank", type=int, default=8192, help="weak scaling (table c)")
    parser.add_argument("--weak-segments", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--weak-rates", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="of q, k, v (table a)")
    parser.add_argument("--json", help="write the figures to this JSON file")


def _case(kind: str, t: int, args: argparse.Namespace, device: torch.device):
    def op(q, k, v):
        if kind == "dense":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return dilated_attention(q, k, v, segment_lengths=args.segments, dilation_rates=args.rates, causal=True)

    return attention_step(op, heads=args.heads, length=t, head_dim=args.head_dim, dtype=getattr(torch, args.dtype),
                          device=device)


def attention_cost(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Per T: peak memory of each variant, then times taken round-robin (dilated, dense, dilated, ...) so
    that a slow spell of the shared machine hits both alike; medians."""
    rows = []
    for t in args.lengths:
        row: dict[str, Any] = {"T": t, "dense_s": None, "dense_peak_mb": None}
        kinds = ["dilated"] + (["dense"] if t <= args.max_dense else [])
        steps = {kind: _case(kind, t, args, device) for kind in kinds}
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        for kind, step in steps.items():
            row[f"{kind}_peak_mb"] = peak_memory(step, device=device) / 2**20  # also the warm-up
        for _ in range(args.repeats):
            for kind, step in steps.items():
                times[kind].append(time_call(step, device=device, warmup=0, repeats=1))
        for kind in kinds:
            row[f"{kind}_s"] = statistics.median(times[kind])
        row["dense_over_dilated"] = None if row["dense_s"] is None else row["dense_s"] / row["dilated_s"]
        rows.append(row)
        print(f"  T={t}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)), flush=True)
    return rows


def _comm_worker(rank: int, world: int, port: int, args: dict[str, Any], out_dir: str) -> None:
    import torch.distributed as dist

    from scaleformer.parallel import CommStats, sequence_parallel_dilated_attention

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        n = args["length"] // world
        torch.manual_seed(rank)
        q, k, v = (torch.randn(1, args["heads"], n, args["head_dim"], requires_grad=True) for _ in range(3))
        stats = CommStats()
        out = sequence_parallel_dilated_attention(q, k, v, segment_lengths=args["segments"],
                                                  dilation_rates=args["rates"], causal=True, stats=stats)
        out.sum().backward()
        torch.save({"sent": stats.sent_bytes, "gathered": stats.gathered_bytes},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _traffic(world: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Spawn ``world`` gloo processes on ``spec`` and return the worst rank's bytes (forward + backward)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir, socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        mp.spawn(_comm_worker, args=(world, port, spec, out_dir), nprocs=world, join=True)
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]
    row = {"world": world, "T": spec["length"], "per_rank_length": spec["length"] // world,
           "gathered_mb": max(r["gathered"] for r in ranks) / 2**20, "sent_mb": max(r["sent"] for r in ranks) / 2**20}
    print(f"  world={world}: {row}", flush=True)
    return row


def communication(args: argparse.Namespace, *, weak: bool) -> list[dict[str, Any]]:
    """Strong scaling: one sequence of --comm-length split over more ranks. Weak scaling (LongNet's
    setting: the sequence grows with the devices): --weak-tokens-per-rank on every rank, T = that × ranks."""
    segments, rates = (args.weak_segments, args.weak_rates) if weak else (args.comm_segments, args.comm_rates)
    rows = []
    for world in args.worlds:
        length = args.weak_tokens_per_rank * world if weak else args.comm_length
        rows.append(_traffic(world, {"length": length, "heads": args.heads, "head_dim": args.head_dim,
                                     "segments": tuple(segments), "rates": tuple(rates)}))
    for row in rows:
        row["gathered_vs_first"] = row["gathered_mb"] / rows[0]["gathered_mb"] if rows[0]["gathered_mb"] else None
        row["sent_vs_first"] = row["sent_mb"] / rows[0]["sent_mb"] if rows[0]["sent_mb"] else None
    return rows


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    info = machine_info(device)
    flops_per_token = 2 * args.head_dim * sum(w / r**2 for w, r in zip(args.segments, args.rates))
    print(f"dilated attention benchmark on {info}; heads={args.heads}, head dim={args.head_dim}, causal, {args.dtype}, "
          f"batch 1; patterns w={args.segments} r={args.rates} "
          f"(~{flops_per_token / (2 * args.head_dim):.0f} key visits per token and head before causality)")
    cost = attention_cost(args, device)
    print_table("(a) forward+backward of one attention call: median seconds, peak tensor MB",
                ["T", "dilated s", "dense s", "dense/dilated", "dilated MB", "dense MB"],
                [[r["T"], r["dilated_s"], r["dense_s"], r["dense_over_dilated"], r["dilated_peak_mb"],
                  r["dense_peak_mb"]] for r in cost])
    long = [r for r in cost if r["T"] >= 8192]
    slopes = {kind: log_log_slope([r["T"] for r in long], [r[f"{kind}_s"] or 0 for r in long]) for kind in ("dilated", "dense")}
    memory_slopes = {kind: log_log_slope([r["T"] for r in long], [r[f"{kind}_peak_mb"] or 0 for r in long])
                     for kind in ("dilated", "dense")}
    print("log-log slope of time vs T from 8k: " + ", ".join(f"{k} {v:.2f}" for k, v in slopes.items() if v))
    print("log-log slope of peak memory vs T from 8k: "
          + ", ".join(f"{k} {v:.2f}" for k, v in memory_slopes.items() if v))
    comm = communication(args, weak=False) if args.worlds else []
    weak = communication(args, weak=True) if args.worlds else []
    columns = ["ranks", "T", "tokens per rank", "gathered MB", "sent MB", "gathered vs first", "sent vs first"]
    for title, rows in ((f"(b) sequence parallel, strong scaling: T={args.comm_length}, patterns w={args.comm_segments} "
                         f"r={args.comm_rates}: MB per rank (forward + backward)", comm),
                        (f"(c) sequence parallel, weak scaling: {args.weak_tokens_per_rank} tokens per rank, patterns "
                         f"w={args.weak_segments} r={args.weak_rates}: MB per rank (forward + backward)", weak)):
        if rows:
            print_table(title, columns, [[r["world"], r["T"], r["per_rank_length"], r["gathered_mb"], r["sent_mb"],
                                          r["gathered_vs_first"], r["sent_vs_first"]] for r in rows])
    if args.json:
        write_json(args.json, {"benchmark": "dilated", "machine": info, "settings": {
            k: v for k, v in vars(args).items() if k not in ("json", "run", "command", "bench")},
            "attention": cost, "time_slopes_from_8k": slopes, "memory_slopes_from_8k": memory_slopes,
            "communication": comm, "communication_weak_scaling": weak})
    return 0
