"""``scaleformer bench sparse``: the sparse attentions (dilated, S2) by kernel against fused dense attention.

Forward+backward of one causal attention call (batch 1, ``--heads`` heads of ``--head-dim``) at each length,
for each of ``--kernels``: "auto" (the PyTorch paths: per-pattern fused kernels for dilated, kept-block
calls for S2) and "triton" (the block-sparse Triton kernel of :mod:`scaleformer.ops.block_sparse_triton`,
on CUDA; on the CPU only under ``TRITON_INTERPRET=1``, far too slow to time). Dense is
``F.scaled_dot_product_attention`` (FlashAttention-2 for half precision on NVIDIA GPUs). Times are medians of
round-robin repeats after a warm-up; ``dense/X`` is the speed-up of X over dense. The kernel's outputs are
also checked against the PyTorch path at the shortest length (max abs difference, reported).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any, Callable

import torch
import torch.nn.functional as F

from scaleformer.bench.common import attention_step, machine_info, peak_memory, print_table, time_call, write_json
from scaleformer.ops.dilated import dilated_attention
from scaleformer.ops.s2 import S2Layout, s2_attention

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--max-dense", type=int, default=65536, help="longest length at which dense is timed")
    parser.add_argument("--ops", nargs="+", default=["dilated", "s2"], choices=["dilated", "s2"])
    parser.add_argument("--kernels", nargs="+", default=["auto", "triton"], choices=["auto", "triton"])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--segments", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768],
                        help="dilated segment lengths (LongNet's)")
    parser.add_argument("--rates", type=int, nargs="+", default=[1, 2, 4, 6, 12], help="dilated rates (LongNet's)")
    parser.add_argument("--block", type=int, default=64, help="S2 block (Phi-3-small's layout by default)")
    parser.add_argument("--local-blocks", type=int, default=16)
    parser.add_argument("--vert-stride", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", help="write the figures to this JSON file")


def _op(name: str, kernel: str, args: argparse.Namespace) -> Callable[..., torch.Tensor]:
    if name == "dense":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if name == "dilated":
        return lambda q, k, v: dilated_attention(q, k, v, segment_lengths=args.segments, dilation_rates=args.rates,
                                                 causal=True, kernel=kernel)
    layout = S2Layout(block=args.block, local_blocks=args.local_blocks, vert_stride=args.vert_stride)
    return lambda q, k, v: s2_attention(q, k, v, layout, causal=True, kernel=kernel)


def _agreement(name: str, args: argparse.Namespace, device: torch.device, t: int) -> float:
    """Max |triton − auto| of the outputs at length t (same inputs)."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, args.heads, t, args.head_dim, device=device, dtype=getattr(torch, args.dtype))
               for _ in range(3))
    with torch.no_grad():
        return float((_op(name, "triton", args)(q, k, v).float() - _op(name, "auto", args)(q, k, v).float()).abs().max())


def cost(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for t in args.lengths:
        variants = {f"{name}_{kernel}": _op(name, kernel, args) for name in args.ops for kernel in args.kernels}
        if t <= args.max_dense:
            variants["dense"] = _op("dense", "auto", args)
        steps = {key: attention_step(op, heads=args.heads, length=t, head_dim=args.head_dim,
                                     dtype=getattr(torch, args.dtype), device=device) for key, op in variants.items()}
        row: dict[str, Any] = {"T": t}
        for key, step in steps.items():
            row[f"{key}_peak_mb"] = peak_memory(step, device=device) / 2**20  # also the warm-up
        times: dict[str, list[float]] = {key: [] for key in steps}
        for _ in range(args.repeats):  # round-robin: a slow spell of a shared machine hits every variant
            for key, step in steps.items():
                times[key].append(time_call(step, device=device, warmup=0, repeats=1))
        for key in steps:
            row[f"{key}_s"] = statistics.median(times[key])
        for key in steps:
            if "dense" in steps and key != "dense":
                row[f"dense_over_{key}"] = row["dense_s"] / row[f"{key}_s"]
        rows.append(row)
        print(f"  T={t}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k.endswith("_s")), flush=True)
    return rows


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    info = machine_info(device)
    print(f"sparse attention kernels on {info}: {args.heads} heads of {args.head_dim}, {args.dtype}, batch 1, causal; "
          f"dilated w={args.segments} r={args.rates}; S2 block {args.block}, {args.local_blocks} local, stride "
          f"{args.vert_stride}")
    agreement = {}
    if "triton" in args.kernels and "auto" in args.kernels:
        agreement = {name: _agreement(name, args, device, min(args.lengths)) for name in args.ops}
        print("max |triton − auto| of the outputs at T=" f"{min(args.lengths)}: {agreement}")
    rows = cost(args, device)
    keys = [f"{name}_{kernel}" for name in args.ops for kernel in args.kernels]
    print_table("forward+backward of one attention call: median seconds (speed-up over dense)",
                ["T", "dense s"] + [f"{key} s" for key in keys] + [f"dense/{key}" for key in keys],
                [[r["T"], r.get("dense_s")] + [r[f"{key}_s"] for key in keys]
                 + [r.get(f"dense_over_{key}") for key in keys] for r in rows])
    print_table("peak tensor MB", ["T", "dense"] + keys,
                [[r["T"], r.get("dense_peak_mb")] + [r[f"{key}_peak_mb"] for key in keys] for r in rows])
    if args.json:
        write_json(args.json, {"benchmark": "sparse", "machine": info, "settings": {
            k: v for k, v in vars(args).items() if k not in ("json", "run", "command", "bench")},
            "agreement": agreement, "attention": rows})
    return 0
