"""``scaleformer bench delta``: the delta rule's forms against each other and against softmax attention.

One call of the op, forward + backward, on (1, H, T, K) inputs (``--heads`` heads of ``--head-dim``), by
length T: the chunkwise form (Gated DeltaNet's, with decays; DeltaNet's costs the same), the recurrent form
(one step at a time; up to ``--recurrent-max`` tokens, past which its Python loop is the whole story), and
SDPA's causal attention on the same q, k, v. Every call is timed in interleaved rounds (the median of the
rounds, their interquartile range), with the log-log slope of time against T and its 95% bootstrap
interval (1 = linear: the chunkwise form's goal is at most 1.1), and the peak memory of tensors allocated
during the call.

``--backends`` adds the chunkwise form on other backends: ``triton`` (our kernels, forward and backward;
CUDA, or the CPU under ``TRITON_INTERPRET=1``) and ``fla``
(flash-linear-attention's ``chunk_gated_delta_rule``, when installed; CUDA only). ``--device cuda`` and
``--dtype bfloat16`` are for a GPU (see benchmarks/gpu/issue34-delta.sh).
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

import torch
import torch.nn.functional as F

from scaleformer.bench.common import (machine_info, peak_memory, print_table, slope_interval, time_interleaved,
                                      write_json)
from scaleformer.ops.delta_rule import delta_rule

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--recurrent-max", type=int, default=2048, help="longest T the recurrent form is timed at")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (each call takes its turn per round)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--backends", nargs="+", choices=["torch", "triton", "fla"], default=["torch"],
                        help="backends of the chunkwise form (torch is the reference)")
    parser.add_argument("--json", help="write the figures to this JSON file")


def _calls(length: int, args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shape = (args.batch, args.heads, length, args.head_dim)
    q, k, v = (torch.randn(*shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    beta = torch.rand(args.batch, args.heads, length, device=device, requires_grad=True)
    log_decay = (-torch.rand(args.batch, args.heads, length, device=device)).requires_grad_()

    def delta(form: str, backend: str = "torch") -> Callable[[], None]:
        def call() -> None:
            unit = F.normalize(k, dim=-1)  # the layers feed unit keys
            out, _ = delta_rule(q, unit, v, beta, log_decay=log_decay, form=form, chunk_size=args.chunk_size,
                                backend=backend)
            out.sum().backward()
        return call

    def attention() -> None:
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    calls = {"chunkwise": delta("chunkwise"), "sdpa causal": attention}
    if "triton" in args.backends:
        calls["chunkwise triton"] = delta("chunkwise", "triton")
    if "fla" in args.backends:
        calls["chunkwise fla"] = _fla_call(q, k, v, beta, log_decay)
    if length <= args.recurrent_max:
        calls["recurrent"] = delta("recurrent")
    return calls


def _fla_call(q, k, v, beta, log_decay) -> Callable[[], None]:
    """flash-linear-attention's chunked Gated DeltaNet on the same inputs (its layout: (B, T, H, ·))."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # an optional install, on a GPU

    def call() -> None:
        unit = F.normalize(k, dim=-1)
        out, _ = chunk_gated_delta_rule(*(x.transpose(1, 2) for x in (q, unit, v)), log_decay.transpose(1, 2),
                                        beta.transpose(1, 2).to(q.dtype))
        out.sum().backward()
    return call


def run(args: argparse.Namespace) -> int:
    cpu = torch.device(args.device)
    info = machine_info(cpu)
    print(f"Delta rule on {info}: {args.heads} heads of {args.head_dim}, chunk {args.chunk_size}, {args.dtype}, "
          f"batch {args.batch}, forward + backward, {args.rounds} interleaved rounds")
    rows: list[dict[str, Any]] = []
    timings: dict[str, list[tuple[int, Any]]] = {}
    for length in args.lengths:
        calls = _calls(length, args)
        measured = time_interleaved(calls, rounds=args.rounds, device=cpu)
        row: dict[str, Any] = {"length": length}
        for name, call in calls.items():
            row[f"{name}_s"], row[f"{name}_iqr_s"] = measured[name].median, [measured[name].low, measured[name].high]
            row[f"{name}_peak_mb"] = peak_memory(call, device=cpu) / 2**20
            timings.setdefault(name, []).append((length, measured[name]))
        rows.append(row)
        print(f"  T={length}: " + ", ".join(f"{name} {measured[name]}" for name in calls), flush=True)
    slopes = {}
    for name, points in timings.items():
        interval = slope_interval([n for n, _ in points], [t for _, t in points])
        slopes[name] = None if interval is None else {"slope": interval[0], "low": interval[1], "high": interval[2]}
    names = list(timings)
    columns = ["T"] + [f"{n} ms" for n in names] + [f"{n} MB" for n in names]
    print_table("forward + backward of one call (median of rounds) and peak tensor memory", columns,
                [[r["length"], *(1000 * r[f"{n}_s"] if f"{n}_s" in r else None for n in names),
                  *(r.get(f"{n}_peak_mb") for n in names)] for r in rows])
    for name, slope in slopes.items():
        if slope is not None:
            print(f"  {name}: log-log slope of time vs T {slope['slope']:.2f} (95% CI {slope['low']:.2f}–{slope['high']:.2f})")
    if args.json:
        write_json(args.json, {"machine": info, "settings": {k: v for k, v in vars(args).items() if k != "run"},
                               "rows": rows, "slopes": slopes})
    return 0
