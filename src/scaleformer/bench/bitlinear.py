"""``scaleformer bench bitlinear``: BitNet b1.58 linears at inference against fp32 and bf16 linears.

For each (in, out) shape and token count: the weight memory and the median forward time (no gradient) of
an ``nn.Linear`` in fp32 and in bf16, a BitLinear (latent fp32 weights, quantised on every call: the
training forward) and a PackedBitLinear (2-bit codes, unpacked on every call). The packed layer's
point is memory; on a CPU without a ternary kernel it pays for unpacking, which the table shows.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from scaleformer.bench.common import machine_info, print_table, time_call, write_json
from scaleformer.bitnet import PackedBitLinear
from scaleformer.layers.bitlinear import BitLinear

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", nargs="+", default=["1024x4096", "4096x1024"],
                        help="IN x OUT of each linear (e.g. 1024x4096)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 256], help="tokens per call (1 = decoding)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per cell (median)")
    parser.add_argument("--json", help="write the figures to this JSON file")


def _layers(fan_in: int, fan_out: int) -> dict[str, tuple[nn.Module, torch.dtype]]:
    torch.manual_seed(0)
    base = nn.Linear(fan_in, fan_out, bias=False)
    bit = BitLinear(fan_in, fan_out, bias=False)
    bit.weight = base.weight
    bf16 = nn.Linear(fan_in, fan_out, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        bf16.weight.copy_(base.weight)
    return {"fp32 linear": (base, torch.float32), "bf16 linear": (bf16, torch.bfloat16),
            "BitLinear (latent fp32)": (bit, torch.float32), "packed BitLinear": (PackedBitLinear.of(bit), torch.float32)}


def _weight_bytes(layer: nn.Module) -> int:
    if isinstance(layer, PackedBitLinear):
        return layer.packed.numel() + layer.scale.numel() * layer.scale.element_size()
    return layer.weight.numel() * layer.weight.element_size()


def run(args: argparse.Namespace) -> int:
    device = torch.device("cpu")
    info = machine_info(device)
    print(f"BitLinear benchmark on {info}")
    rows: list[dict[str, Any]] = []
    for shape in args.shapes:
        try:
            fan_in, fan_out = (int(v) for v in shape.lower().split("x"))
        except ValueError:
            raise ValueError(f"--shapes takes IN x OUT like 1024x4096, got {shape!r}") from None
        layers = _layers(fan_in, fan_out)
        for tokens in args.tokens:
            x = torch.randn(tokens, fan_in)
            base_time = None
            for name, (layer, dtype) in layers.items():
                inputs = x.to(dtype)
                with torch.no_grad():
                    seconds = time_call(lambda: layer(inputs), device=device, warmup=2, repeats=args.repeats)
                base_time = base_time or seconds
                rows.append({"shape": shape, "tokens": tokens, "layer": name, "weight_mb": _weight_bytes(layer) / 2**20,
                             "ms": seconds * 1e3, "vs_fp32": seconds / base_time})
    print_table("forward, no gradient: median ms; weight memory MB",
                ["shape", "tokens", "layer", "weight MB", "ms", "time vs fp32"],
                [[r["shape"], r["tokens"], r["layer"], r["weight_mb"], r["ms"], r["vs_fp32"]] for r in rows])
    if args.json:
        write_json(args.json, {"benchmark": "bitlinear", "machine": info, "settings": {
            k: v for k, v in vars(args).items() if k not in ("json", "run", "command", "bench")}, "rows": rows})
    return 0
