"""``scaleformer bench layout``: how fast this machine multiplies a weight matrix by a few rows, with the
matrix stored as ``nn.Linear`` keeps it (row-major (out, in)) and transposed in memory (column-major), by
shape and number of rows. It is the measurement behind :func:`scaleformer.runtime.decoding_layout`'s rule
(wide weights, out ≥ in, column-major while decoding one or two rows), so it can be checked on any
machine and BLAS.

Each cell cycles through enough matrices of the shape (``--megabytes`` of them in each layout) that they
do not stay in the CPU's caches, as a decoding step's weights do not: each product reads its matrix from
memory. The two layouts alternate, repeat by repeat; medians; fp32, on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from scaleformer.bench.common import machine_info, print_table, write_json

__all__ = ["add_arguments", "run"]

SHAPES = ["512x512", "864x512", "512x864", "1024x256", "256x1024", "2048x512", "512x2048", "4096x512",
          "3072x768", "768x3072", "16384x512"]


def _shape(text: str) -> tuple[int, int]:
    try:
        out, inp = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is OUTxIN (e.g. 864x512), got {text!r}") from None
    if out < 1 or inp < 1:
        raise argparse.ArgumentTypeError(f"a shape's sizes must be >= 1, got {text!r}")
    return out, inp


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", type=_shape, nargs="+", default=[_shape(s) for s in SHAPES],
                        help="weight shapes OUTxIN (nn.Linear's (out_features, in_features))")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 16, 512],
                        help="rows multiplied at once (1: decoding one sequence)")
    parser.add_argument("--megabytes", type=float, default=64.0,
                        help="matrices cycled through per layout: more than the CPU's last cache")
    parser.add_argument("--repeats", type=int, default=9, help="passes over the matrices per layout (median)")
    parser.add_argument("--json", help="write the figures to this JSON file")


def _cell(shape: tuple[int, int], rows: int, args: argparse.Namespace) -> dict[str, Any]:
    out, inp = shape
    count = max(2, int(args.megabytes * 2**20 / (out * inp * 4)))
    generator = torch.Generator().manual_seed(0)
    row_major = [torch.randn(out, inp, generator=generator) for _ in range(count)]
    column_major = [w.t().contiguous().t() for w in row_major]  # what decoding_layout stores
    x = torch.randn(rows, inp, generator=generator)
    samples: dict[str, list[float]] = {"row": [], "column": []}
    for layout, weights in (("row", row_major), ("column", column_major)):  # warm-up: one pass of each
        for w in weights:
            F.linear(x, w)
    for _ in range(args.repeats):
        for layout, weights in (("row", row_major), ("column", column_major)):
            start = time.perf_counter()
            for w in weights:
                F.linear(x, w)
            samples[layout].append((time.perf_counter() - start) / count)
    row_s, column_s = statistics.median(samples["row"]), statistics.median(samples["column"])
    return {"out": out, "in": inp, "rows": rows, "row_major_us": 1e6 * row_s, "column_major_us": 1e6 * column_s,
            "row_over_column": row_s / column_s, "row_major_gb_per_s": out * inp * 4 / row_s / 1e9,
            "laid_out_by_decoding_layout": out >= inp}


def run(args: argparse.Namespace) -> int:
    if min(args.rows) < 1 or args.repeats < 1 or args.megabytes <= 0:
        raise ValueError("--rows and --repeats must be >= 1 and --megabytes > 0")
    info = machine_info(torch.device("cpu"))
    print(f"one weight times a few rows, row-major (nn.Linear) vs column-major, on {info}")
    cells = []
    for shape in args.shapes:
        for rows in args.rows:
            cells.append(_cell(shape, rows, args))
            c = cells[-1]
            print(f"  {c['out']}x{c['in']} rows={rows}: row-major {c['row_major_us']:.1f} us, "
                  f"column-major {c['column_major_us']:.1f} us", flush=True)
    print_table("median µs per product (ratio > 1: column-major faster; 'laid out': decoding_layout's rule)",
                ["out x in", "rows", "row-major us", "column-major us", "row/column", "row-major GB/s", "laid out"],
                [[f"{c['out']}x{c['in']}", c["rows"], c["row_major_us"], c["column_major_us"], c["row_over_column"],
                  c["row_major_gb_per_s"], "yes" if c["laid_out_by_decoding_layout"] else "no"] for c in cells])
    if args.json:
        write_json(args.json, {"benchmark": "layout", "machine": info, "settings": {
            "shapes": [list(s) for s in args.shapes], "rows": args.rows, "megabytes": args.megabytes,
            "repeats": args.repeats}, "cells": cells})
    return 0
