"""Every Triton kernel, forward and backward, against its float64 PyTorch reference on one device: the
first check of issue 39's prepared GPU run (``benchmarks/gpu/run_all.sh``), and on a CPU the same cases
under Triton's interpreter (``TRITON_INTERPRET=1``, tiny sizes).

Each case draws inputs in the kernel's dtype, runs the kernel (``backend="triton"`` / ``kernel="triton"``)
forward and backward with a random output gradient, and runs the PyTorch reference on the very same
inputs upcast to float64. The error of each output and gradient is max |kernel − reference| divided by
max |reference| (the tensor's own scale), so one tolerance serves every magnitude:

- float32: 1e-4. The kernels' float32 dot products are at IEEE precision (not TF32) and accumulate in
  float32; sums of a few thousand terms of float32 rounding stay well under it (the interpreter tier
  measures ~1e-6).
- bfloat16: 3e-2 for retention and attention, 6e-2 for the delta rule. The inputs' own rounding is shared
  with the reference; what remains is the kernel's: bf16 operands inside the dot products (8 bits of
  mantissa, ~4e-3 each) carried through a chunk's sums, and for the delta rule through the chunk's
  triangular solve, which amplifies it (PAPERS.md Part 3 on the WY form).

The command prints one row per case and tensor and exits 1 when any error exceeds its tolerance.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from scaleformer.bench.common import machine_info, print_table, write_json

__all__ = ["add_arguments", "run", "cases", "TOLERANCES"]

TOLERANCES = {("float32", "retention"): 1e-4, ("float32", "delta"): 1e-4, ("float32", "attention"): 1e-4,
              ("bfloat16", "retention"): 3e-2, ("bfloat16", "delta"): 6e-2, ("bfloat16", "attention"): 3e-2}
SIZES = {"full": dict(batch=2, heads=4, length=1024, dim=64, chunk=64),
         "tiny": dict(batch=1, heads=2, length=40, dim=16, chunk=16)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=sorted(SIZES),
                        help="full: T=1024, 4 heads of 64 (the default on a GPU); tiny: T=40 (the default on a CPU, "
                             "where the interpreter runs the kernels one program at a time)")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write every error and tolerance to this JSON file")


def _random(shape: tuple[int, ...], g: torch.Generator, scale: float = 1.0) -> Tensor:
    return torch.randn(*shape, generator=g) * scale


Case = Callable[[str, torch.dtype, torch.device], tuple[dict[str, Tensor], dict[str, Tensor]]]
FLOAT32_INPUTS = {"log_decay"}  # decays enter the kernels in float32 whatever the inputs' dtype


def _cast(inputs: dict[str, Tensor], dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    """The kernel's inputs: rounded to ``dtype`` (decays to float32), on ``device``."""
    return {n: x.to(device, torch.float32 if n in FLOAT32_INPUTS else dtype) for n, x in inputs.items()}


def _both(op: Callable[..., Tensor], inputs: dict[str, Tensor], grad: Tensor, dtype: torch.dtype,
          device: torch.device, **kernel_options: Any) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(kernel, reference): ``op`` with ``backend="triton"`` on the rounded inputs, and with
    ``backend="torch"`` on the same rounded values in float64."""
    rounded = _cast(inputs, dtype, device)
    names = list(inputs)
    kernel = _run(op, rounded, names, grad.to(device), backend="triton", **kernel_options)
    reference = _run(op, {n: x.double() for n, x in rounded.items()}, names, grad.to(device).double(),
                     backend="torch", **kernel_options)
    return kernel, reference


def _run(fn: Callable[..., Tensor], inputs: dict[str, Tensor], grad_of: list[str], out_grad: Tensor,
         **extra: Any) -> dict[str, Tensor]:
    """Output and gradients of ``fn(**inputs)`` w.r.t. ``grad_of``, as float64 copies."""
    leaves = {name: (x.detach().clone().requires_grad_(name in grad_of) if x.is_floating_point() else x)
              for name, x in inputs.items()}
    out = fn(**leaves, **extra)
    out.backward(out_grad.to(out.dtype))
    return {"out": out.detach().double(), **{f"d{n}": leaves[n].grad.double() for n in grad_of}}


def _retention_case(gated: bool, packed: bool) -> Case:
    from scaleformer.ops.retention import retention

    def case(size: str, dtype: torch.dtype, device: torch.device):
        s = SIZES[size]
        g = torch.Generator().manual_seed(1)
        b, h, t, d = (1 if packed else s["batch"]), s["heads"], s["length"], s["dim"]
        q, k = (_random((b, h, t, d), g, d**-0.5) for _ in range(2))
        v = _random((b, h, t, d), g)
        log_decay = (F.logsigmoid(_random((b, h, t), g, 3.0)) / 4 if gated
                     else torch.log(1 - 2.0 ** (-5 - torch.arange(h, dtype=torch.float64))).float())
        cuts = [0, t // 3, t // 3 + 1, t]  # a one-token document among them
        offsets = torch.tensor(cuts, device=device) if packed else None
        documents = len(cuts) - 1 if packed else b
        state = _random((documents, h, d, d), g, 0.3)
        inputs = {"q": q, "k": k, "v": v, "initial_state": state, **({"log_decay": log_decay} if gated else {})}
        fixed_decay = None if gated else log_decay.to(device)

        def op(q, k, v, initial_state, backend, chunk_size, log_decay=None):
            out, final = retention(q, k, v, log_decay=fixed_decay if log_decay is None else log_decay,
                                   form="chunkwise", chunk_size=chunk_size, initial_state=initial_state,
                                   output_final_state=True, backend=backend, offsets=offsets)
            return out + final.sum() * 1e-3  # the final state's gradient path through the backward kernels too

        return _both(op, inputs, _random((b, h, t, d), g), dtype, device, chunk_size=s["chunk"])

    return case


def _delta_case(gated: bool, packed: bool) -> Case:
    from scaleformer.ops.delta_rule import delta_rule

    def case(size: str, dtype: torch.dtype, device: torch.device):
        s = SIZES[size]
        g = torch.Generator().manual_seed(2)
        b, h, t, d = (1 if packed else s["batch"]), s["heads"], s["length"], s["dim"]
        q = _random((b, h, t, d), g)
        k = F.normalize(_random((b, h, t, d), g), dim=-1)  # the delta rule's unit keys
        v = _random((b, h, t, d), g)
        beta = torch.rand(b, h, t, generator=g)
        log_decay = F.logsigmoid(_random((b, h, t), g, 2.0) + 3) if gated else None
        cuts = [0, t // 2, t]
        offsets = torch.tensor(cuts, device=device) if packed else None
        state = _random((len(cuts) - 1 if packed else b, h, d, d), g, 0.3)
        inputs = {"q": q, "k": k, "v": v, "beta": beta, "initial_state": state,
                  **({"log_decay": log_decay} if gated else {})}

        def op(q, k, v, beta, initial_state, backend, chunk_size, log_decay=None):
            out, final = delta_rule(q, k, v, beta, log_decay=log_decay, chunk_size=chunk_size,
                                    initial_state=initial_state, output_final_state=True, offsets=offsets,
                                    backend=backend)
            return out + final.sum() * 1e-3

        return _both(op, inputs, _random((b, h, t, d), g), dtype, device, chunk_size=s["chunk"])

    return case


def _attention_case(kind: str) -> Case:
    from scaleformer.ops.dilated import dilated_attention, dilated_attention_reference
    from scaleformer.ops.s2 import S2Layout, s2_attention, s2_attention_reference

    def case(size: str, dtype: torch.dtype, device: torch.device):
        s = SIZES[size]
        g = torch.Generator().manual_seed(3)
        b, h, d = s["batch"], s["heads"], s["dim"]
        t = 64 * max(1, s["length"] // 64) if size == "full" else 32
        q, k, v = (_random((b, h, t, d), g) for _ in range(3))
        grad = _random((b, h, t, d), g)
        patterns = dict(segment_lengths=[t // 4, t // 2, t], dilation_rates=[1, 2, 4], causal=True)
        layout = S2Layout(block=64 if size == "full" else 8, local_blocks=2, vert_stride=4)

        def op(q, k, v, backend):
            if kind == "dilated":
                return (dilated_attention(q, k, v, **patterns, kernel="triton") if backend == "triton"
                        else dilated_attention_reference(q, k, v, **patterns))
            return (s2_attention(q, k, v, layout, kernel="triton") if backend == "triton"
                    else s2_attention_reference(q, k, v, layout))

        return _both(op, {"q": q, "k": k, "v": v}, grad, dtype, device)

    return case


def cases() -> dict[str, tuple[str, Case]]:
    """name -> (tolerance family, case)."""
    return {
        "retention per-head decays": ("retention", _retention_case(gated=False, packed=False)),
        "retention gated decays": ("retention", _retention_case(gated=True, packed=False)),
        "retention packed documents": ("retention", _retention_case(gated=True, packed=True)),
        "delta rule (DeltaNet)": ("delta", _delta_case(gated=False, packed=False)),
        "gated delta rule (GDN)": ("delta", _delta_case(gated=True, packed=False)),
        "gated delta rule packed": ("delta", _delta_case(gated=True, packed=True)),
        "dilated attention": ("attention", _attention_case("dilated")),
        "S2 attention": ("attention", _attention_case("s2")),
    }


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if importlib.util.find_spec("triton") is None:
        raise SystemExit("bench kernels needs triton: pip install triton (it comes with CUDA builds of torch)")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("bench kernels on a CPU runs the Triton kernels under the interpreter: set "
                         "TRITON_INTERPRET=1 (before Python starts)")
    args.size = args.size or ("tiny" if device.type == "cpu" else "full")
    info = machine_info(device)
    print(f"Triton kernels against float64 references on {info['device']} (torch {info['torch']}), "
          f"size {args.size}")
    rows: list[dict[str, Any]] = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for name, (family, case) in cases().items():
            tolerance = TOLERANCES[(dtype_name, family)]
            try:
                kernel, reference = case(args.size, dtype, device)
            except Exception as error:  # a kernel that fails to compile or launch is a failed check, said
                rows.append({"case": name, "dtype": dtype_name, "tensor": "-", "error": None,
                             "tolerance": tolerance, "ok": False, "failure": f"{type(error).__name__}: {error}"})
                continue
            for tensor, want in reference.items():
                got = kernel[tensor].to(want.device)
                error = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
                rows.append({"case": name, "dtype": dtype_name, "tensor": tensor, "error": error,
                             "tolerance": tolerance, "ok": error <= tolerance and error == error})
    print_table("max |kernel - float64 reference| / max |reference|, forward (out) and backward (d*)",
                ["case", "dtype", "tensor", "error", "tolerance", "ok"],
                [[r["case"], r["dtype"], r["tensor"], "-" if r["error"] is None else f"{r['error']:.2e}",
                  f"{r['tolerance']:.0e}", "yes" if r["ok"] else "NO " + r.get("failure", "")[:80]] for r in rows])
    failed = [r for r in rows if not r["ok"]]
    if args.json:
        write_json(args.json, {"machine": info, "size": args.size, "rows": rows, "failed": len(failed)})
    if failed:
        print(f"FAILED: {len(failed)} of {len(rows)} checks exceed their tolerance or did not run")
        return 1
    print(f"all {len(rows)} checks within tolerance")
    return 0
