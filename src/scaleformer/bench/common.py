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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["time_call", "Timing", "time_interleaved", "ratio_interval", "slope_interval", "peak_memory",
           "print_table", "write_json", "machine_info", "log_log_slope"]


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


@dataclass(frozen=True)
class Timing:
    """One call's seconds, measured in ``rounds``: each round's median of a few repeats. A verdict reads
    the median of the rounds and their spread (the interquartile range), never one measurement: on a
    shared machine a single timing can be off by more than the effect it is meant to show."""

    rounds: tuple[float, ...]

    @property
    def median(self) -> float:
        return float(np.median(self.rounds))

    @property
    def low(self) -> float:
        return float(np.percentile(self.rounds, 25))

    @property
    def high(self) -> float:
        return float(np.percentile(self.rounds, 75))

    def __str__(self) -> str:
        return f"{1000 * self.median:.3g} ms (IQR {1000 * self.low:.3g}–{1000 * self.high:.3g}, {len(self.rounds)} rounds)"

    def as_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "q25_s": self.low, "q75_s": self.high, "rounds_s": list(self.rounds)}


MIN_ROUNDS = 5  # fewer rounds leave the quartiles meaningless


def time_interleaved(calls: dict[Any, Callable[[], Any]], *, rounds: int = MIN_ROUNDS, repeats: int = 1,
                     device: torch.device | str = "cpu", after_each: Callable[[Any], None] | None = None) -> dict[Any, Timing]:
    """Each of ``calls`` timed in ``rounds``, the median of ``repeats`` calls a round, the calls taking
    turns round by round: a slow spell of a shared machine then lands on every call being compared, not on
    one of them, and shows up as spread instead of as an effect. One untimed warm-up call each first.
    ``after_each(key)`` (e.g. a progress bar's step) runs after every round of every call."""
    if rounds < MIN_ROUNDS or repeats < 1:
        raise ValueError(f"timing needs at least {MIN_ROUNDS} rounds of at least 1 call, got {rounds} × {repeats}")
    device = torch.device(device)
    for call in calls.values():
        call()
    _sync(device)
    medians: dict[Any, list[float]] = {key: [] for key in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            seconds = []
            for _ in range(repeats):
                start = time.perf_counter()
                call()
                _sync(device)
                seconds.append(time.perf_counter() - start)
            medians[key].append(statistics.median(seconds))
            if after_each is not None:
                after_each(key)
    return {key: Timing(tuple(values)) for key, values in medians.items()}


def ratio_interval(numerator: Timing, denominator: Timing) -> tuple[float, float, float]:
    """``numerator / denominator``: the ratio of medians, and the widest ratio the two interquartile ranges
    allow (low / high, high / low). Two ratios whose intervals do not overlap differ beyond the noise."""
    return (numerator.median / denominator.median, numerator.low / denominator.high,
            numerator.high / denominator.low)


def slope_interval(xs: list[float], timings: list[Timing], *, draws: int = 2000,
                   seed: int = 0) -> tuple[float, float, float] | None:
    """The log-log slope of the timings' medians against ``xs``, and its 95% bootstrap interval: each draw
    resamples every point's rounds with replacement and refits the slope on their medians."""
    slope = log_log_slope(xs, [t.median for t in timings])
    if slope is None:
        return None
    rng = np.random.default_rng(seed)
    samples = [np.asarray(t.rounds) for t in timings]
    resampled = np.stack([np.median(rng.choice(s, size=(draws, len(s))), axis=1) for s in samples], axis=1)
    logs = np.log(np.asarray(xs, dtype=float))
    centred = logs - logs.mean()
    fitted = (np.log(resampled) - np.log(resampled).mean(axis=1, keepdims=True)) @ centred / (centred @ centred)
    low, high = np.percentile(fitted, [2.5, 97.5])
    return slope, float(low), float(high)


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
