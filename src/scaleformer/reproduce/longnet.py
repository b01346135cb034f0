"""LongNet (arXiv 2307.02486): dilated attention matches dense attention on short contexts at linear cost.

Claims: LongNet's perplexity is on par with or better than a dense Transformer's at the same (short)
training length (§4.2, Table 2), and dilated attention's cost grows linearly with the sequence length
where dense attention's grows quadratically (§2.4, Figure 5).

Here: (1) two byte-level causal LMs, identical except the attention (dense, or dilated with segments
(16, 32, 64) and rates (1, 2, 4); xPos and Sub-LN, as LongNet), trained the same steps; (2) the time of
one attention call, forward and backward, for 4 heads of width 32, against the sequence length — the
dilated op against SDPA's causal kernel — with the log-log slope (1 = linear, 2 = quadratic).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import scaleformer as sf
from scaleformer.bench.common import log_log_slope
from scaleformer.ops.dilated import dilated_attention
from scaleformer.plots import save
from scaleformer.reproduce.common import Verdict, figure, override, train, write_outputs

SEGMENTS, RATES = (16, 32, 64), (1, 2, 4)
MARGIN = 0.05


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"steps": 60, "width": 32, "layers": 2, "seq_len": 64, "lengths": [256, 512, 1024], "repeats": 1,
                "lr": 3e-3}
    return {"steps": 300, "width": 64, "layers": 4, "seq_len": 128, "lengths": [1024, 2048, 4096, 8192, 16384],
            "repeats": 3, "lr": 2e-3}


def reproduce(*, quick: bool, out: Path, seed: int, device: str,
              overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    s = override(settings(quick), overrides)
    losses = {}
    for kind in ("dense", "dilated"):
        dilated = dict(attention="dilated", segment_lengths=SEGMENTS, dilation_rates=RATES) if kind == "dilated" else {}
        cfg = sf.TransformerConfig(arch="decoder", vocab_size=259, embed_dim=s["width"], heads=4, ffn_dim=4 * s["width"],
                                   layers=s["layers"], position="xpos", norm="subln", **dilated)
        record = train(cfg, steps=s["steps"], lr=s["lr"], warmup=20, seed=seed, device=device, batch_size=8,
                       seq_len=s["seq_len"])
        losses[kind] = {"final_loss": record["final_loss"], "losses": record["losses"][:: max(1, s["steps"] // 100)]}
        print(f"  {kind:>7}: final loss {record['final_loss']:.3f}", flush=True)
    timing = [_time(length, s["repeats"], device) for length in s["lengths"]]
    for row in timing:
        print(f"  T={row['length']:>6}: dense {row['dense_s'] * 1000:.1f} ms, dilated {row['dilated_s'] * 1000:.1f} ms",
              flush=True)
    verdicts = _verdicts(losses, timing)
    payload = {"reproduction": "longnet", "quick": quick, "settings": s, "runs": losses, "timing": timing}
    write_outputs(out, "longnet", payload, verdicts)
    _plot(timing, out)
    return {**payload, "verdicts": verdicts}


def _time(length: int, repeats: int, device: str) -> dict[str, float]:
    """Median seconds of one causal attention call, forward + backward, dense vs dilated, at ``length``."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, length, 32, device=device, requires_grad=True) for _ in range(3))
    calls = {"dense": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
             "dilated": lambda: dilated_attention(q, k, v, segment_lengths=SEGMENTS, dilation_rates=RATES, causal=True)}
    row: dict[str, float] = {"length": length}
    for name, call in calls.items():
        call().sum().backward()  # warm-up
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            call().sum().backward()
            seconds.append(time.perf_counter() - start)
        row[f"{name}_s"] = sorted(seconds)[len(seconds) // 2]
    return row


def _verdicts(losses: dict[str, dict[str, Any]], timing: list[dict[str, float]]) -> list[Verdict]:
    dense, dilated = losses["dense"]["final_loss"], losses["dilated"]["final_loss"]
    lengths = [row["length"] for row in timing]
    slope_dense = log_log_slope(lengths, [row["dense_s"] for row in timing])
    slope_dilated = log_log_slope(lengths, [row["dilated_s"] for row in timing])
    return [
        Verdict("dilated attention matches dense attention on a short context",
                f"final loss dilated {dilated:.3f}, dense {dense:.3f} (matching: within {MARGIN} nats, or lower)",
                bool(dilated - dense <= MARGIN)),
        Verdict("dilated attention's cost grows linearly with the length, dense attention's quadratically",
                f"log-log slope of time vs length ({lengths[0]}…{lengths[-1]}): dilated {slope_dilated:.2f}, "
                f"dense {slope_dense:.2f} (held: dilated ≤ 1.25 and dense ≥ 1.5)",
                bool(slope_dilated is not None and slope_dense is not None and slope_dilated <= 1.25 and slope_dense >= 1.5)),
    ]


def _plot(timing: list[dict[str, float]], out: Path) -> None:
    fig, axis = figure(1)
    lengths = [row["length"] for row in timing]
    for name in ("dense", "dilated"):
        axis.plot(lengths, [row[f"{name}_s"] for row in timing], "o-", label=name)
    axis.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="seconds (forward + backward)",
             title="one causal attention call, 4 heads × 32")
    axis.minorticks_off()
    axis.set_xticks(lengths, [str(n) for n in lengths])
    axis.legend()
    save(fig, out / "longnet.png")
