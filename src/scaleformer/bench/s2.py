"""``scaleformer bench s2``: S2-Attention's kept-blocks path against fused dense causal attention, by length.

One attention call (forward, no gradient) of ``--heads`` heads of ``--head-dim`` at each length, in one
process: the S2 fast path (:func:`scaleformer.ops.s2.s2_attention`) with the chosen layout (Phi-3-small's by
default: block 64, 16 local blocks, vertical stride 8, heterogeneous heads) and SDPA's causal attention.
Reported: median seconds, the speed-up over dense, the fraction of (query, key) pairs the layout keeps, and
the log-log slope of S2's time against length (time in proportion to the blocks visited would follow the
kept fraction).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from scaleformer.bench.common import log_log_slope, machine_info, print_table, write_json
from scaleformer.ops.s2 import S2Layout, s2_attention

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--local-blocks", type=int, default=16)
    parser.add_argument("--vert-stride", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per cell (median), after one warm-up")
    parser.add_argument("--json", help="write the figures to this JSON file")


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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


def run(args: argparse.Namespace) -> int:
    info = machine_info(torch.device("cpu"))
    layout = S2Layout(block=args.block, local_blocks=args.local_blocks, vert_stride=args.vert_stride)
    print(f"S2-Attention vs dense causal attention on {info}: {args.heads} heads of {args.head_dim}, fp32, batch 1, "
          f"{layout.block}-position blocks, {layout.local_blocks} local, stride {layout.vert_stride}")
    rows: list[dict[str, Any]] = []
    torch.manual_seed(0)
    with torch.no_grad():
        for length in args.lengths:
            q, k, v = (torch.randn(1, args.heads, length, args.head_dim) for _ in range(3))
            s2 = _median_seconds(lambda: s2_attention(q, k, v, layout), args.repeats)
            dense = _median_seconds(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), args.repeats)
            rows.append({"length": length, "s2_s": s2, "dense_s": dense, "speedup": dense / s2,
                         "kept": kept_fraction(layout, args.heads, length)})
    slope = log_log_slope([r["length"] for r in rows], [r["s2_s"] for r in rows])
    print_table("one forward call: median seconds", ["length", "S2 s", "dense s", "S2 speed-up", "pairs kept"],
                [[r["length"], r["s2_s"], r["dense_s"], r["speedup"], r["kept"]] for r in rows])
    print(f"log-log slope of S2's time against length: {slope if slope is None else round(slope, 2)}")
    if args.json:
        write_json(args.json, {"benchmark": "s2", "machine": info, "settings": {
            k: v for k, v in vars(args).items() if k not in ("json", "run", "command", "bench")},
            "rows": rows, "slope": slope})
    return 0
