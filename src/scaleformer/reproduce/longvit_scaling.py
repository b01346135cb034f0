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
on one image of each size (the median of ``rounds`` rounds, the two variants taking turns), with the peak memory of tensors allocated during the
step. Dense runs up to ``dense_max_patches``. Checked: (1) dilated attention is several times faster than
dense, and more so as the image grows; (2) its time grows no faster than the key visits N · Σ w_i/r_i²
(log-log slope at most 1.25); (3) its memory is linear in N. From 1,024 patches on, where attention's cost is no longer hidden
by the layers' linear work. Both variants run on fused attention kernels, which never store the score
matrix: dense attention's memory is linear as well, and its cost shows in time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

import scaleformer as sf
from scaleformer.bench.common import (Timing, log_log_slope, peak_memory, ratio_interval, slope_interval,
                                        time_interleaved)
from scaleformer.models.longvit import default_segments
from scaleformer.plots import save
from scaleformer.reproduce.common import Progress, Verdict, figure, override, write_outputs


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"sizes": [256, 512, 1024], "patch": 16, "width": 32, "layers": 2, "rounds": 5,
                "dense_max_patches": 4096}
    return {"sizes": [512, 1024, 2048, 4096], "patch": 16, "width": 64, "layers": 4, "rounds": 5,
            "dense_max_patches": 16384}


def _config(size: int, s: dict[str, Any], dense: bool) -> sf.LongViTConfig:
    patches = (size // s["patch"]) ** 2
    patterns = dict(segment_lengths=(patches,), dilation_rates=(1,)) if dense else dict(
        segment_lengths=default_segments(patches), dilation_rates=(1, 2, 4, 8, 16))
    return sf.LongViTConfig(img_size=size, patch_size=s["patch"], embed_dim=s["width"], layers=s["layers"], heads=4,
                            ffn_dim=4 * s["width"], num_classes=2, **patterns)


def _step(size: int, s: dict[str, Any], dense: bool, device: str) -> Callable[[], None]:
    """One training step (forward + backward) of the model on one random image of ``size`` pixels."""
    torch.manual_seed(0)
    model = sf.build(_config(size, s, dense)).to(device)
    image = torch.randn(1, 3, size, size, device=device)
    label = torch.tensor([1], device=device)

    def step() -> None:
        model(image, label).loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def reproduce(*, quick: bool, out: Path, seed: int, device: str,
              overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    s = override(settings(quick), overrides)
    kinds = {size: [k for k in ("dilated", "dense") if k == "dilated" or (size // s["patch"]) ** 2 <= s["dense_max_patches"]]
             for size in s["sizes"]}
    rows = []
    # The bar counts patches (a step's linear work; attention's share grows with the image, so the estimate
    # runs a little short at the largest sizes)
    with Progress(sum((size // s["patch"]) ** 2 * len(k) for size, k in kinds.items()) * (s["rounds"] + 1),
                  unit="patch") as progress:
        progress.bar.unit_scale = True
        for size in s["sizes"]:
            patches = (size // s["patch"]) ** 2
            row: dict[str, Any] = {"size": size, "patches": patches, "segments": list(default_segments(patches)),
                                   "visits": patches * key_visits(patches)}
            progress.begin(f"{size}×{size} image")
            steps = {kind: _step(size, s, kind == "dense", device) for kind in kinds[size]}
            for kind, step in steps.items():  # also each one's warm-up
                row[f"{kind}_peak_mb"] = peak_memory(step, device=torch.device(device)) / 2**20
                progress.advance(patches)
            timings = time_interleaved(steps, rounds=s["rounds"], device=device,
                                       after_each=lambda kind: progress.advance(patches))
            for kind, timing in timings.items():
                row[f"{kind}_s"], row[f"{kind}_rounds_s"] = timing.median, list(timing.rounds)
            del steps  # the models, before the next (larger) size's
            rows.append(row)
            progress.write(f"  {size}×{size} ({patches} patches): " + ", ".join(
                f"{k} {Timing(tuple(row[f'{k}_rounds_s']))} / {row[f'{k}_peak_mb']:.0f} MB" for k in kinds[size]))
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


def _timing(row: dict[str, Any], kind: str) -> Timing:
    return Timing(tuple(row[f"{kind}_rounds_s"]))


def _speedup_verdict(rows: list[dict[str, Any]]) -> Verdict:
    """Held when, beyond the noise (the ratio intervals of :func:`ratio_interval`), the speed-up at the
    largest size both run is at least SPEEDUP and above the one at the smallest; did not hold when it is
    below SPEEDUP or below the smallest's beyond the noise; undecided otherwise."""
    both = [row for row in rows if "dense_s" in row and row["patches"] >= SLOPE_FROM]
    speedups = [ratio_interval(_timing(row, "dense"), _timing(row, "dilated")) for row in both]
    measured = ("dense / dilated step time (ratio of medians, and the interval the quartiles allow): "
                + ", ".join(f"{row['patches']} patches {x:.1f}× ({low:.1f}–{high:.1f})" for row, (x, low, high)
                            in zip(both, speedups))
                + f" (held: rising beyond the noise, and ≥ {SPEEDUP:.0f}× at the largest)")
    held = None
    if len(both) >= 2:
        (_, first_low, first_high), (_, last_low, last_high) = speedups[0], speedups[-1]
        held = (True if last_low >= SPEEDUP and last_low > first_high
                else False if last_high < SPEEDUP or last_high < first_low else None)
    return Verdict("dilated attention is several times faster than dense attention, more so as the image grows",
                   measured, held)


def _visits_verdict(rows: list[dict[str, Any]]) -> Verdict:
    """Held when the 95% interval of the slope of time against key visits lies at or below 1.25, did not
    hold when it lies above; undecided otherwise."""
    def text(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    measured = [row for row in rows if row["patches"] >= SLOPE_FROM]
    slope = slope_interval([row["visits"] for row in measured], [_timing(row, "dilated") for row in measured])
    shown = "n/a" if slope is None else f"{slope[0]:.2f} (95% CI {slope[1]:.2f}–{slope[2]:.2f})"
    held = None if slope is None else True if slope[2] <= 1.25 else False if slope[1] > 1.25 else None
    return Verdict("its time grows no faster than the keys it visits, N · Σ w/r²",
                   f"log-log slope of step time vs key visits from {SLOPE_FROM} patches: {shown}; vs patches: "
                   f"dilated {text(_slope(rows, 'patches', 'dilated_s'))}, dense {text(_slope(rows, 'patches', 'dense_s'))} "
                   "(held: the interval against visits ≤ 1.25)", held)


def _verdicts(rows: list[dict[str, Any]]) -> list[Verdict]:
    def text(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    memory = _slope(rows, "patches", "dilated_peak_mb")
    return [
        _speedup_verdict(rows),
        _visits_verdict(rows),
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
