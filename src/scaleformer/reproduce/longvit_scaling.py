"""LongViT (arXiv 2312.03558): with dilated attention a vision Transformer's cost grows linearly with the image's area.

Claim: LongViT models a gigapixel image as one sequence of patches because LongNet's dilated attention
costs time and memory linear in the sequence length, where a ViT's dense attention is quadratic (LongViT
§1 and §3; LongNet §2.4).

Here: the same LongViT (width ``width``, ``layers`` Sub-LN layers, 4 heads, patches of ``patch`` pixels),
once with LongViT's dilated attention (segment lengths growing with the image: :func:`default_segments`,
rates 1, 2, 4, 8, 16) and once with dense attention (one pattern: the whole image, rate 1; the same code
path), timed forward + backward on one image of each size (median of ``repeats``), and the peak memory of
tensors allocated during the step. Dense is run up to ``dense_max_patches``. Reported: time and memory
against the number of patches with their log-log slopes (1 = linear, 2 = quadratic) from 1,024 patches,
where attention's cost is no longer hidden by the layers' linear work. Both variants run on fused
attention kernels, which never store the score matrix: dense attention's memory is linear as well, and
its cost shows in time.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

import scaleformer as sf
from scaleformer.bench.common import log_log_slope, peak_memory
from scaleformer.models.longvit import default_segments
from scaleformer.plots import save
from scaleformer.reproduce.common import Verdict, figure, override, write_outputs


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"sizes": [256, 512, 1024], "patch": 16, "width": 32, "layers": 2, "repeats": 1,
                "dense_max_patches": 4096}
    return {"sizes": [512, 1024, 2048, 4096], "patch": 16, "width": 64, "layers": 4, "repeats": 3,
            "dense_max_patches": 16384}


def _config(size: int, s: dict[str, Any], dense: bool) -> sf.LongViTConfig:
    patches = (size // s["patch"]) ** 2
    patterns = dict(segment_lengths=(patches,), dilation_rates=(1,)) if dense else dict(
        segment_lengths=default_segments(patches), dilation_rates=(1, 2, 4, 8, 16))
    return sf.LongViTConfig(img_size=size, patch_size=s["patch"], embed_dim=s["width"], layers=s["layers"], heads=4,
                            ffn_dim=4 * s["width"], num_classes=2, **patterns)


def _measure(size: int, s: dict[str, Any], dense: bool, device: str) -> dict[str, float]:
    torch.manual_seed(0)
    model = sf.build(_config(size, s, dense)).to(device)
    image = torch.randn(1, 3, size, size, device=device)
    label = torch.tensor([1], device=device)

    def step() -> None:
        model(image, label).loss.backward()
        model.zero_grad(set_to_none=True)

    peak = peak_memory(step, device=torch.device(device)) / 2**20  # also the warm-up
    seconds = []
    for _ in range(s["repeats"]):
        start = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return {"seconds": sorted(seconds)[len(seconds) // 2], "peak_mb": peak}


def reproduce(*, quick: bool, out: Path, seed: int, device: str,
              overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    s = override(settings(quick), overrides)
    rows = []
    for size in s["sizes"]:
        patches = (size // s["patch"]) ** 2
        row: dict[str, Any] = {"size": size, "patches": patches, "segments": list(default_segments(patches))}
        for kind in ("dilated", "dense"):
            if kind == "dense" and patches > s["dense_max_patches"]:
                continue
            measured = _measure(size, s, kind == "dense", device)
            row[f"{kind}_s"], row[f"{kind}_peak_mb"] = measured["seconds"], measured["peak_mb"]
        rows.append(row)
        print(f"  {size}×{size} ({patches} patches): " + ", ".join(
            f"{k} {row[f'{k}_s']:.3f} s / {row[f'{k}_peak_mb']:.0f} MB" for k in ("dilated", "dense") if f"{k}_s" in row),
            flush=True)
    verdicts = _verdicts(rows)
    payload = {"reproduction": "longvit-scaling", "quick": quick, "seed": seed, "settings": s, "rows": rows}
    write_outputs(out, "longvit-scaling", payload, verdicts)
    _plot(rows, out)
    return {**payload, "verdicts": verdicts}


SLOPE_FROM = 1024  # patches: below, the layers' linear work hides attention's cost at these widths


def _slope(rows: list[dict[str, Any]], key: str) -> float | None:
    measured = [row for row in rows if key in row and row["patches"] >= SLOPE_FROM]
    if len(measured) < 2:
        return None
    return log_log_slope([row["patches"] for row in measured], [row[key] for row in measured])


def _verdicts(rows: list[dict[str, Any]]) -> list[Verdict]:
    time_dilated, time_dense = _slope(rows, "dilated_s"), _slope(rows, "dense_s")
    memory_dilated, memory_dense = _slope(rows, "dilated_peak_mb"), _slope(rows, "dense_peak_mb")

    def text(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    return [
        Verdict("dilated attention makes a ViT's training step linear in the image's area, dense attention quadratic",
                f"log-log slope of step time vs patches from {SLOPE_FROM}: dilated {text(time_dilated)}, dense "
                f"{text(time_dense)} "
                "(held: dilated ≤ 1.25 and dense ≥ 1.5)",
                None if time_dilated is None or time_dense is None else bool(time_dilated <= 1.25 and time_dense >= 1.5)),
        Verdict("and its memory linear",
                f"log-log slope of peak memory vs patches from {SLOPE_FROM}: dilated {text(memory_dilated)}, dense "
                f"{text(memory_dense)} (held: dilated ≤ 1.25; dense runs on a fused kernel that never stores the "
                "score matrix, so its memory is linear too)", None if memory_dilated is None else bool(memory_dilated <= 1.25)),
    ]


def _plot(rows: list[dict[str, Any]], out: Path) -> None:
    fig, (time_axis, memory_axis) = figure(2)
    for kind in ("dilated", "dense"):
        measured = [row for row in rows if f"{kind}_s" in row]
        time_axis.plot([r["patches"] for r in measured], [r[f"{kind}_s"] for r in measured], "o-", label=kind)
        memory_axis.plot([r["patches"] for r in measured], [r[f"{kind}_peak_mb"] for r in measured], "o-", label=kind)
    time_axis.set(xscale="log", yscale="log", xlabel="patches", ylabel="seconds (forward + backward)",
                  title="LongViT training step, one image")
    memory_axis.set(xscale="log", yscale="log", xlabel="patches", ylabel="peak tensor MB", title="memory")
    for axis in (time_axis, memory_axis):
        axis.legend()
    save(fig, out / "longvit-scaling.png")
