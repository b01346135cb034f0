"""``scaleformer bench s2``: S2-Attention's kept-blocks path against fused dense causal attention and LongNet's
dilated attention, by length; its peak memory; and the decoding cache it keeps against a full one.

All in one process, fp32, batch 1, causal, with the chosen layout (Phi-3-small's by default: block 64, 16 local
blocks, vertical stride 8, heterogeneous heads):

(a) one forward call (no gradient) of ``--heads`` heads of ``--head-dim``: median seconds of S2
    (:func:`scaleformer.ops.s2.s2_attention`), SDPA's causal attention (up to ``--max-dense``) and dilated
    attention (``--segments`` / ``--rates``); the share of (query, key) pairs S2 keeps, counted exactly, and the
    log-log slope of S2's time against the pairs it visits (1 = time in proportion to the blocks visited);
(b) forward+backward (training) time and peak tensor memory, S2 against dense, at ``--train-lengths``;
(c) the bytes an :class:`~scaleformer.cache.S2KVCache` holds after a whole context, against a full cache of
    the same tokens, for ``--cache-heads`` query / key-value head pairs (Phi-3-small: 32 / 8; one key/value
    head per query head keeps least).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from scaleformer.bench.common import log_log_slope, machine_info, peak_memory, print_table, time_call, write_json
from scaleformer.cache import S2KVCache
from scaleformer.ops.dilated import dilated_attention
from scaleformer.ops.s2 import S2Layout, s2_attention

__all__ = ["add_arguments", "run", "kept_fraction"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--max-dense", type=int, default=32768, help="longest length at which dense SDPA is timed")
    parser.add_argument("--train-lengths", type=int, nargs="*", default=[4096, 16384])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--local-blocks", type=int, default=16)
    parser.add_argument("--vert-stride", type=int, default=8)
    parser.add_argument("--segments", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--rates", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--cache-heads", type=str, nargs="*", default=["32/8", "8/8"],
                        help="query/key-value heads for table c")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per cell (median), after one warm-up")
    parser.add_argument("--json", help="write the figures to this JSON file")


def kept_fraction(layout: S2Layout, heads: int, length: int) -> float:
    """The share of causal (query, key) pairs the layout keeps, over all heads."""
    positions = torch.arange(length)
    blocks = positions // layout.block
    kept = 0
    for start in range(0, length, 1024):  # rows in slices: the full mask would be length² booleans
        rows = blocks[start:start + 1024, None]
        seen = layout.blocks(heads, rows, blocks[None, :], causal=True)
        seen = seen & (positions[None, None, :] <= positions[start:start + 1024, None][None])
        kept += int(seen.sum())
    return kept / (heads * length * (length + 1) / 2)


def _forward_table(args: argparse.Namespace, layout: S2Layout, cpu: torch.device) -> list[dict[str, Any]]:
    rows = []
    with torch.no_grad():
        for length in args.lengths:
            q, k, v = (torch.randn(1, args.heads, length, args.head_dim) for _ in range(3))
            row: dict[str, Any] = {"length": length, "dense_s": None}
            row["s2_s"] = time_call(lambda: s2_attention(q, k, v, layout), device=cpu, repeats=args.repeats)
            row["dilated_s"] = time_call(lambda: dilated_attention(q, k, v, segment_lengths=args.segments,
                                                                   dilation_rates=args.rates, causal=True),
                                         device=cpu, repeats=args.repeats)
            if length <= args.max_dense:
                row["dense_s"] = time_call(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                           device=cpu, repeats=args.repeats)
            row["kept"] = kept_fraction(layout, args.heads, length)
            row["pairs_visited"] = row["kept"] * args.heads * length * (length + 1) / 2
            row["speedup"] = None if row["dense_s"] is None else row["dense_s"] / row["s2_s"]
            rows.append(row)
            print(f"  {length}: S2 {row['s2_s']:.3f} s, dilated {row['dilated_s']:.3f} s, dense {row['dense_s']}")
    return rows


def _train_table(args: argparse.Namespace, layout: S2Layout, cpu: torch.device) -> list[dict[str, Any]]:
    rows = []
    for length in args.train_lengths:
        q, k, v = (torch.randn(1, args.heads, length, args.head_dim, requires_grad=True) for _ in range(3))
        grad = torch.randn(1, args.heads, length, args.head_dim)
        row: dict[str, Any] = {"length": length}
        for kind in ("s2", "dense"):
            def step(kind: str = kind) -> None:
                out = (s2_attention(q, k, v, layout) if kind == "s2"
                       else F.scaled_dot_product_attention(q, k, v, is_causal=True))
                out.backward(grad)
                q.grad = k.grad = v.grad = None

            row[f"{kind}_peak_mb"] = peak_memory(step, device=cpu) / 2**20
            row[f"{kind}_s"] = time_call(step, device=cpu, repeats=args.repeats)
        row["speedup"] = row["dense_s"] / row["s2_s"]
        rows.append(row)
    return rows


def _cache_table(args: argparse.Namespace, layout: S2Layout) -> list[dict[str, Any]]:
    rows = []
    for pair in args.cache_heads:
        heads, kv_heads = (int(x) for x in pair.split("/"))
        for length in args.lengths:
            cache = S2KVCache(layout=layout, heads=heads)
            chunk = 1024
            for start in range(0, length, chunk):  # a prompt in chunks, then one decoding step
                end = min(length - 1, start + chunk)
                if end > start:
                    _fill(cache, kv_heads, args.head_dim, start, end)
            _fill(cache, kv_heads, args.head_dim, length - 1, length)
            _fill(cache, kv_heads, args.head_dim, length, length + 1)  # compacts for the next token's block
            held, full = cache.nbytes(), cache.full_nbytes()
            rows.append({"heads": heads, "kv_heads": kv_heads, "length": length + 1, "held_mb": held / 2**20,
                         "full_mb": full / 2**20, "reduction": full / held})
    return rows


def _fill(cache: S2KVCache, kv_heads: int, head_dim: int, start: int, end: int) -> None:
    keys = torch.zeros(1, kv_heads, end - start, head_dim)
    cache.update_with_positions(keys, keys, torch.arange(start, end)[None])


def run(args: argparse.Namespace) -> int:
    cpu = torch.device("cpu")
    info = machine_info(cpu)
    layout = S2Layout(block=args.block, local_blocks=args.local_blocks, vert_stride=args.vert_stride)
    print(f"S2-Attention on {info}: {args.heads} heads of {args.head_dim}, fp32, batch 1, {layout.block}-position "
          f"blocks, {layout.local_blocks} local, stride {layout.vert_stride}; dilated segments {args.segments} "
          f"rates {args.rates}")
    torch.manual_seed(0)
    forward = _forward_table(args, layout, cpu)
    slope = log_log_slope([r["pairs_visited"] for r in forward], [r["s2_s"] for r in forward])
    print_table("(a) one forward call: median seconds",
                ["length", "S2 s", "dense s", "dilated s", "S2 speed-up over dense", "pairs kept"],
                [[r["length"], r["s2_s"], r["dense_s"], r["dilated_s"], r["speedup"], r["kept"]] for r in forward])
    print(f"log-log slope of S2's time against the pairs it visits: {slope if slope is None else round(slope, 2)}")
    train = _train_table(args, layout, cpu)
    print_table("(b) forward+backward: median seconds, peak tensor MB",
                ["length", "S2 s", "dense s", "S2 speed-up", "S2 peak MB", "dense peak MB"],
                [[r["length"], r["s2_s"], r["dense_s"], r["speedup"], r["s2_peak_mb"], r["dense_peak_mb"]]
                 for r in train])
    cache = _cache_table(args, layout)
    print_table("(c) decoding cache of one layer (fp32 keys and values, positions included) after the context",
                ["heads", "kv heads", "tokens", "S2 MB", "full MB", "full / S2"],
                [[r["heads"], r["kv_heads"], r["length"], r["held_mb"], r["full_mb"], r["reduction"]] for r in cache])
    if args.json:
        write_json(args.json, {"benchmark": "s2", "machine": info, "settings": {
            k: v for k, v in vars(args).items() if k not in ("json", "run", "command", "bench")},
            "forward": forward, "slope_against_pairs": slope, "train": train, "cache": cache})
    return 0
