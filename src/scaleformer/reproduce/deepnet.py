"""DeepNet (arXiv 2203.00555): DeepNorm trains very deep Post-LN-style stacks.

Claim (the paper's Figure 1 and §4/§5): vanilla Post-LN stops training as depth grows (it diverges or
stays at a high loss), Pre-LN trains at every depth, and DeepNorm — Post-LN with the residual up-weighted
by α and the sublayer weights scaled by β at initialisation — trains at every depth with Post-LN's
quality. DeepNet traces Post-LN's failure to large model updates at the start of training (Figure 3b):
we measure that too, as the relative change of the model's output on a fixed batch after a few steps.

Here: causal LMs on the built-in corpus (bytes), width 32, one depth sweep per scheme, the same steps,
learning rate, warm-up and seed for all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import scaleformer as sf
from scaleformer.plots import save
from scaleformer.reproduce.common import Progress, Verdict, figure, override, train, write_outputs

SCHEMES = ("post", "pre", "deepnorm")


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"depths": [4, 24], "steps": 60, "lr": 1e-3, "warmup": 10, "width": 32, "seq_len": 32, "batch_size": 8}
    return {"depths": [6, 24, 96], "steps": 200, "lr": 1e-3, "warmup": 20, "width": 32, "seq_len": 64,
            "batch_size": 8}


MARGIN = 0.05  # nats: loss differences smaller than this are within run-to-run noise at these sizes


def _compare(lower: float, higher: float) -> bool | None:
    """True when ``lower`` is below ``higher`` by more than the noise margin, False when above, else None."""
    if higher - lower > MARGIN:
        return True
    return False if lower - higher > MARGIN else None


def reproduce(*, quick: bool, out: Path, seed: int, device: str,
              overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    s = override(settings(quick), overrides)
    probe = (1, 5, 20)
    runs = []
    with Progress(len(s["depths"]) * len(SCHEMES) * s["steps"]) as progress:
        for depth in s["depths"]:
            for scheme in SCHEMES:
                cfg = sf.transformer(vocab_size=259, embed_dim=s["width"], heads=2, ffn_dim=2 * s["width"], layers=depth,
                                     norm=scheme, position="sinusoidal")
                record = train(cfg, steps=s["steps"], lr=s["lr"], warmup=s["warmup"], seed=seed, device=device,
                               batch_size=s["batch_size"], seq_len=s["seq_len"], probe_steps=probe,
                               progress=progress, label=f"{scheme} depth {depth}")
                runs.append({"scheme": scheme, "depth": depth, "final_loss": record["final_loss"],
                             "diverged_at": record["diverged_at"], "updates": record["updates"],
                             "losses": record["losses"][:: max(1, s["steps"] // 100)]})
                progress.write(f"  {scheme:>8} depth {depth:>3}: final loss {record['final_loss']:.3f}, update after "
                               f"5 steps {record['updates'].get(5, float('nan')):.3f}")
    verdicts = _verdicts(runs, s["depths"], s["steps"])
    payload = {"reproduction": "deepnet", "quick": quick, "settings": s, "runs": runs}
    write_outputs(out, "deepnet", payload, verdicts)
    _plot(runs, s["depths"], out)
    return {**payload, "verdicts": verdicts}


def _verdicts(runs: list[dict[str, Any]], depths: list[int], steps: int) -> list[Verdict]:
    at = {(r["scheme"], r["depth"]): r for r in runs}
    deepest, shallowest = depths[-1], depths[0]
    loss = {scheme: at[scheme, deepest]["final_loss"] for scheme in SCHEMES}
    trained = all(at["deepnorm", d]["diverged_at"] is None for d in depths)
    update = {scheme: at[scheme, deepest]["updates"].get(5) for scheme in SCHEMES}
    return [
        Verdict("DeepNorm trains at every depth",
                f"DeepNorm's loss is finite at depths {depths}" if trained else "DeepNorm diverged", trained),
        Verdict(f"at depth {deepest}, DeepNorm ends below Post-LN",
                f"final loss DeepNorm {loss['deepnorm']:.3f} vs Post-LN {loss['post']:.3f} (Pre-LN {loss['pre']:.3f}); "
                f"differences under {MARGIN} nats count as undecided", _compare(loss["deepnorm"], loss["post"]),
                evidence=(loss["deepnorm"], loss["post"])),
        Verdict("Post-LN gets worse as it gets deeper",
                f"Post-LN final loss {at['post', shallowest]['final_loss']:.3f} at depth {shallowest} → "
                f"{at['post', deepest]['final_loss']:.3f} at depth {deepest}",
                _compare(at["post", shallowest]["final_loss"], at["post", deepest]["final_loss"]),
                evidence=(at["post", shallowest]["final_loss"], at["post", deepest]["final_loss"])),
        Verdict("Post-LN's early model updates are larger than DeepNorm's (DeepNet Fig. 3b)",
                f"relative output change after 5 steps at depth {deepest}: Post-LN {update['post']:.3f}, "
                f"DeepNorm {update['deepnorm']:.3f}, Pre-LN {update['pre']:.3f}", bool(update["post"] > update["deepnorm"]),
                evidence=(update["deepnorm"], update["post"]))
        if None not in update.values() else
        Verdict("Post-LN's early model updates are larger than DeepNorm's (DeepNet Fig. 3b)",
                f"not measured: a run stopped before step 5 (steps {steps})", None),
    ]


def _plot(runs: list[dict[str, Any]], depths: list[int], out: Path) -> None:
    fig, (loss_axis, update_axis) = figure(2)
    for scheme in SCHEMES:
        mine = [r for r in runs if r["scheme"] == scheme]
        loss_axis.plot([r["depth"] for r in mine], [r["final_loss"] for r in mine], "o-", label=scheme)
        update_axis.plot([r["depth"] for r in mine], [r["updates"].get(5) or float("nan") for r in mine], "o-",
                         label=scheme)
    loss_axis.set(xscale="log", xlabel="layers", ylabel="final training loss (nats/byte)", title="loss vs depth")
    update_axis.set(xscale="log", xlabel="layers", ylabel="relative output change after 5 steps",
                    title="early model update")
    loss_axis.legend()
    save(fig, out / "deepnet.png")
