"""``scaleformer bench train``: training throughput and model FLOPs utilisation of presets, against the
matmul rate measured in the same run.

Each preset trains on random tokens with the trainer's step — forward, cross-entropy, backward, gradient
clipping to 1.0, AdamW (betas 0.9, 0.95; weight decay on matrices) — at ``--batch-size`` × ``--seq-len``
tokens, in the preset's own mode (dropout on where it has dropout), in float32 or (``--precision
bfloat16``) under bf16 autocast as the trainer runs it; ``--set field=value`` changes preset fields (for
example ``retention_backend=triton``). Reported: the median step time after ``--warmup`` steps, tokens/s,
the FLOPs of one step and the share of the machine's matmul rate (in the same precision) they reach.

The FLOPs are counted, not estimated: :class:`torch.utils.flop_counter.FlopCounterMode` records every
matrix product of one real step (forward and backward; attention's and retention's products included —
SDPA's CPU kernel with the counter's own formula for its GPU kernels —, element-wise work and the
optimizer not), so "model FLOPs utilisation" is counted FLOPs per second over
the rate of one large (``--matmul-size``²) matrix product in the step's precision, timed beside it in the
same process (on a GPU, use a size that reaches the chip's peak, e.g. 8192).
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from scaleformer.runtime import reusing_freed_memory
from scaleformer.bench.common import machine_info, matmul_rate, print_table, time_call, write_json
from scaleformer.build import build
from scaleformer.presets import preset_with_options
from scaleformer.train.trainer import parse_model_options

__all__ = ["add_arguments", "run", "training_step"]


def _count_cpu_attention() -> None:
    """The counter knows the GPU attention kernels but not the CPU flash kernel SDPA uses here; give it the
    same formulas (full score matrices, as for the GPU kernels: a causal mask is not halved)."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    forward, backward = (aten._scaled_dot_product_flash_attention_for_cpu,
                         aten._scaled_dot_product_flash_attention_for_cpu_backward)
    if forward in flop_counter.flop_registry or forward.default in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(forward)
    def _forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    @flop_counter.register_flop_formula(backward)
    def _backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", nargs="+", default=["retnet-mini", "gpt-tiny"],
                        help="presets to train (retnet-mini is `scaleformer train`'s default model)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    parser.add_argument("--matmul-size", type=int, default=1024)
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"],
                        help="bfloat16: autocast, weights and optimizer float32 (the trainer's --precision)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="override preset fields, e.g. retention_backend=triton max_seq_len=16384")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the figures to this JSON file")


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor,
                  precision: str = "float32"):
    """One step of the trainer's arithmetic on (B, T + 1) ids: next-token loss, backward, clip, AdamW."""
    def step() -> None:
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run(args: argparse.Namespace) -> int:
    with reusing_freed_memory() if torch.device(args.device).type == "cpu" else contextlib.nullcontext():
        return _run(args)  # the allocator as the trainer's loop has it


def _run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    for name in ("batch_size", "seq_len", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    _count_cpu_attention()
    info = machine_info(device)
    tokens = args.batch_size * args.seq_len
    print(f"Training throughput on {info}: {args.batch_size} × {args.seq_len} tokens per step, {args.precision}")
    overrides = parse_model_options(tuple(args.set))
    rows: list[dict[str, Any]] = []
    for preset in args.presets:
        torch.manual_seed(0)
        model = build(preset_with_options(preset, overrides)).to(device).train()
        matrices = [p for p in model.parameters() if p.dim() >= 2]
        vectors = [p for p in model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1},
                                       {"params": vectors, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.95))
        ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
        step = training_step(model, optimizer, ids, args.precision)
        for _ in range(args.warmup):
            step()
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
        seconds = time_call(step, device=device, warmup=0, repeats=args.steps)
        # the matmul rate right beside this preset's steps: the machine's speed at that moment
        rate = matmul_rate(device, args.matmul_size, getattr(torch, args.precision))
        row = {"preset": preset, "parameters": sum(p.numel() for p in model.parameters()), "step_s": seconds,
               "tokens_per_s": tokens / seconds, "gflop_per_step": flops / 1e9, "achieved_gflops": flops / seconds / 1e9,
               "matmul_gflops": rate / 1e9, "mfu": flops / seconds / rate}
        rows.append(row)
        print(f"  {preset}: {row['step_s'] * 1e3:.0f} ms/step, {row['tokens_per_s']:,.0f} tokens/s, "
              f"MFU {row['mfu']:.1%}", flush=True)
        del model, optimizer
    print_table("one training step (forward, backward, clip, AdamW): median over the timed steps",
                ["preset", "parameters", "ms/step", "tokens/s", "GFLOP/step", "GFLOP/s", "matmul GFLOP/s", "MFU"],
                [[r["preset"], r["parameters"], r["step_s"] * 1e3, r["tokens_per_s"], r["gflop_per_step"],
                  r["achieved_gflops"], r["matmul_gflops"], f"{r['mfu']:.1%}"] for r in rows])
    if args.json:
        write_json(args.json, {"benchmark": "train", "machine": info, "settings": {
            k: v for k, v in vars(args).items() if k not in ("json", "run", "command", "bench")}, "rows": rows})
    return 0

