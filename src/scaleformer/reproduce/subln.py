"""Sub-LN (Magneto, arXiv 2210.06423): Sub-LN tolerates larger learning rates than Pre-LN.

Claim (Magneto §2 and its learning-rate experiments): adding a LayerNorm inside each sublayer (before the
attention output projection and before the FFN's second matrix) and scaling the initialisation by
γ = sqrt(log 2N) makes training stable at learning rates where Pre-LN becomes unstable, and gives a lower
loss at the rates where both train.

Here: byte-level causal LMs on the built-in corpus, the same width, depth, steps, warm-up and seed for
both; a learning-rate sweep. A run *fails* when its loss becomes non-finite or ends above 4.5 nats/byte
(a unigram byte model reaches about 3.3; uniform guessing is ln 259 = 5.56).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import scaleformer as sf
from scaleformer.plots import save
from scaleformer.reproduce.common import Progress, Verdict, figure, override, train, write_outputs

SCHEMES = ("pre", "subln")
FAILED = 4.5  # nats/byte: a run that ends above this did not train


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"lrs": [3e-3, 3e-2], "layers": 4, "width": 32, "steps": 60, "warmup": 5, "seq_len": 32, "batch_size": 8}
    return {"lrs": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], "layers": 12, "width": 64, "steps": 200, "warmup": 10,
            "seq_len": 64, "batch_size": 8}


def reproduce(*, quick: bool, out: Path, seed: int, device: str,
              overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    s = override(settings(quick), overrides)
    runs = []
    with Progress(len(s["lrs"]) * len(SCHEMES) * s["steps"]) as progress:
        for lr in s["lrs"]:
            for scheme in SCHEMES:
                cfg = sf.transformer(vocab_size=259, embed_dim=s["width"], heads=4, ffn_dim=4 * s["width"],
                                     layers=s["layers"], norm=scheme, position="rope")
                record = train(cfg, steps=s["steps"], lr=lr, warmup=s["warmup"], seed=seed, device=device,
                               batch_size=s["batch_size"], seq_len=s["seq_len"], progress=progress,
                               label=f"{scheme} lr {lr:g}")
                failed = record["diverged_at"] is not None or not record["final_loss"] < FAILED
                runs.append({"scheme": scheme, "lr": lr, "final_loss": record["final_loss"],
                             "diverged_at": record["diverged_at"], "failed": failed,
                             "losses": record["losses"][:: max(1, s["steps"] // 100)]})
                progress.write(f"  {scheme:>6} lr {lr:g}: final loss {record['final_loss']:.3f}"
                               + (" (failed)" if failed else ""))
    verdicts = _verdicts(runs, s["lrs"])
    payload = {"reproduction": "subln", "quick": quick, "settings": s, "runs": runs}
    write_outputs(out, "subln", payload, verdicts)
    _plot(runs, out)
    return {**payload, "verdicts": verdicts}


def _verdicts(runs: list[dict[str, Any]], lrs: list[float]) -> list[Verdict]:
    at = {(r["scheme"], r["lr"]): r for r in runs}
    stable = {scheme: max((lr for lr in lrs if not at[scheme, lr]["failed"]), default=None) for scheme in SCHEMES}
    both = [lr for lr in lrs if not at["pre", lr]["failed"] and not at["subln", lr]["failed"]]
    held_stability = None if stable["subln"] is None else stable["pre"] is None or stable["subln"] >= stable["pre"]
    verdicts = [Verdict("Sub-LN trains at learning rates where Pre-LN fails (or at least as high)",
                        f"largest learning rate that trained: Pre-LN {stable['pre']}, Sub-LN {stable['subln']} "
                        f"(of {lrs})", held_stability if stable["pre"] != stable["subln"] else None)]
    if both:
        lr = max(both)
        pre, sub = at["pre", lr]["final_loss"], at["subln", lr]["final_loss"]
        verdicts.append(Verdict(f"at the largest rate both train ({lr:g}), Sub-LN's loss is lower",
                                f"final loss Sub-LN {sub:.3f} vs Pre-LN {pre:.3f}; differences under 0.05 nats count "
                                "as undecided", True if pre - sub > 0.05 else False if sub - pre > 0.05 else None,
                                evidence=(sub, pre)))
    return verdicts


def _plot(runs: list[dict[str, Any]], out: Path) -> None:
    fig, axis = figure(1)
    for scheme in SCHEMES:
        mine = [r for r in runs if r["scheme"] == scheme]
        axis.plot([r["lr"] for r in mine], [min(r["final_loss"], 6.0) if r["final_loss"] == r["final_loss"] else 6.0
                                            for r in mine], "o-", label=scheme)
    axis.axhline(FAILED, color="grey", linestyle=":", label="failed above")
    axis.set(xscale="log", xlabel="learning rate", ylabel="final training loss (nats/byte; 6 = diverged)",
             title="learning-rate sweep")
    axis.legend()
    save(fig, out / "subln.png")
