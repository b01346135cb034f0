"""Zoology (arXiv 2312.04927): attention solves multi-query associative recall at every width.

Claim (Zoology §3 and Figure 2): on MQAR — key–value pairs, then the keys asked again — attention reaches
near-perfect accuracy at every model dimension, while the efficient mixers with a fixed-size recurrent
state (gated convolutions, linear attention, RetNet among them) fall short, and need a model dimension
that grows with the number of pairs to be recalled.

Here: two-layer models of each mixer, at each width and number of pairs, trained on fresh MQAR batches
(:func:`scaleformer.tasks.mqar`, the same batches for every model) with the same step budget, learning
rate and seed, and scored on a held-out set of examples. A run stops early once its held-out accuracy
reaches ``stop_at``: it has solved the task, and more steps would only spend the budget. The layout is
Zoology's Figure 2: accuracy against model width, one panel per number of pairs, one line per mixer.
``lrs`` (e.g. ``--set 'lrs=[0.001,0.003]'``) trains every point at each learning rate and keeps the best,
as Zoology does; the default is the single ``lr``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import scaleformer as sf
from scaleformer.config import ConfigBase, ConfigError
from scaleformer.plots import save
from scaleformer.reproduce.common import Progress, Verdict, best_rate, figure, override, train, write_outputs
from scaleformer.tasks import accuracy, mqar

HELD_OUT_SEED = 2**40  # the held-out examples' seed (training batches use seed·10⁶ + step)
SOLVED = 0.9  # "solves MQAR": held-out accuracy at least this


def _attention(width: int, heads: int, layers: int, vocab_size: int, length: int, **knobs: Any) -> ConfigBase:
    return sf.transformer(vocab_size=vocab_size, embed_dim=width, heads=heads, ffn_dim=4 * width, layers=layers,
                          position="rope", **knobs)


def _retnet(width: int, heads: int, layers: int, vocab_size: int, length: int, **knobs: Any) -> ConfigBase:
    # The RetNet paper's proportions (value dimension and FFN 2× the width) keep its parameter count
    # within 15% of the Transformer's at every width.
    return sf.retnet(vocab_size=vocab_size, embed_dim=width, value_dim=2 * width, heads=heads, ffn_dim=2 * width,
                     layers=layers, **knobs)


def _gated_retention(width: int, heads: int, layers: int, vocab_size: int, length: int) -> ConfigBase:
    # RetNet's sizes with YOCO's gated decays (one per head and token) and no row normalizer.
    return _retnet(width, heads, layers, vocab_size, length, decay="gated", normalizer="none")


def _diff_attention(width: int, heads: int, layers: int, vocab_size: int, length: int) -> ConfigBase:
    # DIFF Transformer at the attention model's size: heads/2 differential heads of two components each,
    # as wide as the attention model's heads (the paper's matching; same projections, same parameters).
    return _attention(width, heads, layers, vocab_size, length, attention="diff")


def _yoco(width: int, heads: int, layers: int, vocab_size: int, length: int) -> ConfigBase:
    # YOCO: half the layers gated retention, half cross-decoder attention on one shared key/value set (as
    # many key/value heads as query heads here); SwiGLU of 8/3 · width keeps the MLP's parameters.
    return sf.yoco(vocab_size=vocab_size, embed_dim=width, layers=max(layers, 2), self_heads=heads, heads=heads,
                   kv_heads=heads, ffn_dim=8 * width // 3)


def _lightning(width: int, heads: int, layers: int, vocab_size: int, length: int) -> ConfigBase:
    # TransNormerLLM's layer (constant per-head decays, OpenNLPLab's formula) with its SGLU of 8/3 · width.
    return sf.ModelConfig(vocab_size=vocab_size, embed_dim=width, position=sf.NoPosition(), norm_type="rmsnorm",
                          layers=sf.uniform(sf.LayerConfig(mixer=sf.Lightning(heads=heads),
                                                           ffn=sf.GLU(ffn_dim=8 * width // 3, activation="none",
                                                                      bias=False)), layers))


def _delta(kind: type, width: int, heads: int, layers: int, vocab_size: int) -> ConfigBase:
    # fla's proportions: key and value heads of width/heads, SwiGLU of 8/3 · width, RMSNorm, no positions
    mixer = kind(heads=heads, key_dim=width // heads, value_dim=width // heads)
    return sf.ModelConfig(vocab_size=vocab_size, embed_dim=width, position=sf.NoPosition(), norm_type="rmsnorm",
                          layers=sf.uniform(sf.LayerConfig(mixer=mixer, ffn=sf.GLU(ffn_dim=8 * width // 3, bias=False)),
                                            layers))


def _deltanet(width: int, heads: int, layers: int, vocab_size: int, length: int) -> ConfigBase:
    return _delta(sf.DeltaNet, width, heads, layers, vocab_size)


def _gated_deltanet(width: int, heads: int, layers: int, vocab_size: int, length: int) -> ConfigBase:
    return _delta(sf.GatedDeltaNet, width, heads, layers, vocab_size)


def _mamba2(width: int, heads: int, layers: int, vocab_size: int, length: int) -> ConfigBase:
    # mamba_ssm's block (the SSD mixer alone) at twice the layers, which matches a Transformer's parameters;
    # expand 2 and `heads` heads (head dim 2·width/heads), state 16 per head channel
    return sf.mamba2_lm(vocab_size=vocab_size, embed_dim=width, layers=2 * layers, state_dim=16,
                        head_dim=2 * width // heads)


def _diff_attention_v2(width: int, heads: int, layers: int, vocab_size: int, length: int) -> ConfigBase:
    # DIFF V2 at the attention model's heads and head width: twice its query heads, paired, and W_λ
    return _attention(width, heads, layers, vocab_size, length, attention="diff2")


def _samba(width: int, heads: int, layers: int, vocab_size: int, length: int) -> ConfigBase:
    # Samba's alternation over `layers` blocks (Mamba-2 then sliding-window attention, each with a SwiGLU of
    # 8/3 · width), Mamba-2 as in _mamba2; the window a quarter of the sequence, so the attention is local
    # and recalling a pair from further back needs the Mamba-2 state (a fixed state: window plus SSM)
    return sf.samba(vocab_size=vocab_size, embed_dim=width, layers=layers, heads=heads, window=length // 4,
                    state_dim=16, head_dim=2 * width // heads)


def _jamba(width: int, heads: int, layers: int, vocab_size: int, length: int) -> ConfigBase:
    # Jamba's layout at 2·layers blocks (the Mamba-2 model's depth; fewer than Jamba's period of 8): one
    # full-attention layer, block `layers` (the third of four), Mamba-2 elsewhere, every second block's SwiGLU
    # a mixture of 4 experts, top-2
    return sf.jamba(vocab_size=vocab_size, embed_dim=width, layers=2 * layers, attention_offset=layers, heads=heads,
                    kv_heads=heads, state_dim=16, head_dim=2 * width // heads)


def _gdn_hybrid(width: int, heads: int, layers: int, vocab_size: int, length: int) -> ConfigBase:
    # Qwen3-Next's 3:1 at 2·layers blocks: Gated DeltaNet as in _gated_deltanet, the last of each four gated
    # full attention with RoPE
    return sf.delta_rule_lm(vocab_size=vocab_size, embed_dim=width, layers=2 * layers, heads=heads,
                            head_dim=width // heads, attention_every=4, attention_heads=heads, attention_kv_heads=heads)


def _yoco_mamba2(width: int, heads: int, layers: int, vocab_size: int, length: int) -> ConfigBase:
    # YOCO as in _yoco with a Mamba-2 self-decoder (2·heads heads of width/heads, state 16)
    return sf.yoco(vocab_size=vocab_size, embed_dim=width, layers=max(layers, 2), self_decoder="mamba2",
                   self_heads=heads, heads=heads, kv_heads=heads, ffn_dim=8 * width // 3, state_dim=16)


# A new mixer joins the comparison with one entry here (and in FIXED_STATE if its state does not grow).
MIXERS: dict[str, Callable[..., ConfigBase]] = {"attention": _attention, "retnet": _retnet,
                                                 "gated_retention": _gated_retention, "diff_attention": _diff_attention,
                                                 "diff_attention_v2": _diff_attention_v2,
                                                 "yoco": _yoco, "lightning": _lightning, "deltanet": _deltanet,
                                                 "gated_deltanet": _gated_deltanet, "mamba2": _mamba2,
                                                 "samba": _samba, "jamba": _jamba, "gdn_hybrid": _gdn_hybrid,
                                                 "yoco_mamba2": _yoco_mamba2}
# Samba's sliding window keeps a bounded cache: its state is fixed too
FIXED_STATE = {"retnet", "gated_retention", "lightning", "deltanet", "gated_deltanet", "mamba2", "samba"}


def settings(quick: bool) -> dict[str, Any]:
    common = {"mixers": ["attention", "retnet"], "length": 64, "vocab_size": 64, "layers": 2, "heads": 2,
              "batch_size": 64, "lr": 3e-3, "lrs": [], "warmup": 50, "eval_every": 100, "eval_examples": 500,
              "stop_at": 0.99}
    if quick:
        return {**common, "widths": [32], "pairs": [8], "steps": 1000}
    return {**common, "widths": [32, 48, 64], "pairs": [4, 16], "steps": 1200}


def reproduce(*, quick: bool, out: Path, seed: int, device: str,
              overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    s = override(settings(quick), overrides)
    unknown = [m for m in s["mixers"] if m not in MIXERS]
    if unknown:
        raise ConfigError(f"unknown mixer {unknown[0]!r}; mixers: {', '.join(MIXERS)}")
    if not all(isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0 for lr in s["lrs"]):
        raise ConfigError(f"lrs takes a list of positive learning rates, got {s['lrs']!r}")
    # Zoology's protocol: train every point at each learning rate of the sweep and keep the best.
    rates = [float(lr) for lr in s["lrs"]] or [s["lr"]]
    runs = []
    planned = len(s["pairs"]) * len(s["mixers"]) * len(s["widths"]) * len(rates) * s["steps"]
    with Progress(planned) as progress:  # runs that solve the task early take their unrun steps off the plan
        for pairs in s["pairs"]:
            task = {"vocab_size": s["vocab_size"], "length": s["length"], "pairs": pairs}
            held_out = mqar(s["eval_examples"], seed=HELD_OUT_SEED + seed, **task)
            for mixer in s["mixers"]:
                for width in s["widths"]:
                    cfg = MIXERS[mixer](width, s["heads"], s["layers"], s["vocab_size"], s["length"])
                    tried = {lr: _train_one(cfg, task, held_out, s, seed, device, lr, progress,
                                            f"{mixer} width {width}, {pairs} pairs, lr {lr:g}") for lr in rates}
                    lr, run, by_lr = best_rate(tried, "accuracy", higher=True)
                    runs.append({"mixer": mixer, "width": width, "pairs": pairs, "lr": lr, **run,
                                 "accuracy_by_lr": by_lr})
                    sweep = f", best of lrs {', '.join(f'{r:g}' for r in rates)}" if len(rates) > 1 else ""
                    progress.write(f"  pairs {pairs:>3}  {mixer:>9}  width {width:>4}: accuracy {run['accuracy']:.3f} "
                                   f"(95% CI {run['low']:.3f}–{run['high']:.3f}) after {run['steps']} steps at lr "
                                   f"{lr:g}{sweep}, {run['parameters']:,} parameters")
    verdicts = _verdicts(runs, s)
    payload = {"reproduction": "mqar", "quick": quick, "settings": s, "runs": runs}
    write_outputs(out, "mqar", payload, verdicts)
    _plot(runs, s, out)
    return {**payload, "verdicts": verdicts}


def _train_one(cfg: ConfigBase, task: dict[str, int], held_out: Any, s: dict[str, Any], seed: int,
               device: str, lr: float, progress: Progress, label: str) -> dict[str, Any]:
    """Train one model on fresh MQAR batches; its held-out accuracy every ``eval_every`` steps."""
    curve: dict[int, float] = {}

    def batches(step: int):
        batch = mqar(s["batch_size"], seed=seed * 10**6 + step, **task)
        return batch.inputs, batch.labels

    def evaluate(step: int, model) -> bool:
        if step % s["eval_every"] and step != s["steps"]:
            return False
        curve[step] = accuracy(model, held_out, batch_size=250).value
        return curve[step] >= s["stop_at"]

    record = train(cfg, steps=s["steps"], lr=lr, warmup=s["warmup"], seed=seed, device=device,
                   batches=batches, callback=evaluate, progress=progress, label=label)
    final = accuracy(record["model"], held_out, batch_size=250)
    return {"accuracy": final.value, "low": final.low, "high": final.high, "steps": record["steps"],
            "parameters": record["parameters"], "diverged_at": record["diverged_at"],
            "curve": {str(k): v for k, v in curve.items()},
            "losses": record["losses"][:: max(1, len(record["losses"]) // 100)]}


def _verdicts(runs: list[dict[str, Any]], s: dict[str, Any]) -> list[Verdict]:
    def acc(mixer: str, width: int, pairs: int) -> float:
        return next(r["accuracy"] for r in runs if (r["mixer"], r["width"], r["pairs"]) == (mixer, width, pairs))

    verdicts = []
    if "attention" in s["mixers"]:
        worst = min((r for r in runs if r["mixer"] == "attention"), key=lambda r: r["accuracy"])
        verdicts.append(Verdict(
            "attention solves MQAR at every model width",
            f"lowest attention accuracy {worst['accuracy']:.3f} (width {worst['width']}, {worst['pairs']} pairs) "
            f"over widths {s['widths']} × pairs {s['pairs']} (held: every point ≥ {SOLVED})",
            bool(worst["accuracy"] >= SOLVED)))
    for mixer in (m for m in s["mixers"] if m in FIXED_STATE):
        verdicts.append(_fixed_state_verdict(mixer, acc, s))
    for hybrid, base in HYBRID_BASES.items():
        if hybrid in s["mixers"] and base in s["mixers"] and "attention" in s["mixers"]:
            verdicts.append(_hybrid_verdict(hybrid, base, acc, s))
    return verdicts


#: each hybrid and the fixed-state mixer it adds attention to
HYBRID_BASES = {"jamba": "mamba2", "samba": "mamba2", "yoco_mamba2": "mamba2", "gdn_hybrid": "gated_deltanet"}
GAP = 0.1  # a point where attention beats the fixed-state mixer by less than this has no gap to close


def _hybrid_verdict(hybrid: str, base: str, acc: Callable[[str, int, int], float], s: dict[str, Any]) -> Verdict:
    """The hybrids' claim: a little attention closes most of the fixed-state mixer's gap to attention, i.e. at
    every point where attention beats ``base`` by at least GAP, ``hybrid`` recovers at least half of it."""
    claim = f"{hybrid} (a little attention added to {base}) closes most of {base}'s gap to attention"
    closed = {}
    for width in s["widths"]:
        for pairs in s["pairs"]:
            gap = acc("attention", width, pairs) - acc(base, width, pairs)
            if gap >= GAP:
                closed[width, pairs] = (acc(hybrid, width, pairs) - acc(base, width, pairs)) / gap
    table = "; ".join(f"w{w} {p} pairs: attention {acc('attention', w, p):.2f}, {base} {acc(base, w, p):.2f}, "
                      f"{hybrid} {acc(hybrid, w, p):.2f}" for w in s["widths"] for p in s["pairs"])
    if not closed:
        return Verdict(claim, f"{table} (no point where attention leads {base} by {GAP} or more: nothing to close)",
                       None)
    fractions = ", ".join(f"w{w} {p} pairs {fraction:.0%}" for (w, p), fraction in closed.items())
    measured = f"{table}; share of the gap closed: {fractions} (held: at least half at every such point)"
    return Verdict(claim, measured, all(fraction >= 0.5 for fraction in closed.values()))


def _fixed_state_verdict(mixer: str, acc: Callable[[str, int, int], float], s: dict[str, Any]) -> Verdict:
    """A fixed-state mixer falls short of attention and needs more width as the pairs grow: at the
    narrowest width its accuracy drops as pairs are added, and at the most pairs widening raises it."""
    claim = f"{mixer} (a fixed-size state) needs more width as the number of pairs grows, where attention does not"
    points = {(w, p): acc(mixer, w, p) for w in s["widths"] for p in s["pairs"]}
    solved = {p: next((w for w in s["widths"] if points[w, p] >= SOLVED), None) for p in s["pairs"]}
    table = "; ".join(f"{p} pairs: " + ", ".join(f"w{w} {points[w, p]:.2f}" for w in s["widths"]) for p in s["pairs"])
    if len(s["widths"]) < 2 or len(s["pairs"]) < 2:
        return Verdict(claim, f"{table} (needs at least two widths and two pair counts to decide)", None)
    narrow, wide, few, many = min(s["widths"]), max(s["widths"]), min(s["pairs"]), max(s["pairs"])
    drops_with_pairs = points[narrow, few] - points[narrow, many]
    gains_with_width = points[wide, many] - points[narrow, many]
    measured = (f"{table}; narrowest width solving it (≥ {SOLVED}): "
                + ", ".join(f"{p} pairs → {solved[p] or 'none'}" for p in s["pairs"])
                + f"; at width {narrow} accuracy goes {points[narrow, few]:.2f} → {points[narrow, many]:.2f} from "
                f"{few} to {many} pairs, at {many} pairs widening {narrow} → {wide} takes it "
                f"{points[narrow, many]:.2f} → {points[wide, many]:.2f} "
                "(held: a fall with pairs and a gain with width, each > 0.05; did not hold: it solves every point)")
    if all(value >= SOLVED for value in points.values()):
        return Verdict(claim, measured, False)
    return Verdict(claim, measured, True if drops_with_pairs > 0.05 and gains_with_width > 0.05 else None)


def _plot(runs: list[dict[str, Any]], s: dict[str, Any], out: Path) -> None:
    fig, axes = figure(len(s["pairs"]))
    axes = axes if len(s["pairs"]) > 1 else [axes]
    for axis, pairs in zip(axes, s["pairs"]):
        for mixer in s["mixers"]:
            points = sorted((r["width"], r["accuracy"]) for r in runs if r["mixer"] == mixer and r["pairs"] == pairs)
            axis.plot([w for w, _ in points], [a for _, a in points], "o-", label=mixer)
        axis.set(xscale="log", xlabel="model width", ylabel="MQAR accuracy", ylim=(0, 1.02),
                 title=f"{pairs} pairs, length {s['length']}")
        axis.minorticks_off()
        axis.set_xticks(s["widths"], [str(w) for w in s["widths"]])
        axis.legend()
    save(fig, out / "mqar.png")
