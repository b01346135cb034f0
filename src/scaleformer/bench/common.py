"""Measuring helpers shared by the benchmarks: timing (warm-up + median), peak memory, tables, JSON.

Timings are medians of repeats after warm-up, taken in one process so variants can be compared as
ratios (these machines are shared and noisy). Peak memory is the peak of live tensor bytes during the
call: on CUDA from the allocator's statistics, on CPU from the profiler's allocation events (PyTorch keeps
no CPU allocator statistics), so it counts tensors, not the process's resident size.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["time_call", "peak_memory", "print_table", "write_json", "machine_info", "log_log_slope"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], *, device: torch.device, warmup: int = 1, repeats: int = 5,
              min_time: float = 0.0) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs (at least ``min_time`` seconds in all) after warm-up."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_time:
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory(fn: Callable[[], Any], *, device: torch.device) -> int:
    """Peak bytes of tensors allocated during ``fn()`` beyond those alive before it."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]  # type: ignore[union-attr]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "threads": torch.get_num_threads(), "device": str(device),
            "matmul_gflops": round(matmul_rate(device) / 1e9, 1)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def matmul_rate(device: torch.device, size: int = 1024, dtype: torch.dtype = torch.float32) -> float:
    """Measured FLOP/s of a (size × size) @ (size × size) matmul in ``dtype`` (fp32 by default): the
    machine's speed on the day, so results from machines that differ ~2× can be read side by side."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    seconds = time_call(lambda: a @ b, device=device, warmup=2, repeats=7)
    return 2 * size**3 / seconds


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {path}")


def log_log_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y against log x (1 = linear growth, 2 = quadratic)."""
    pairs = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y]
    if len(pairs) < 2:
        return None
    mx = sum(p[0] for p in pairs) / len(pairs)
    my = sum(p[1] for p in pairs) / len(pairs)
    return sum((x - mx) * (y - my) for x, y in pairs) / sum((x - mx) ** 2 for x, _ in pairs)


def attention_step(op: Callable[[Tensor, Tensor, Tensor], Tensor], *, heads: int, length: int, head_dim: int,
                   dtype: torch.dtype, device: torch.device) -> Callable[[], None]:
    """One forward+backward of ``op(q, k, v)`` on fixed random (1, heads, length, head_dim) inputs (seed 0),
    gradients cleared after each call: what the attention benchmarks time."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    grad = torch.randn(1, heads, length, head_dim, device=device, dtype=dtype)

    def step() -> None:
        op(q, k, v).backward(grad)
        q.grad = k.grad = v.grad = None

    return step
