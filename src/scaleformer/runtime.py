"""Process-wide settings for speed on a CPU: the trainer's loop (and ``scaleformer bench train``) makes
them once its data is prepared; the process keeps them afterwards.

Why the allocator matters on CPU: glibc serves every allocation above its mmap threshold (adaptive, at most
32 MiB) with a fresh ``mmap`` and returns it to the kernel on ``free``, so the next step's tensor of the same
size page-faults in again, page by page. A language model's logits are such a tensor: 16 × 128 tokens ×
4096 words in float32 is 32 MiB, allocated several times per training step (logits, log-softmax, its
gradient). Measured on the default run's model (``retnet-mini``, 2 cores): the cross-entropy's forward and
backward took 52 ms per step with fresh pages and 18 ms with reused ones; the whole training step went from
270 to 215 ms. Raising the threshold (and the heap's trim threshold with it) keeps freed blocks in the heap
for the next allocation: the price is that the process holds on to its peak heap instead of returning it,
which is why it is not made before the data is prepared (a corpus pass under a memory limit needs its
freed chunks back: tested in tests/train/test_token_ids.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["reuse_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (malloc.h)
_THRESHOLD = 1 << 30  # 1 GiB: above any per-step tensor of the models this library trains on a CPU
_applied: bool | None = None


def reuse_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks up to 1 GiB for reuse instead of unmapping them. Returns
    whether it is in effect; a no-op (False) off Linux/glibc, or with ``SCALEFORMER_MALLOC=system`` in the
    environment. Idempotent."""
    global _applied
    if _applied is None:
        _applied = False
        if sys.platform.startswith("linux") and os.environ.get("SCALEFORMER_MALLOC", "") != "system":
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):  # not glibc (musl has no mallopt)
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            # the trim threshold first: without it the heap's top would be returned after every step
            _applied = bool(mallopt(_M_TRIM_THRESHOLD, _THRESHOLD)) and bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD))
    return _applied
