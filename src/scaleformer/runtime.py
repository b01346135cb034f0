"""Settings for speed on a CPU: the allocator's, made around the trainer's loop (and ``scaleformer bench
train``), and whether the hardware multiplies bfloat16 natively (the trainer's ``precision="auto"``).

Why the allocator matters on CPU: glibc serves every allocation above its mmap threshold (adaptive, at most
32 MiB) with a fresh ``mmap`` and returns it to the kernel on ``free``, so the next step's tensor of the same
size page-faults in again, page by page. A language model's logits are such a tensor: 16 × 128 tokens ×
4096 words in float32 is 32 MiB, allocated several times per training step (logits, log-softmax, its
gradient). Measured on the default run's model (``retnet-mini``, 2 cores): the cross-entropy's forward and
backward took 52 ms per step with fresh pages and 18 ms with reused ones; the whole training step went from
270 to 215 ms. Raising the threshold (and the heap's trim threshold with it) keeps freed blocks in the heap
for the next allocation: the price is that the process holds on to its peak heap while the setting lasts,
which is why it covers only the loop, not the corpus passes before it or the report after it (both run
under a memory limit in tests/train/test_token_ids.py and test_text_tokens.py).

Why a decoding layout: decoding one token multiplies each weight matrix by a single vector, and how fast
the BLAS does that depends on which dimension of the matrix is contiguous. With torch 2.13's MKL on the
project's CPU (2 cores; ``scaleformer bench layout``, benchmarks/RESULTS.md), a one-row product with a
weight of shape (out, in) ran 1.4-2.5× faster with the matrix stored column-major when out > in
((864, 512): 202 → 140 µs; (4096, 512): 927 → 485 µs), 1.1× for a square one, and 0.67-0.83× when
out < in; two rows alike; from 4 to 16 rows the column-major wide matrices were mostly 0.8-0.93×, and at
512 rows the two orders were equal. So :func:`decoding_layout` stores the weights of linear layers that
are at least as wide as they are deep column-major — the same values and shape, only the memory order —
for as long as the block lasts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import re
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

__all__ = ["reusing_freed_memory", "native_bfloat16", "decoding_layout", "check_device", "thread_advice"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (malloc.h)
_THRESHOLD = 1 << 30  # 1 GiB: above any per-step tensor of the models this library trains on a CPU
_GLIBC_DEFAULT = 128 * 1024  # both thresholds' initial values in glibc


def _libc():
    """glibc's mallopt and malloc_trim, or None (another platform or C library, or opted out)."""
    if not sys.platform.startswith("linux") or os.environ.get("SCALEFORMER_MALLOC", "") == "system":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return mallopt, trim


@contextmanager
def reusing_freed_memory() -> Iterator[bool]:
    """Within the block, glibc's malloc keeps freed blocks up to 1 GiB for reuse instead of unmapping them;
    on leaving it, the thresholds go back to glibc's initial 128 KiB and the heap's free memory is returned
    to the system. Yields whether the setting took effect: not off Linux/glibc, nor with
    ``SCALEFORMER_MALLOC=system`` in the environment."""
    functions = _libc()
    # the trim threshold first: without it the heap's top would be returned after every step
    applied = functions is not None and all(functions[0](option, _THRESHOLD)
                                            for option in (_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD))
    try:
        yield applied
    finally:
        if functions is not None:
            mallopt, trim = functions
            mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT)
            mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT)
            trim(0)


def _cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (x86 "flags", Arm "Features"); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware, so bf16 autocast is a speed-up: CUDA
    GPUs with bf16 tensor cores (compute capability 8.0 on), x86 CPUs with AVX512-BF16 or AMX-BF16, Arm
    CPUs with BF16. Decided from the hardware's flags, not by timing, so a run's arithmetic does not depend
    on how busy the machine was. Without native support bf16 products are converted to float32 and
    back, slower than float32 itself."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    flags = _cpu_flags()
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool(flags & {"avx512_bf16", "amx_bf16"})


@contextmanager
def decoding_layout(model: nn.Module) -> Iterator[int]:
    """Within the block, the weight of every ``nn.Linear`` of ``model`` with out_features ≥ in_features, and
    the token embedding a tied output head multiplies by (vocabulary ≥ width), are stored column-major (a
    transposed copy, viewed back to their shape): the fast order for multiplying them by one or two rows
    at a time, i.e. decoding a batch of one or two (see the module's docstring). A column-major embedding
    still looks tokens up, a little slower per prompt token (2.4 against 0.18 ms for 512 tokens of a
    64000 × 512 table), while the tied head's product per decoded token got 2.4× faster (15.6 → 6.4 ms).
    On leaving, each goes back to the contiguous tensor it was, exactly. Yields how many weights were
    laid out.

    Layers that read one input several times (a module's ``shared_input_linears()``: a retention layer's
    query, key, value and gate projections, a GLU's two) are laid out together, side by side in one
    column-major block, so a decoding step multiplies its row by them in one product
    (:mod:`scaleformer.layers.shared_input`); their biases, if any, are likewise views of one vector.

    The values do not change, only their order in memory, so outputs agree with the standard layout to
    float rounding (the product sums in another order), not bit for bit. For inference: gradients and
    optimizer states are not laid out alike. A weight shared between modules is laid out once; weights
    that are not contiguous to begin with are left as they are.
    """
    from scaleformer.layers.shared_input import BLOCK_ATTRIBUTE, lay_out_block
    from scaleformer.models.base import LanguageModel

    laid_out: dict[int, nn.Parameter] = {}
    blocks: list[list[nn.Linear]] = []  # the layers laid out in one block each (the first holds it)
    with torch.no_grad():
        for module in model.modules():
            for group in getattr(module, "shared_input_linears", list)():
                if any(id(linear.weight) in laid_out for linear in group):
                    continue
                block = lay_out_block(group)
                if block is not None:
                    setattr(group[0], BLOCK_ATTRIBUTE, block)
                    blocks.append(group)
                    laid_out.update((id(linear.weight), linear.weight) for linear in group)
        for module in model.modules():
            if isinstance(module, nn.Linear):
                weight = module.weight
            elif isinstance(module, LanguageModel):  # a tied head multiplies by the token embedding
                weight = module.head_weight
            else:
                continue
            if (not isinstance(weight, torch.Tensor) or id(weight) in laid_out or weight.dim() != 2
                    or not weight.is_contiguous() or weight.shape[0] < weight.shape[1]):
                continue
            weight.data = weight.data.t().contiguous().t()
            laid_out[id(weight)] = weight
    try:
        yield len(laid_out)
    finally:
        with torch.no_grad():
            for weight in laid_out.values():
                weight.data = weight.data.contiguous()
            for group in blocks:
                delattr(group[0], BLOCK_ATTRIBUTE)
            for group in blocks:  # biases that were views of a block's vector get their own storage again
                for linear in group:
                    if linear.bias is not None:
                        linear.bias.data = linear.bias.data.clone()


def check_device(device: str) -> torch.device:
    """The device a command was asked to run on, checked before any work: ``cpu``, or ``cuda``/``cuda:N``
    where CUDA is available; anything else is one ``ValueError``."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"--device {device!r}: choose cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    return torch.device(device)


def thread_advice(slower_by: float = 1.5) -> str | None:
    """One line when this CPU multiplies matrices slower with torch's threads than with one: the cores are
    shared with another job (or the thread count exceeds them), and every step pays for it (8-10x in one
    user's report). Measured, not guessed: the median of five 256-wide float32 matmuls each way (~20 ms)."""
    threads = torch.get_num_threads()
    if threads <= 1:
        return None
    per_thread_count = {count: _matmul_seconds(count) for count in (threads, 1)}
    if per_thread_count[threads] <= slower_by * per_thread_count[1]:
        return None
    ratio = per_thread_count[threads] / per_thread_count[1]
    return (f"{threads} threads multiply matrices {ratio:.1f}x slower than 1 on this machine right now (its cores "
            f"are busy with other work?): training will be slow; try OMP_NUM_THREADS=1 (or fewer threads)")


def _matmul_seconds(threads: int) -> float:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.full((256, 256), 0.5)  # no draw from the global generator: a run's random stream is untouched
        times = []
        for _ in range(6):
            start = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - start)
        return sorted(times[1:])[2]  # the median of five, after one warm-up
    finally:
        torch.set_num_threads(previous)
