"""LeX (arXiv 2212.10554): xPos with blockwise causal attention extrapolates past the training length.

Claim (LeX §4, Table 2 and Figure 4): trained at length L, a Transformer with learned absolute or
sinusoidal positions, or RoPE, degrades quickly on longer inputs, while xPos — RoPE with an exponential
decay of attention over distance — degrades less, and xPos with blockwise causal attention at inference
(blocks of L/2, each query seeing its block and the previous one) keeps its perplexity flat as the input
grows.

Here: byte-level causal LMs trained on the built-in corpus at length L, then evaluated (mean loss per byte
over windows of the validation split, all starting at the same points) at L/2 … 8L. The blockwise variant is the trained xPos model itself,
evaluated with ``blockwise_causal_block = L/2``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import scaleformer as sf
from scaleformer.plots import save
from scaleformer.reproduce.common import Verdict, corpus_tokens, figure, override, train, write_outputs

TRAINED = ("absolute", "sinusoidal", "rope", "xpos")
VARIANTS = TRAINED + ("xpos+blockwise",)


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"length": 32, "factors": [0.5, 1, 4], "steps": 80, "layers": 2, "width": 32, "batch_size": 8,
                "eval_windows": 8, "lr": 3e-3}
    return {"length": 64, "factors": [0.5, 1, 2, 4, 8], "steps": 400, "layers": 4, "width": 64, "batch_size": 8,
            "eval_windows": 64, "lr": 2e-3}


def reproduce(*, quick: bool, out: Path, seed: int, device: str,
              overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    s = override(settings(quick), overrides)
    lengths = [int(s["length"] * f) for f in s["factors"]]
    _, val = corpus_tokens()
    # The same starting points for every length (a shorter window is a prefix of a longer one), so the
    # lengths differ in how far the model must reach, not in which text they read.
    starts = np.random.default_rng(seed + 7).integers(0, len(val) - max(lengths) - 1, s["eval_windows"])
    windows = {n: torch.from_numpy(np.stack([val[i:i + n + 1] for i in starts])) for n in lengths}
    results = {}
    for position in TRAINED:
        cfg = sf.TransformerConfig(arch="decoder", vocab_size=259, embed_dim=s["width"], heads=4, ffn_dim=4 * s["width"],
                                   layers=s["layers"], position=position, max_positions=max(lengths),
                                   xpos_scale_base=float(4 * s["length"]))
        record = train(cfg, steps=s["steps"], lr=s["lr"], warmup=20, seed=seed, device=device,
                       batch_size=s["batch_size"], seq_len=s["length"])
        results[position] = _losses(record["model"], windows, device)
        if position == "xpos":
            blockwise = sf.build(cfg.replace(blockwise_causal_block=s["length"] // 2)).to(device)
            blockwise.load_state_dict(record["model"].state_dict())
            results["xpos+blockwise"] = _losses(blockwise, windows, device)
        for name in [position] + (["xpos+blockwise"] if position == "xpos" else []):
            print(f"  {name:>15}: " + ", ".join(f"{n}: {loss:.3f}" for n, loss in results[name].items()), flush=True)
    verdicts = _verdicts(results, s["length"], lengths)
    payload = {"reproduction": "xpos", "quick": quick, "settings": s, "lengths": lengths,
               "loss": {name: {str(n): v for n, v in losses.items()} for name, losses in results.items()}}
    write_outputs(out, "xpos", payload, verdicts)
    _plot(results, s["length"], out)
    return {**payload, "verdicts": verdicts}


@torch.no_grad()
def _losses(model: torch.nn.Module, windows: dict[int, torch.Tensor], device: str) -> dict[int, float]:
    model.eval()
    losses = {}
    for n, batch in windows.items():
        batch = batch.to(device)
        logits = model(batch[:, :-1]).logits.float()
        losses[n] = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()
    return losses


def _verdicts(results: dict[str, dict[int, float]], length: int, lengths: list[int]) -> list[Verdict]:
    longest = max(lengths)
    growth = {name: losses[longest] - losses[length] for name, losses in results.items()}
    others = [value for name, value in growth.items() if name != "xpos+blockwise"]
    least = (True if all(value - growth["xpos+blockwise"] > 0.05 for value in others)
             else False if any(growth["xpos+blockwise"] - value > 0.05 for value in others) else None)
    return [
        Verdict(f"xPos with blockwise causal attention keeps its loss flat up to {longest // length}× the training length",
                f"loss at {length} → {longest}: {results['xpos+blockwise'][length]:.3f} → "
                f"{results['xpos+blockwise'][longest]:.3f} ({growth['xpos+blockwise']:+.3f} nats; flat = within 0.05)",
                bool(growth["xpos+blockwise"] <= 0.05)),
        Verdict("it degrades least of all variants",
                "growth of the loss from L to the longest length: "
                + ", ".join(f"{name} {value:+.3f}" for name, value in growth.items())
                + " (held: every other grows more by 0.05 nats; did not hold: one grows less by 0.05)", least),
        Verdict("xPos alone degrades less than RoPE",
                f"growth: xPos {growth['xpos']:+.3f}, RoPE {growth['rope']:+.3f}",
                True if growth["rope"] - growth["xpos"] > 0.05 else False if growth["xpos"] - growth["rope"] > 0.05
                else None),
    ]


def _plot(results: dict[str, dict[int, float]], length: int, out: Path) -> None:
    fig, axis = figure(1)
    for name, losses in results.items():
        axis.plot(list(losses), [min(v, 8.0) for v in losses.values()], "o-", label=name)
    axis.axvline(length, color="grey", linestyle=":", label="training length")
    axis.set(xscale="log", xlabel="evaluation length (bytes)", ylabel="validation loss (nats/byte)",
             title="length extrapolation")
    axis.legend()
    save(fig, out / "xpos.png")
