"""``scaleformer bench moe``: index-based dispatch vs the one-hot einsum formulation.

One MoE layer (X-MoE router, top-1, capacity factor 1.0, SwiGLU experts), forward + backward on N tokens,
at several expert counts. Both variants share the router, the routing decision and the experts; they
differ only in how tokens reach the experts and come back: ours writes kept tokens into an (E, S, C)
buffer by (expert, slot) index and reads them back by index; the reference builds (N, E, S) one-hot
dispatch and combine tensors and contracts them with einsums (TorchScale/GShard style).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch

from scaleformer.bench.common import machine_info, peak_memory, print_table, time_call, write_json
from scaleformer.config import MoEConfig
from scaleformer.layers.moe import MoEFeedForward
from scaleformer.ops.moe import combine, dispatch, dispatch_one_hot_reference

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--embed-dim", type=int, default=256)
    parser.add_argument("--ffn-dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the figures to this JSON file")


def _step(layer: MoEFeedForward, x: torch.Tensor, grad: torch.Tensor, one_hot: bool):
    experts = layer.cfg.experts

    def step() -> None:
        routing, balance = layer.routing(x)
        if one_hot:
            mask, weights = dispatch_one_hot_reference(x, routing, experts)
            buffer = torch.einsum("nes,nc->esc", mask, x)
            out = torch.einsum("nes,esc->nc", weights, layer.experts(buffer))
        else:
            out = combine(layer.experts(dispatch(x, routing, experts)), routing, x.shape[0])
        torch.autograd.backward([out, balance], [grad, torch.ones_like(balance)])
        x.grad = None
        layer.zero_grad(set_to_none=True)

    return step



def measure(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for experts in args.experts:
        torch.manual_seed(0)
        cfg = MoEConfig(experts=experts, top_k=1, capacity_factor=1.0, router="xmoe")
        layer = MoEFeedForward(cfg, args.embed_dim, args.ffn_dim, kind="glu", activation="swish", bias=False)
        layer = layer.to(device).train()
        x = torch.randn(args.tokens, args.embed_dim, device=device, requires_grad=True)
        grad = torch.randn(args.tokens, args.embed_dim, device=device)
        steps = {"index": _step(layer, x, grad, False), "one_hot": _step(layer, x, grad, True)}
        row: dict[str, Any] = {"experts": experts, "tokens": args.tokens}
        for name, step in steps.items():
            row[f"{name}_peak_mb"] = peak_memory(step, device=device) / 2**20  # also the warm-up
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.repeats):  # round-robin, medians
            for name, step in steps.items():
                times[name].append(time_call(step, device=device, warmup=0, repeats=1))
        for name in steps:
            row[f"{name}_s"] = statistics.median(times[name])
            row[f"{name}_tokens_per_s"] = args.tokens / row[f"{name}_s"]
        row["speedup"] = row["one_hot_s"] / row["index_s"]
        row["memory_ratio"] = row["one_hot_peak_mb"] / row["index_peak_mb"]
        rows.append(row)
        print(f"  E={experts}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)), flush=True)
    return rows


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    info = machine_info(device)
    print(f"MoE dispatch benchmark on {info}; {args.tokens} tokens, width {args.embed_dim}, expert FFN "
          f"{args.ffn_dim} (SwiGLU), top-1, capacity factor 1.0, X-MoE router, fp32, forward + backward")
    rows = measure(args, device)
    print_table("index dispatch vs one-hot einsums: tokens/s (median), peak tensor MB",
                ["experts", "index tok/s", "one-hot tok/s", "speed-up", "index MB", "one-hot MB", "memory ratio"],
                [[r["experts"], r["index_tokens_per_s"], r["one_hot_tokens_per_s"], r["speedup"], r["index_peak_mb"],
                  r["one_hot_peak_mb"], r["memory_ratio"]] for r in rows])
    if args.json:
        write_json(args.json, {"benchmark": "moe", "machine": info, "settings": {
            k: v for k, v in vars(args).items() if k not in ("json", "run", "command", "bench")}, "results": rows})
    return 0
