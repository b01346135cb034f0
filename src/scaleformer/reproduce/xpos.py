"""LeX (arXiv 2212.10554): xPos with blockwise causal attention extrapolates past the training length.

Claim (LeX §4, Table 2 and Figure 4): trained at length L, a Transformer with learned absolute or
sinusoidal positions, or RoPE, degrades quickly on longer inputs, while xPos — RoPE with an exponential
decay of attention over distance — degrades less, and xPos with blockwise causal attention at inference
(blocks of L/2, each query seeing its block and the previous one) keeps its perplexity flat as the input
grows.

LeX's indicator of extrapolation is *attention resolution* (§3): with s[n] the expected pre-softmax
attention score at query–key distance n,
R(s) = Σ_n e^{s[n]} (e^{s[n]} − e^{s[n+1]}) / (Σ_n e^{s[n]})²,
large when the scores fall monotonically and steeply with distance (the model can tell near from far) and
small when they are flat or oscillate. xPos is designed to raise it, and blockwise causal attention to keep
it from collapsing on inputs longer than the training length.

Here: byte-level causal LMs trained on the built-in corpus at length L, then evaluated (mean loss per byte
over windows of the validation split, all starting at the same points) at L/2 … 8L. The blockwise variant
is the trained xPos model itself, evaluated with ``blockwise_causal_block = L/2``. Attention resolution is
measured on the same windows: s[n] is the mean score of every visible query–key pair at distance n (a
distance no query sees has weight e^{s} = 0, as does n = N), R is computed per layer and head and averaged.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

import scaleformer as sf
from scaleformer.layers.attention import AttentionCore
from scaleformer.ops.attention import repeat_kv_heads
from scaleformer.plots import save
from scaleformer.reproduce.common import Progress, Verdict, corpus_tokens, figure, override, train, write_outputs

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
    results: dict[str, dict[int, float]] = {}
    resolution: dict[str, dict[int, float]] = {}
    with Progress(len(TRAINED) * s["steps"]) as progress:
        for position in TRAINED:
            knobs = dict(vocab_size=259, embed_dim=s["width"], heads=4, ffn_dim=4 * s["width"], layers=s["layers"],
                         position=position, **{"absolute": dict(max_positions=max(lengths)),
                                               "xpos": dict(xpos_scale_base=float(4 * s["length"]))}.get(position, {}))
            cfg = sf.transformer(**knobs)
            record = train(cfg, steps=s["steps"], lr=s["lr"], warmup=20, seed=seed, device=device,
                           batch_size=s["batch_size"], seq_len=s["length"], progress=progress, label=position)
            models = {position: record["model"]}
            if position == "xpos":
                blockwise = sf.build(sf.transformer(**knobs, blockwise_causal_block=s["length"] // 2)).to(device)
                blockwise.load_state_dict(record["model"].state_dict())
                models["xpos+blockwise"] = blockwise
            for name, model in models.items():
                progress.begin(f"{name}: evaluating")
                results[name], resolution[name] = _evaluate(model, windows, device)
                progress.write(f"  {name:>15}: loss " + ", ".join(f"{n}: {loss:.3f}" for n, loss in results[name].items())
                               + "; resolution " + ", ".join(f"{n}: {r:.3g}" for n, r in resolution[name].items()))
    verdicts = _verdicts(results, resolution, s["length"], lengths)
    payload = {"reproduction": "xpos", "quick": quick, "settings": s, "lengths": lengths,
               "loss": {name: {str(n): v for n, v in losses.items()} for name, losses in results.items()},
               "resolution": {name: {str(n): v for n, v in r.items()} for name, r in resolution.items()}}
    write_outputs(out, "xpos", payload, verdicts)
    _plot(results, resolution, s["length"], out)
    return {**payload, "verdicts": verdicts}


@torch.no_grad()
def _evaluate(model: torch.nn.Module, windows: dict[int, torch.Tensor],
              device: str) -> tuple[dict[int, float], dict[int, float]]:
    """Loss per byte and mean attention resolution at each evaluation length."""
    model.eval()
    losses, resolution = {}, {}
    for n, batch in windows.items():
        batch = batch.to(device)
        with recording_scores(model) as scores:
            logits = model(batch[:, :-1]).logits.float()
        losses[n] = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()
        resolution[n] = float(torch.stack([attention_resolution(s) for s in scores.by_distance()]).mean())
    return losses, resolution


class ScoresByDistance:
    """Running sums of pre-softmax attention scores per (layer, head, query–key distance)."""

    def __init__(self) -> None:
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, torch.Tensor] = {}

    def add(self, layer: int, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> None:
        """Scores q kᵀ / sqrt(D) of one call (B, H, T, S) — only what the call lets each query see."""
        k = repeat_kv_heads(k, q.shape[1])
        t, s = q.shape[2], k.shape[2]
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        distance = torch.arange(s - t, s, device=q.device)[:, None] - torch.arange(s, device=q.device)[None, :]
        seen = (distance >= 0).expand_as(scores)  # keys behind the query (a causal model sees no others)
        if mask is not None:
            seen = seen & mask
        index = distance.clamp(min=0).expand_as(scores).flatten(2)
        sums = torch.zeros(*scores.shape[:2], s, device=q.device).scatter_add_(
            2, index, torch.where(seen, scores, 0.0).flatten(2))
        counts = torch.zeros_like(sums).scatter_add_(2, index, seen.float().flatten(2))
        self.sums[layer] = self.sums.get(layer, 0) + sums.sum(0)
        self.counts[layer] = self.counts.get(layer, 0) + counts.sum(0)

    def by_distance(self) -> list[torch.Tensor]:
        """Per layer and head: (N,) mean score at each distance, -inf where no pair was seen."""
        means = []
        for layer in sorted(self.sums):
            mean = self.sums[layer] / self.counts[layer].clamp(min=1)
            means.extend(mean.masked_fill(self.counts[layer] == 0, -math.inf))
        return means


@contextmanager
def recording_scores(model: torch.nn.Module) -> Iterator[ScoresByDistance]:
    """Within the block, every self-attention call of ``model`` also adds its scores to the record."""
    record = ScoresByDistance()
    patched = [module for module in model.modules() if isinstance(module, AttentionCore)]
    for layer, module in enumerate(patched):
        def attend(q, k, v, *, mask, bias, causal, _layer=layer, _attend=module._attend):
            record.add(_layer, q, k, mask, causal)
            return _attend(q, k, v, mask=mask, bias=bias, causal=causal)
        module._attend = attend
    try:
        yield record
    finally:
        for module in patched:
            del module._attend  # the class's own method again


def attention_resolution(scores: torch.Tensor) -> torch.Tensor:
    """LeX's R(s) = Σ_n e^{s[n]} (e^{s[n]} − e^{s[n+1]}) / (Σ_n e^{s[n]})² of mean scores s (N,) by distance
    (-inf: no weight); e^{s[N]} = 0. Invariant to adding a constant to every score, so computed shifted."""
    weights = torch.exp(scores.double() - scores.max())
    following = torch.cat([weights[1:], weights.new_zeros(1)])
    return (weights * (weights - following)).sum() / weights.sum() ** 2


def _verdicts(results: dict[str, dict[int, float]], resolution: dict[str, dict[int, float]], length: int,
              lengths: list[int]) -> list[Verdict]:
    longest = max(lengths)
    r = {name: values[longest] for name, values in resolution.items()}
    growth = {name: losses[longest] - losses[length] for name, losses in results.items()}
    others = [value for name, value in growth.items() if name != "xpos+blockwise"]
    least = (True if all(value - growth["xpos+blockwise"] > 0.05 for value in others)
             else False if any(growth["xpos+blockwise"] - value > 0.05 for value in others) else None)
    return [
        Verdict(f"xPos with blockwise causal attention keeps its loss flat up to {longest // length}× the training length",
                f"loss at {length} → {longest}: {results['xpos+blockwise'][length]:.3f} → "
                f"{results['xpos+blockwise'][longest]:.3f} ({growth['xpos+blockwise']:+.3f} nats; flat = within 0.05)",
                bool(growth["xpos+blockwise"] <= 0.05), evidence=(growth["xpos+blockwise"], 0.05)),
        Verdict("it degrades least of all variants",
                "growth of the loss from L to the longest length: "
                + ", ".join(f"{name} {value:+.3f}" for name, value in growth.items())
                + " (held: every other grows more by 0.05 nats; did not hold: one grows less by 0.05)", least),
        Verdict("xPos alone degrades less than RoPE",
                f"growth: xPos {growth['xpos']:+.3f}, RoPE {growth['rope']:+.3f}",
                True if growth["rope"] - growth["xpos"] > 0.05 else False if growth["xpos"] - growth["rope"] > 0.05
                else None, evidence=(growth["xpos"], growth["rope"])),
        Verdict(f"xPos has a higher attention resolution than RoPE, and blockwise causal attention keeps it "
                f"highest on inputs {longest // length}× the training length",
                f"resolution at {longest}: " + ", ".join(f"{name} {value:.3g}" for name, value in r.items())
                + " (held: xpos+blockwise > xpos > rope, each by over 5%; did not hold: one is 5% below the next)",
                _ordered([r["xpos+blockwise"], r["xpos"], r["rope"]], 1.05)),
    ]


def _ordered(values: list[float], ratio: float) -> bool | None:
    """True if each value exceeds the next by the factor ``ratio``, False if one falls below the next by it."""
    pairs = list(zip(values, values[1:]))
    return True if all(a > b * ratio for a, b in pairs) else False if any(a * ratio < b for a, b in pairs) else None


def _plot(results: dict[str, dict[int, float]], resolution: dict[str, dict[int, float]], length: int,
          out: Path) -> None:
    fig, (loss_axis, resolution_axis) = figure(2)
    for name, losses in results.items():
        loss_axis.plot(list(losses), [min(v, 8.0) for v in losses.values()], "o-", label=name)
        resolution_axis.plot(list(resolution[name]), list(resolution[name].values()), "o-", label=name)
    lengths = list(next(iter(results.values())))
    for axis in (loss_axis, resolution_axis):
        axis.axvline(length, color="grey", linestyle=":", label="training length")
        axis.set(xscale="log", xlabel="evaluation length (bytes)")
        axis.minorticks_off()
        axis.set_xticks(lengths, [str(n) for n in lengths])
    loss_axis.set(ylabel="validation loss (nats/byte)", title="length extrapolation")
    resolution_axis.set(yscale="log", ylabel="attention resolution R (LeX)", title="attention resolution")
    loss_axis.legend()
    save(fig, out / "xpos.png")
