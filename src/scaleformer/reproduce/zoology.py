"""Zoology's MQAR protocol (arXiv 2312.04927, Figure 2): accuracy against model width, every mixer.

``scaleformer reproduce mqar --protocol zoology``. The paper's layout and rules, from its code
(``zoology/experiments/paper/zoology_figure2.py`` and its ``paper_configs``):

* MQAR with token 0 between the queries (``random_non_queries=False``), a fixed training set and a test set
  drawn from other seeds; (sequence length, key-value pairs) points as Figure 2's;
* two layers of the mixer and no MLP (Zoology's ``state_mixer`` is the identity); attention with one head,
  attention dropout 0.1 and learned positions; every other mixer as :mod:`scaleformer.reproduce.mqar`
  builds it, its feed-forward layers removed, at the same two layers (a hybrid: one recurrent layer and
  one attention layer);
* AdamW with weight decay 0.1 and a cosine decay of the learning rate to 0 over the run, no warm-up;
  epochs over the training set, reshuffled each epoch; stop once the test accuracy passes 0.99;
* every point trained at each learning rate of the sweep, keeping the best (one difference: once a rate
  passes 0.99, the higher rates are not tried; the best is then above 0.99 whichever it would be);
* accuracy = the share of asked positions whose argmax is the value, over the whole test set.

Each mixer's recurrent state is measured too (the bytes its decoding cache holds after one sequence of
the point's length, in floats), so the table reads as Zoology's argument: a fixed state must grow with
the pairs it recalls. The default size is scaled down for a 2-core CPU and calibrated on it
(docs/leaderboard.md): vocabulary 256, the points (64, 4) and (128, 8), widths 32 and 64, rates 1e-3 and
3e-3, 4,096 training examples for 32 epochs (2,048 steps, which attention needs), 500 test examples.
``--full`` runs the paper's grid.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

import scaleformer as sf
from scaleformer.config import ConfigBase, ConfigError
from scaleformer.plots import pyplot, save
from scaleformer.reproduce.common import Progress, Verdict, best_rate, figure, override, train, write_outputs
from scaleformer.reproduce.mqar import FIXED_STATE, MIXERS
from scaleformer.tasks import TaskBatch, accuracy, mqar

TEST_SEED = 2**40  # test examples' seeds are far from the training set's (Zoology: the other half of the range)
STOP_ABOVE = 0.99  # Zoology's early stop: test accuracy above this

#: the paper's grid (Figure 2; ``--full``)
FULL = {"mixers": list(MIXERS), "vocab_size": 8192, "points": [[64, 4], [128, 8], [256, 16], [512, 64]],
        "batch_sizes": [512, 512, 256, 128], "widths": [64, 128, 256, 512],
        "lrs": [1e-4, 4.641588833612782e-4, 2.1544346900318823e-3, 1e-2], "train_examples": 100_000,
        "test_examples": 3_000, "epochs": 64}


#: the default size's mixers: one of each kind the issue names (attention, RetNet, gated retention,
#: Lightning, DIFF, the delta rule, Mamba-2) and the hybrids of each kind; ``--full`` (or ``--set mixers=``)
#: adds DIFF V2, DeltaNet without gates and YOCO with a Mamba-2 self-decoder
DEFAULT_MIXERS = ["attention", "retnet", "gated_retention", "lightning", "diff_attention", "gated_deltanet", "mamba2",
                  "samba", "jamba", "gdn_hybrid", "yoco"]


def settings(quick: bool) -> dict[str, Any]:
    common = {"mixers": DEFAULT_MIXERS, "layers": 2, "heads": 2, "weight_decay": 0.1}
    if quick:
        return {**common, "mixers": ["attention", "retnet"], "vocab_size": 64, "points": [[64, 4]], "batch_sizes": [64],
                "widths": [32], "lrs": [3e-3], "train_examples": 1024, "test_examples": 200, "epochs": 4}
    # Calibrated on the project's 2-core CPU (docs/leaderboard.md): 2,048 steps a run, which 1-head attention
    # needs to solve (128, 8) (it passes 0.99 after 1,216 at width 32); (256, 16) at that budget would take
    # 1.5-3 h more, and 1,536 steps of 32 left attention at 0.06-0.17 there, so the default stops at (128, 8).
    return {**common, "vocab_size": 256, "points": [[64, 4], [128, 8]], "batch_sizes": [64, 64],
            "widths": [32, 64], "lrs": [1e-3, 3e-3], "train_examples": 4096, "test_examples": 500, "epochs": 32}


def check(s: dict[str, Any]) -> None:
    unknown = [m for m in s["mixers"] if m not in MIXERS]
    if unknown:
        raise ConfigError(f"unknown mixer {unknown[0]!r}; mixers: {', '.join(MIXERS)}")
    if len(s["batch_sizes"]) != len(s["points"]):
        raise ConfigError(f"batch_sizes needs one batch size per point: {len(s['points'])} points, "
                          f"{len(s['batch_sizes'])} batch sizes")
    for point in s["points"]:
        if not (isinstance(point, list) and len(point) == 2 and all(isinstance(x, int) and x > 0 for x in point)):
            raise ConfigError(f"points takes [length, pairs] pairs of positive whole numbers, got {point!r}")
        length, pairs = point
        if length < 4 * pairs or s["vocab_size"] // 2 - 1 < pairs:
            raise ConfigError(f"point [{length}, {pairs}]: {pairs} pairs need length >= {4 * pairs} and "
                              f"vocab_size >= {2 * pairs + 2}")
    if not all(isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0
               for lr in s["lrs"]):
        raise ConfigError(f"lrs takes a list of positive learning rates, got {s['lrs']!r}")


def model(mixer: str, width: int, length: int, s: dict[str, Any]) -> ConfigBase:
    """Zoology's model of ``mixer`` at ``width``: its layers without feed-forward layers; attention with one
    head, attention dropout 0.1 and learned positions (``length`` of them)."""
    from scaleformer.models.families import model_config

    if mixer == "attention":
        cfg = sf.transformer(vocab_size=s["vocab_size"], embed_dim=width, heads=1, ffn_dim=4 * width, layers=s["layers"],
                             position="absolute", max_positions=length, attention_dropout=0.1)
    # The MQAR harness doubles the depth of Mamba-2 and of the hybrids built on it or on the delta rule, to
    # match an MLP they have not; here no model has one, so every model has the same number of mixer layers.
    elif mixer == "mamba2":
        cfg = sf.mamba2_lm(vocab_size=s["vocab_size"], embed_dim=width, layers=s["layers"], state_dim=16,
                           head_dim=2 * width // s["heads"])
    elif mixer == "jamba":  # Mamba-2 blocks with one full-attention block, the last
        cfg = sf.jamba(vocab_size=s["vocab_size"], embed_dim=width, layers=s["layers"],
                       attention_offset=s["layers"] - 1, heads=s["heads"], kv_heads=s["heads"], state_dim=16,
                       head_dim=2 * width // s["heads"])
    elif mixer == "gdn_hybrid":  # Gated DeltaNet blocks, every second one gated full attention
        cfg = sf.delta_rule_lm(vocab_size=s["vocab_size"], embed_dim=width, layers=s["layers"], heads=s["heads"],
                               head_dim=width // s["heads"], attention_every=2, attention_heads=s["heads"],
                               attention_kv_heads=s["heads"])
    else:  # Samba and YOCO alternate at any depth: at 2 layers one recurrent and one attention layer
        cfg = MIXERS[mixer](width, s["heads"], s["layers"], s["vocab_size"], length)
    cfg = model_config(cfg, "decoder")
    return dataclasses.replace(cfg, layers=tuple(dataclasses.replace(layer, ffn=None) for layer in cfg.layers))


def state_floats(config: ConfigBase, length: int) -> int:
    """The numbers a model's decoding cache holds after reading one sequence of ``length`` tokens: its
    recurrent state (attention's keys and values grow with the length; a fixed state does not)."""
    torch.manual_seed(0)
    net = sf.build(config).eval()
    with torch.no_grad():
        out = net(torch.ones(1, length, dtype=torch.long), use_cache=True)
    return out.cache.nbytes() // 4  # float32 numbers


def _train_point(cfg: ConfigBase, train_set: TaskBatch, test_set: TaskBatch, batch_size: int, lr: float,
                 s: dict[str, Any], seed: int, device: str, progress: Progress, label: str) -> dict[str, Any]:
    per_epoch = math.ceil(train_set.inputs.shape[0] / batch_size)
    order: list[torch.Tensor] = []
    curve: dict[int, float] = {}

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = divmod(step, per_epoch)
        if len(order) <= epoch:  # each epoch's own shuffle, seeded by the run and the epoch
            order.append(torch.randperm(train_set.inputs.shape[0], generator=torch.Generator().manual_seed(
                seed * 1000 + epoch)))
        rows = order[epoch][index * batch_size:(index + 1) * batch_size]
        return train_set.inputs[rows], train_set.labels[rows]

    def evaluate(step: int, net: torch.nn.Module) -> bool:
        if step == 0 or step % per_epoch:
            return False
        curve[step // per_epoch] = accuracy(net, test_set, batch_size=250).value
        return curve[step // per_epoch] > STOP_ABOVE

    record = train(cfg, steps=s["epochs"] * per_epoch, lr=lr, warmup=0, seed=seed, device=device, batches=batches,
                   callback=evaluate, progress=progress, label=label, schedule="cosine",
                   weight_decay=s["weight_decay"])
    final = accuracy(record["model"], test_set, batch_size=250)  # per asked position, with its Wilson interval
    return {"accuracy": final.value, "low": final.low, "high": final.high, "asked": final.total,
            "epochs": record["steps"] / per_epoch, "parameters": record["parameters"],
            "diverged_at": record["diverged_at"], "curve": {str(k): v for k, v in curve.items()}}


def reproduce(*, quick: bool, out: Path, seed: int, device: str,
              overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    s = override(settings(quick), overrides)
    check(s)
    plan = sum(s["epochs"] * math.ceil(s["train_examples"] / batch) for batch in s["batch_sizes"])
    runs, states = [], {}
    with Progress(plan * len(s["mixers"]) * len(s["widths"]) * len(s["lrs"])) as progress:
        for (length, pairs), batch_size in zip(s["points"], s["batch_sizes"]):
            task = {"vocab_size": s["vocab_size"], "length": length, "pairs": pairs, "random_filler": False}
            train_set = mqar(s["train_examples"], seed=seed, **task)
            test_set = mqar(s["test_examples"], seed=TEST_SEED + seed, **task)
            per_run = s["epochs"] * math.ceil(s["train_examples"] / batch_size)
            for mixer in s["mixers"]:
                for width in s["widths"]:
                    cfg = model(mixer, width, length, s)
                    states[mixer, width, length] = state_floats(cfg, length)
                    tried: dict[float, dict[str, Any]] = {}
                    for lr in sorted(s["lrs"]):
                        if tried and max(r["accuracy"] for r in tried.values()) > STOP_ABOVE:
                            progress.drop(per_run)  # solved at a lower rate: this one is not needed
                            continue
                        tried[lr] = _train_point(cfg, train_set, test_set, batch_size, lr, s, seed, device, progress,
                                                 f"{mixer} width {width}, T {length}, {pairs} pairs, lr {lr:g}")
                    lr, best, by_lr = best_rate(tried, "accuracy", higher=True)
                    runs.append({"mixer": mixer, "width": width, "length": length, "pairs": pairs, "lr": lr, **best,
                                 "state_floats": states[mixer, width, length], "accuracy_by_lr": by_lr})
                    progress.write(f"  T {length:>4} pairs {pairs:>3}  {mixer:>18}  width {width:>4}: accuracy "
                                   f"{best['accuracy']:.3f} ({best['low']:.3f}–{best['high']:.3f}) at lr {lr:g}, "
                                   f"state {states[mixer, width, length]:,} floats, {best['parameters']:,} parameters")
    verdicts = _verdicts(runs, s)
    payload = {"reproduction": "mqar-zoology", "quick": quick, "settings": s, "runs": runs}
    write_outputs(out, "mqar-zoology", payload, verdicts)
    (out / "mqar-zoology.md").write_text(leaderboard_table(runs, s))
    _plot(runs, s, out)
    return {**payload, "verdicts": verdicts}


def leaderboard_table(runs: list[dict[str, Any]], s: dict[str, Any]) -> str:
    """A markdown table: a row per mixer, for each point its accuracy at each width, and at each width its
    state size after the longest length (floats; "fixed" where it does not grow with the length)."""
    points = [tuple(point) for point in s["points"]]
    head = ["mixer"] + [f"T {t}, {d} pairs: width {w}" for t, d in points for w in s["widths"]]
    longest = max(t for t, _ in points)
    head += [f"state at width {w}, T {longest} (floats)" for w in s["widths"]]
    at = {(r["mixer"], r["length"], r["width"]): r for r in runs}
    rows = []
    for mixer in s["mixers"]:
        cells = [f"{at[mixer, t, w]['accuracy']:.3f}" for t, _ in points for w in s["widths"]]
        fixed = " (fixed)" if mixer in FIXED_STATE else ""
        rows.append([mixer, *cells, *(f"{at[mixer, longest, w]['state_floats']:,}{fixed}" for w in s["widths"])])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _verdicts(runs: list[dict[str, Any]], s: dict[str, Any]) -> list[Verdict]:
    at = {(r["mixer"], r["length"], r["width"]): r for r in runs}
    points = [tuple(point) for point in s["points"]]
    hardest, narrowest = points[-1], min(s["widths"])
    verdicts = []
    if "attention" in s["mixers"]:
        worst = min((r for r in runs if r["mixer"] == "attention"), key=lambda r: r["low"])
        verdicts.append(Verdict(
            "attention solves MQAR at every width and point (Zoology Figure 2)",
            f"lowest attention accuracy {worst['accuracy']:.3f} (95% Wilson CI {worst['low']:.3f}–{worst['high']:.3f}; "
            f"width {worst['width']}, T {worst['length']}, {worst['pairs']} pairs); held: every point's interval "
            f"above 0.9", bool(worst["low"] > 0.9)))
    for mixer in [m for m in s["mixers"] if m in FIXED_STATE]:
        if "attention" not in s["mixers"]:
            break
        mine, theirs = at[mixer, hardest[0], narrowest], at["attention", hardest[0], narrowest]
        held = True if mine["high"] < theirs["low"] else False if mine["low"] > theirs["high"] else None
        widest = at[mixer, hardest[0], max(s["widths"])]
        verdicts.append(Verdict(
            f"{mixer} (a fixed state) falls short of attention at the narrowest width on the hardest point",
            f"T {hardest[0]}, {hardest[1]} pairs, width {narrowest}: {mixer} {mine['accuracy']:.3f} "
            f"({mine['low']:.3f}–{mine['high']:.3f}) against attention {theirs['accuracy']:.3f} "
            f"({theirs['low']:.3f}–{theirs['high']:.3f}); at width {max(s['widths'])} {mixer} reaches "
            f"{widest['accuracy']:.3f}, with a state of {widest['state_floats']:,} floats (held: the Wilson "
            "intervals separate)", held, evidence=(mine["accuracy"], theirs["accuracy"])))
    return verdicts


def _plot(runs: list[dict[str, Any]], s: dict[str, Any], out: Path) -> None:
    fig, axes = figure(len(s["points"]))
    axes = axes if len(s["points"]) > 1 else [axes]
    colours = pyplot().get_cmap("tab20")  # more mixers than the default cycle's ten colours
    for axis, (length, pairs) in zip(axes, s["points"]):
        for index, mixer in enumerate(s["mixers"]):
            mine = sorted((r for r in runs if r["mixer"] == mixer and r["length"] == length), key=lambda r: r["width"])
            axis.errorbar([r["width"] for r in mine], [r["accuracy"] for r in mine],
                          yerr=[[r["accuracy"] - r["low"] for r in mine], [r["high"] - r["accuracy"] for r in mine]],
                          marker="os^vD<>"[index % 7], capsize=2, label=mixer, color=colours(index % 20))
        axis.set_xscale("log", base=2)
        axis.minorticks_off()
        axis.set_xticks(s["widths"], [str(width) for width in s["widths"]])
        axis.set_xlabel("model width")
        axis.set_ylabel("MQAR accuracy")
        axis.set_ylim(-0.02, 1.02)
        axis.set_title(f"T {length}, {pairs} pairs")
    axes[-1].legend(fontsize=6)
    save(fig, out / "mqar-zoology.png")
