"""RetNet (arXiv 2307.08621): retention matches attention at equal size and decodes at O(1) cost.

Claims: RetNet's perplexity is comparable to a Transformer of the same size (§3.2, Figure 5, at 1.3B and
up); its decoding cost per token and its cache do not grow with the context (§3.4, Figure 6); and each
part of retention matters — removing the swish gate, the group norm, the decay, or the multi-scale decay
(one γ for every head) each raises perplexity (Table 5).

Here: byte-level LMs on the built-in corpus: a RetNet and a Transformer (RoPE, SwiGLU, RMSNorm, the FFN
width chosen to match the RetNet's parameter count within 2%), and the four RetNet ablations, each a
one-field change of its layer config. The same steps, learning rate and seed for all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import scaleformer as sf
from scaleformer.compare import decoding_cost
from scaleformer.plots import save
from scaleformer.bench.common import Timing, ratio_interval
from scaleformer.reproduce.common import Progress, Verdict, figure, override, train_best, write_outputs

ABLATIONS = {"− swish gate": dict(gate=False), "− group norm": dict(head_norm=False), "− γ decay": dict(decay="none"),
             "− multi-scale decay": dict(decay="shared")}
MARGIN = 0.05  # nats


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"width": 32, "layers": 2, "steps": 60, "seq_len": 32, "batch_size": 8, "lr": 3e-3, "lrs": [],
                "contexts": [64, 256], "decode_steps": 8, "rounds": 5}
    return {"width": 64, "layers": 4, "steps": 300, "seq_len": 64, "batch_size": 8, "lr": 2e-3, "lrs": [],
            "contexts": [128, 512, 2048], "decode_steps": 16, "rounds": 7}


def _retnet(s: dict[str, Any], **ablation: Any) -> sf.ModelConfig:
    layer = sf.LayerConfig(mixer=sf.Retention(heads=2, value_dim=2 * s["width"], **ablation),
                           ffn=sf.GLU(ffn_dim=2 * s["width"], bias=False))
    return sf.ModelConfig(vocab_size=259, embed_dim=s["width"], layers=sf.uniform(layer, s["layers"]),
                          position=sf.NoPosition(), norm_type="rmsnorm", norm_eps=1e-6, scale_embeddings=True)


def _transformer(s: dict[str, Any], parameters: int) -> sf.ModelConfig:
    """The Transformer whose FFN width brings its parameter count closest to ``parameters``."""
    def make(ffn: int) -> sf.ModelConfig:
        layer = sf.LayerConfig(mixer=sf.Attention(heads=4, bias=False), ffn=sf.GLU(ffn_dim=ffn, bias=False))
        return sf.ModelConfig(vocab_size=259, embed_dim=s["width"], layers=sf.uniform(layer, s["layers"]),
                              position=sf.RoPE(), norm_type="rmsnorm", norm_eps=1e-6)

    def count(cfg: sf.ModelConfig) -> int:
        return sum(p.numel() for p in sf.build(cfg).parameters())

    return min((make(ffn) for ffn in range(s["width"], 8 * s["width"] + 1, 4)), key=lambda c: abs(count(c) - parameters))


def reproduce(*, quick: bool, out: Path, seed: int, device: str,
              overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    s = override(settings(quick), overrides)
    # every model at each rate of `lrs` (if any), keeping its best: Zoology's protocol
    common = dict(steps=s["steps"], lr=s["lr"], lrs=s["lrs"], warmup=20, seed=seed, device=device,
                  batch_size=s["batch_size"], seq_len=s["seq_len"])
    runs: dict[str, dict[str, Any]] = {}
    with Progress((2 + len(ABLATIONS)) * s["steps"] * max(1, len(s["lrs"]))) as progress:
        retnet = train_best(_retnet(s), **common, progress=progress, label="RetNet")
        transformer = train_best(_transformer(s, retnet["parameters"]), **common, progress=progress,
                                 label="Transformer")
        for name, record in (("RetNet", retnet), ("Transformer", transformer)):
            progress.begin(f"{name}: timing decode steps")
            runs[name] = _summary(record, decoding_cost(record["model"], s["contexts"], s["decode_steps"],
                                                        rounds=s["rounds"]))
        for name, ablation in ABLATIONS.items():
            runs[f"RetNet {name}"] = _summary(train_best(_retnet(s, **ablation), **common, progress=progress,
                                                         label=f"RetNet {name}"), [])
    for name, run in runs.items():
        print(f"  {name:>28}: {run['parameters']:,} parameters, final loss {run['final_loss']:.3f}", flush=True)
    verdicts = _verdicts(runs)
    payload = {"reproduction": "retnet", "quick": quick, "settings": s, "runs": runs}
    write_outputs(out, "retnet", payload, verdicts)
    _plot(runs, out)
    return {**payload, "verdicts": verdicts}


def _summary(record: dict[str, Any], decoding: list[dict[str, Any]]) -> dict[str, Any]:
    return {"parameters": record["parameters"], "final_loss": record["final_loss"], "diverged_at": record["diverged_at"],
            "losses": record["losses"], "decoding": decoding, "lr": record["lr"],
            "final_loss_by_lr": record["final_loss_by_lr"]}


def _versus(lower: float, higher: float) -> bool | None:
    return True if higher - lower > MARGIN else False if lower - higher > MARGIN else None


def _growth(decoding: list[dict[str, Any]]) -> tuple[float, float, float]:
    """How much slower a decode step is after the longest prompt than after the shortest: the ratio of the
    medians, and the widest ratio the two interquartile ranges allow."""
    first, last = decoding[0], decoding[-1]
    return ratio_interval(Timing(tuple(last["rounds_ms"])), Timing(tuple(first["rounds_ms"])))


def _decode_time_verdict(retnet: list[dict[str, Any]], transformer: list[dict[str, Any]]) -> Verdict:
    """Held when RetNet's slow-down with the context is below the Transformer's beyond the noise (the two
    ratio intervals do not overlap) and the Transformer's is a slow-down (its interval above 1); did not
    hold when RetNet's is above the Transformer's beyond the noise; undecided otherwise."""
    ret, tf = _growth(retnet), _growth(transformer)

    def cell(row: dict[str, Any]) -> str:
        return f"{row['step_ms']:.3f} (IQR {row['step_ms_q25']:.3f}–{row['step_ms_q75']:.3f})"

    measured = (f"median ms per token over {retnet[0]['rounds']} rounds at {retnet[0]['context']} → "
                f"{retnet[-1]['context']}: RetNet {cell(retnet[0])} → {cell(retnet[-1])}, Transformer "
                f"{cell(transformer[0])} → {cell(transformer[-1])}; slow-down RetNet {ret[0]:.2f}× "
                f"({ret[1]:.2f}–{ret[2]:.2f}), Transformer {tf[0]:.2f}× ({tf[1]:.2f}–{tf[2]:.2f}) (held: RetNet's "
                "interval wholly below the Transformer's, which is above 1; overlapping intervals are undecided)")
    held = True if ret[2] < tf[1] and tf[1] > 1 else False if ret[1] > tf[2] else None
    return Verdict("RetNet's decode step does not slow down with the context; a Transformer's does", measured, held)


def _verdicts(runs: dict[str, dict[str, Any]]) -> list[Verdict]:
    ret, tf = runs["RetNet"], runs["Transformer"]
    gap = ret["final_loss"] - tf["final_loss"]
    first, last = ret["decoding"][0], ret["decoding"][-1]
    tf_first, tf_last = tf["decoding"][0], tf["decoding"][-1]
    verdicts = [
        Verdict("RetNet's loss matches a Transformer of the same size",
                f"final loss RetNet {ret['final_loss']:.3f} ({ret['parameters']:,} parameters) vs Transformer "
                f"{tf['final_loss']:.3f} ({tf['parameters']:,}); within {MARGIN} nats counts as matching",
                True if gap <= MARGIN else False, evidence=(gap, MARGIN)),
        Verdict("RetNet's decoding cache does not grow with the context; a Transformer's does",
                f"cache MB at {first['context']} → {last['context']} tokens: RetNet {first['cache_mb']:.3f} → "
                f"{last['cache_mb']:.3f}, Transformer {tf_first['cache_mb']:.3f} → {tf_last['cache_mb']:.3f}",
                bool(last["cache_mb"] == first["cache_mb"] and tf_last["cache_mb"] > tf_first["cache_mb"])),
        _decode_time_verdict(ret["decoding"], tf["decoding"]),
    ]
    for name in ABLATIONS:
        ablated = runs[f"RetNet {name}"]["final_loss"]
        verdicts.append(Verdict(f"RetNet {name} is worse than RetNet (Table 5)",
                                f"final loss {ablated:.3f} vs {ret['final_loss']:.3f}; within {MARGIN} nats is undecided",
                                _versus(ret["final_loss"], ablated), evidence=(ret["final_loss"], ablated)))
    return verdicts


def _plot(runs: dict[str, dict[str, Any]], out: Path) -> None:
    fig, (loss_axis, time_axis, cache_axis) = figure(3)
    for name, run in runs.items():
        losses = run["losses"]
        window = max(1, len(losses) // 20)  # a running mean: single steps are noisy
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        loss_axis.plot(range(1, len(smooth) + 1), smooth, label=name, linestyle="-" if "−" not in name else "--")
    for name in ("RetNet", "Transformer"):
        cost = runs[name]["decoding"]
        time_axis.plot([c["context"] for c in cost], [c["step_ms"] for c in cost], "o-", label=name)
        cache_axis.plot([c["context"] for c in cost], [c["cache_mb"] for c in cost], "o-", label=name)
    loss_axis.set(xlabel="step", ylabel="training loss (nats/byte)", title="loss (running mean)")
    time_axis.set(xscale="log", xlabel="context", ylabel="ms per decoded token", title="decode latency")
    cache_axis.set(xscale="log", xlabel="context", ylabel="cache MB", title="decoding cache")
    for axis in (time_axis, cache_axis):
        contexts = [c["context"] for c in runs["RetNet"]["decoding"]]
        axis.minorticks_off()
        axis.set_xticks(contexts, [str(c) for c in contexts])
    loss_axis.legend(fontsize=7)
    time_axis.legend()
    save(fig, out / "retnet.png")
