"""LongViT (arXiv 2312.03558): dilated attention makes a ViT over a whole large image affordable.

Claim: LongViT models a gigapixel image as one sequence of patches because LongNet's dilated attention
costs far less than a ViT's dense attention, whose cost is quadratic in the number of patches (LongViT §1
and §3; LongNet §2.4).

What the cost of LongViT's attention is: a pattern (w, r) lets a query (of the heads that keep it, 1 in r)
see w/r keys, so a patch visits Σ_i w_i/r_i² keys on average over the heads. LongViT grows the segments
with the image (:func:`default_segments`), so that sum grows with N too: the attention is not linear in
N, as LongNet's with fixed segments is, but a fraction of dense attention's N² that shrinks as the image
grows (1/8 of it at 1,024 patches, 1/21 at 65,536, 1/85 at 1,048,576 with TorchScale's segments).

Here: the same LongViT (width ``width``, ``layers`` Sub-LN layers, 4 heads, patches of ``patch`` pixels),
once with LongViT's dilated attention (its segments for the image's size, rates 1, 2, 4, 8, 16) and once
with dense attention (one pattern: the whole image, rate 1; the same code path), timed forward + backward
on one image of each size (median of ``repeats``), with the peak memory of tensors allocated during the
step. Dense runs up to ``dense_max_patches``. Checked: (1) dilated attention is several times faster than
dense, and more so as the image grows; (2) its time grows no faster than the key visits N · Σ w_i/r_i²
(log-log slope at most 1.25); (3) its memory is linear in N. From 1,024 patches on, where attention's cost is no longer hidden
by the layers' linear work. Both variants run on fused attention kernels, which never store the score
matrix: dense attention's memory is linear as well, and its cost shows in time.
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
        row: dict[str, Any] = {"size": size, "patches": patches, "segments": list(default_segments(patches)),
                               "visits": patches * key_visits(patches)}
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
SPEEDUP = 3.0  # dense / dilated step time at the largest size both run, for verdict (1)


def key_visits(patches: int) -> float:
    """Keys a patch visits, averaged over heads: Σ_i min(w_i, N) / r_i² for the image's patterns."""
    return sum(min(w, patches) / r**2 for w, r in zip(default_segments(patches), (1, 2, 4, 8, 16)))


def _slope(rows: list[dict[str, Any]], x: str, key: str) -> float | None:
    measured = [row for row in rows if key in row and row["patches"] >= SLOPE_FROM]
    if len(measured) < 2:
        return None
    return log_log_slope([row[x] for row in measured], [row[key] for row in measured])


def _verdicts(rows: list[dict[str, Any]]) -> list[Verdict]:
    def text(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    both = [row for row in rows if "dense_s" in row and row["patches"] >= SLOPE_FROM]
    speedups = [row["dense_s"] / row["dilated_s"] for row in both]
    faster = None if len(both) < 2 else bool(speedups[-1] >= SPEEDUP and speedups[-1] > speedups[0])
    visits_slope = _slope(rows, "visits", "dilated_s")
    memory = _slope(rows, "patches", "dilated_peak_mb")
    return [
        Verdict("dilated attention is several times faster than dense attention, more so as the image grows",
                "dense / dilated step time: " + ", ".join(f"{row['patches']} patches {x:.1f}×" for row, x in zip(both, speedups))
                + f" (held: rising, and ≥ {SPEEDUP:.0f}× at the largest)", faster),
        Verdict("its time grows no faster than the keys it visits, N · Σ w/r²",
                f"log-log slope of step time vs key visits from {SLOPE_FROM} patches: {text(visits_slope)}; vs patches: "
                f"dilated {text(_slope(rows, 'patches', 'dilated_s'))}, dense {text(_slope(rows, 'patches', 'dense_s'))} "
                "(held: against visits ≤ 1.25)", None if visits_slope is None else bool(visits_slope <= 1.25)),
        Verdict("and its memory is linear in the image's area",
                f"log-log slope of peak memory vs patches from {SLOPE_FROM}: dilated {text(memory)}, dense "
                f"{text(_slope(rows, 'patches', 'dense_peak_mb'))} (held: dilated ≤ 1.25; dense runs on a fused kernel "
                "that never stores the score matrix, so its memory is linear too)", None if memory is None else bool(memory <= 1.25)),
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
