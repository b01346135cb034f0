"""X-MoE (arXiv 2204.09179): X-MoE routes more consistently than softmax routing.

Claim (X-MoE §4 and its routing-fluctuation analysis): softmax (Switch/GShard-style) routing keeps
changing which expert a token goes to as training goes on; X-MoE — scoring tokens against expert
embeddings on a low-dimensional hypersphere, with a learnable temperature — fluctuates less, balances load
as well, and reaches a comparable or better perplexity.

Here: byte-level causal LMs with a top-1 MoE FFN in every layer, identical except the router. On a fixed
probe batch we record each token's first-choice expert at snapshots through training; the routing
fluctuation between two snapshots is the fraction of (token, layer) pairs whose expert changed. Load
imbalance is the busiest expert's share of first choices times the number of experts (1 = perfectly even).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import scaleformer as sf
from scaleformer.config import ConfigError
from scaleformer.layers.moe import moe_layers
from scaleformer.plots import save
from scaleformer.reproduce.common import Progress, Verdict, figure, override, probe_batch, train, write_outputs

ROUTERS = ("softmax", "xmoe")
MARGIN = 0.05  # nats


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"steps": 60, "snapshots": 4, "width": 32, "layers": 2, "experts": 4, "seq_len": 32, "batch_size": 8,
                "lr": 3e-3}
    return {"steps": 400, "snapshots": 8, "width": 64, "layers": 4, "experts": 8, "seq_len": 64, "batch_size": 8,
            "lr": 2e-3}


@torch.no_grad()
def first_choices(model: torch.nn.Module, probe: torch.Tensor) -> torch.Tensor:
    """(layers, tokens) the first-choice expert of every probe token in every MoE layer."""
    choices: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(
        lambda module, args, output: choices.append(module.router(args[0].reshape(-1, args[0].shape[-1]))[0].argmax(-1)))
        for layer in moe_layers(model)]
    was_training = model.training
    model.eval()
    model(probe)
    model.train(was_training)
    for hook in hooks:
        hook.remove()
    return torch.stack(choices)


def reproduce(*, quick: bool, out: Path, seed: int, device: str,
              overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    s = override(settings(quick), overrides)
    probe = probe_batch(s["seq_len"], count=8).to(device)
    if s["snapshots"] > s["steps"]:
        raise ConfigError(f"setting `snapshots` ({s['snapshots']}) must be at most `steps` ({s['steps']}): the routing "
                          "is recorded every steps/snapshots steps")
    every = s["steps"] // s["snapshots"]
    runs = {}
    progress = Progress(len(ROUTERS) * s["steps"])
    for router in ROUTERS:
        snapshots: dict[int, torch.Tensor] = {}

        def snapshot(step: int, model: torch.nn.Module) -> None:
            if step % every == 0:
                snapshots[step] = first_choices(model, probe).cpu()

        moe = sf.MoEConfig(experts=s["experts"], top_k=1, every=1, router=router, capacity_factor=1.25,
                           eval_capacity_factor=None)
        cfg = sf.transformer(vocab_size=259, embed_dim=s["width"], heads=4, ffn_dim=2 * s["width"], layers=s["layers"],
                             position="rope", moe=moe)
        record = train(cfg, steps=s["steps"], lr=s["lr"], warmup=20, seed=seed, device=device,
                       batch_size=s["batch_size"], seq_len=s["seq_len"], callback=snapshot, progress=progress,
                       label=f"{router} routing")
        steps = sorted(snapshots)
        fluctuation = {b: float((snapshots[a] != snapshots[b]).float().mean()) for a, b in zip(steps, steps[1:])}
        last = snapshots[steps[-1]]
        shares = torch.stack([torch.bincount(layer, minlength=s["experts"]).float() / layer.numel() for layer in last])
        runs[router] = {"final_loss": record["final_loss"], "fluctuation": fluctuation,
                        "imbalance": float((shares.max(1).values * s["experts"]).mean()),
                        "losses": record["losses"][:: max(1, s["steps"] // 100)]}
        progress.write(f"  {router:>7}: final loss {record['final_loss']:.3f}, fluctuation "
                       + ", ".join(f"{k}: {v:.3f}" for k, v in fluctuation.items())
                       + f", imbalance {runs[router]['imbalance']:.2f}")
    progress.close()
    verdicts = _verdicts(runs)
    payload = {"reproduction": "xmoe", "quick": quick, "settings": s, "runs": runs}
    write_outputs(out, "xmoe", payload, verdicts)
    _plot(runs, out)
    return {**payload, "verdicts": verdicts}


def _late(run: dict[str, Any]) -> float:
    """Mean fluctuation over the second half of training (routing right after initialisation moves anyway)."""
    values = list(run["fluctuation"].values())
    late = values[len(values) // 2:]
    return sum(late) / len(late)


def _verdicts(runs: dict[str, dict[str, Any]]) -> list[Verdict]:
    soft, x = runs["softmax"], runs["xmoe"]
    fluct_soft, fluct_x = _late(soft), _late(x)
    loss_gap = x["final_loss"] - soft["final_loss"]
    return [
        Verdict("X-MoE's routing fluctuates less than softmax routing",
                f"share of tokens changing expert between snapshots, second half of training: X-MoE {fluct_x:.3f}, "
                f"softmax {fluct_soft:.3f} (held below 0.9×, did not hold above 1.1×)",
                True if fluct_x < 0.9 * fluct_soft else False if fluct_x > 1.1 * fluct_soft else None,
                evidence=(fluct_x, fluct_soft)),
        Verdict("at a comparable loss",
                f"final loss X-MoE {x['final_loss']:.3f}, softmax {soft['final_loss']:.3f} (comparable: within {MARGIN} "
                "nats, or lower)", bool(loss_gap <= MARGIN), evidence=(loss_gap, MARGIN)),
        Verdict("and balances load as well",
                f"load imbalance (busiest expert's share × experts; 1 = even) X-MoE {x['imbalance']:.2f}, softmax "
                f"{soft['imbalance']:.2f} (held within 1.1× of softmax or better)",
                bool(x["imbalance"] <= 1.1 * soft["imbalance"]), evidence=(x["imbalance"], 1.1 * soft["imbalance"])),
    ]


def _plot(runs: dict[str, dict[str, Any]], out: Path) -> None:
    fig, (fluct_axis, loss_axis) = figure(2)
    for router, run in runs.items():
        fluct_axis.plot([int(k) for k in run["fluctuation"]], list(run["fluctuation"].values()), "o-", label=router)
        loss_axis.plot(range(len(run["losses"])), run["losses"], label=router)
    fluct_axis.set(xlabel="step", ylabel="share of tokens changing expert", title="routing fluctuation")
    loss_axis.set(xlabel="logged step (every 1/100 of training)", ylabel="training loss (nats/byte)", title="loss")
    fluct_axis.legend()
    save(fig, out / "xmoe.png")
