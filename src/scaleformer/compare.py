"""``scaleformer compare``: several models trained on the same data with the same budget and seed.

Each model is a preset or a JSON config file, optionally with options joined by "+"
(``gpt-tiny+norm=deepnorm+layers=8``). Every model gets the same TrainConfig — steps, batch, length, lr,
seed, and the built-in corpus, ``--data`` or a synthetic ``--task`` — in its own run directory under
``--out`` (so a rerun continues where it stopped). Reported per model: parameters, validation loss and
perplexity (or task accuracy with its 95% interval), training tokens/s, and the decode-step latency and
cache bytes after prompts of a few lengths. ``--seeds N`` trains every model N times (seeds seed … seed+N−1,
each run in ``<model>/seed-<s>``): the loss (or accuracy) is then the mean over seeds with its 95% Student-t
interval, and every run's result is kept in the row's ``runs``. ``--lrs A B …`` trains every model at each peak
learning rate (runs in ``<model>/lr-<A>``) and keeps the best one's result — the lowest mean validation loss,
or the highest mean accuracy — as Zoology's protocol does; the row's ``lr`` names it and its ``sweep`` lists
every rate's result with its interval. With several seeds, each pair of models gets a verdict (``verdicts``):
held only when their intervals separate. Everything goes to ``compare.json``; the plots
(``compare_loss.png``, ``compare_decoding.png``, for tasks ``compare_accuracy.png``) are drawn from that
file alone, so ``scaleformer compare --replot compare.json`` redraws them.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from scaleformer.files import one_line, read_json_object
from scaleformer.bench.common import MIN_ROUNDS, machine_info, print_table, time_interleaved
from scaleformer.plots import pyplot, save
from scaleformer.stats import MeanInterval, mean_interval, verdict
from scaleformer.tasks import null_accuracy
from scaleformer.train.trainer import TrainConfig, Trainer, model_config, perplexity, task_options

__all__ = ["add_arguments", "run", "compare", "plot"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="*", help="presets or .json model configs, each optionally with "
                        "+KEY=VALUE options (gpt-tiny+norm=deepnorm)")
    parser.add_argument("--out", default="runs/compare", help="directory of the runs, compare.json and plots")
    parser.add_argument("--task", help="a synthetic task instead of language modelling (see scaleformer.tasks)")
    parser.add_argument("--task-options", nargs="*", default=[], help="the task's KEY=VALUE options")
    parser.add_argument("--data", help="text data (default: the built-in corpus)")
    parser.add_argument("--tokenizer", default="byte", choices=["auto", "bpe", "byte"])
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "auto"],
                        help="float32 by default (unlike train's auto), so that a comparison's numbers are the "
                             "same on every machine")
    parser.add_argument("--steps", type=int, default=300, help="training steps of every model")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (a task's length)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine decay)")
    parser.add_argument("--warmup", type=int, default=30, help="linear warm-up steps")
    parser.add_argument("--seed", type=int, default=0, help="one seed for every model: data order, initialisation")
    parser.add_argument("--seeds", type=int, default=1, help="train each model with this many seeds (seed, seed+1, "
                        "…) and report the mean with its 95%% interval over them")
    parser.add_argument("--lrs", type=float, nargs="+", help="train each model at each of these peak learning rates "
                        "(in place of --lr) and keep the best rate's result")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between validation losses")
    parser.add_argument("--contexts", type=int, nargs="*", default=[128, 512],
                        help="prompt lengths at which decode latency and cache bytes are measured")
    parser.add_argument("--decode-steps", type=int, default=8, help="timed one-token steps after each prompt, in each of 5 rounds (their median is reported)")
    parser.add_argument("--replot", help="redraw the plots of an existing compare.json (nothing is trained)")


def run(args: argparse.Namespace) -> int:
    if args.replot:
        path = Path(args.replot)
        plot(read_payload(path), path.parent)
        return 0
    if len(args.models) < 1:
        raise ValueError("give at least one model to compare (presets or .json configs)")
    # what is measured after training is checked before it (a bad value would otherwise fail at the end)
    if not args.contexts or any(context < 1 for context in args.contexts):
        raise ValueError(f"--contexts must be prompt lengths >= 1, got {' '.join(map(str, args.contexts)) or 'none'}")
    if args.decode_steps < 1:
        raise ValueError(f"--decode-steps must be >= 1, got {args.decode_steps}")
    if getattr(args, "seeds", 1) < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    if getattr(args, "lrs", None) is not None and (len(set(args.lrs)) != len(args.lrs) or min(args.lrs) <= 0):
        raise ValueError(f"--lrs must be distinct rates > 0, got {' '.join(map(str, args.lrs))}")
    result = compare(args)
    plot(result, Path(args.out))
    return 0


MAX_PAYLOAD_BYTES = 64 << 20


def read_payload(path: Path) -> dict[str, Any]:
    """A compare.json to redraw, checked: an object whose ``models`` is a list of rows, each with a ``model``
    name, a ``curve`` of {step, loss[, val_loss]} points and a ``decoding`` list (what :func:`plot` reads).
    Anything else is one ``ValueError`` naming the file."""
    payload = read_json_object(path, "a compare.json", MAX_PAYLOAD_BYTES)

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    rows = payload.get("models")
    problem = None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        problem = "no list of models"
    elif not isinstance(payload.get("settings", {}), dict):
        problem = "settings is not an object"
    else:
        for row in rows:
            curve, decoding = row.get("curve"), row.get("decoding")
            if not (isinstance(row.get("model"), str) and isinstance(curve, list) and isinstance(decoding, list)
                    and all(isinstance(p, dict) and number(p.get("step")) and number(p.get("loss"))
                            and number(p.get("val_loss", 0)) for p in curve)
                    and all(isinstance(c, dict) and ("step_ms" not in c or (number(c.get("context"))
                            and number(c["step_ms"]) and number(c.get("cache_mb")))) for c in decoding)
                    and ("accuracy" not in rows[0] or all(number(row.get(k)) for k in
                                                          ("accuracy", "accuracy_low", "accuracy_high")))):
                problem = f"its row {one_line(repr(row.get('model')), 40)} is not a measured model"
                break
    if problem:
        raise ValueError(f"{path}: not a compare.json written by scaleformer compare ({problem})")
    return payload


def _train_config(args: argparse.Namespace, spec: str, out: Path, seed: int | None = None,
                  lr: float | None = None) -> TrainConfig:
    model, *options = spec.split("+")
    seed = args.seed if seed is None else seed
    return TrainConfig(model=model, model_options=tuple(options), task=args.task, task_options=tuple(args.task_options),
                       data=args.data, tokenizer=args.tokenizer, steps=args.steps, batch_size=args.batch_size,
                       seq_len=args.seq_len, lr=args.lr if lr is None else lr, warmup=args.warmup, seed=seed,
                       eval_every=args.eval_every, save_every=args.steps, log_every=max(1, args.steps // 50),
                       samples=0, progress=False, out=str(out), precision=args.precision)


def _seeds(args: argparse.Namespace) -> list[int]:
    return list(range(args.seed, args.seed + getattr(args, "seeds", 1)))


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Train every model (with every seed), measure it, write and return compare.json's content."""
    out, seeds = Path(args.out), _seeds(args)
    lrs = getattr(args, "lrs", None) or [args.lr]

    def run_dir(spec: str, lr: float, seed: int) -> Path:
        folder = out / re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec)
        folder = folder if len(lrs) == 1 else folder / f"lr-{lr:g}"
        return folder if len(seeds) == 1 else folder / f"seed-{seed}"

    configs = {spec: {lr: [_train_config(args, spec, run_dir(spec, lr, seed), seed, lr) for seed in seeds]
                      for lr in lrs} for spec in args.models}
    for by_rate in configs.values():  # every model's config is checked before the first one trains
        model_config(next(iter(by_rate.values()))[0])
    rows = []
    for spec, by_rate in configs.items():
        swept = []
        for lr, runs in by_rate.items():
            trained = []
            for cfg in runs:
                print(f"\n=== {spec}" + (f" (lr {lr:g})" if len(lrs) > 1 else "")
                      + (f" (seed {cfg.seed})" if len(seeds) > 1 else ""))
                trainer = Trainer(cfg)
                trained.append((cfg, trainer, trainer.run()))
            swept.append((lr, trained, _row(spec, trained)))
        lr, trained, row = min(swept, key=lambda entry: _badness(entry[2]))
        if len(lrs) > 1:
            row["lr"] = lr
            row["sweep"] = [{"lr": rate, **{key: value for key, value in result.items() if key in _SWEPT}}
                            for rate, _, result in swept]
        row["decoding"] = decoding_cost(trained[0][1].model, args.contexts, args.decode_steps)
        rows.append(row)
    payload = {"benchmark": "compare", "machine": machine_info(torch.device("cpu")), "settings": {
        k: v for k, v in vars(args).items() if k not in ("run", "command", "replot", "models")}, "models": rows}
    payload["verdicts"] = pairwise_verdicts(rows)
    if args.task:
        level, why = null_accuracy(args.task, task_options(next(iter(configs[args.models[0]].values()))[0]))
        payload["null_accuracy"] = {"accuracy": level, "why": why}
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(payload, indent=1))
    _print(payload)
    for line in payload["verdicts"]:
        print(line)
    for line in null_results(payload):
        print(line, file=sys.stderr)
    return payload


def pairwise_verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """With several seeds: for each pair of models, whether the better mean is better beyond the seeds'
    spread — "held" when their 95% intervals separate, else "undecided" with the seeds that would decide it
    (:func:`scaleformer.stats.verdict`). Validation loss (lower is better), or accuracy (higher is)."""
    def interval(row: dict[str, Any], key: str) -> MeanInterval | None:
        if f"{key}_low" not in row:
            return None
        return MeanInterval(row[key], row[f"{key}_low"], row[f"{key}_high"], len(row.get("runs", [])))

    lines = []
    for i, first in enumerate(rows):
        for second in rows[i + 1:]:
            key = "accuracy" if "accuracy" in first else "val_loss"
            a, b = interval(first, key), interval(second, key)
            if a is None or b is None:
                continue
            better, worse = (first, second) if (a.mean < b.mean) == (key == "val_loss") else (second, first)
            low, high = (a, b) if a.mean <= b.mean else (b, a)
            what = "validation loss below" if key == "val_loss" else "accuracy above"
            lines.append(f"verdict: {better['model']}'s {what} {worse['model']}'s: {verdict(low, high)}")
    return lines


def null_results(payload: dict[str, Any]) -> list[str]:
    """A ``warning:`` line for each model whose result is no finding: accuracy whose 95% interval reaches
    what a model gets without learning the task, or a validation loss no better than the unigram
    baseline's (a model that learned only how often each token occurs)."""
    lines = []
    null = payload.get("null_accuracy")
    for row in payload["models"]:
        if null is not None and "accuracy_low" in row and row["accuracy_low"] <= null["accuracy"]:
            lines.append(f"warning: {row['model']}: accuracy {row['accuracy']:.3f} (95% CI {row['accuracy_low']:.3f}–"
                         f"{row['accuracy_high']:.3f}) is within what a model reaches without learning the task "
                         f"({null['accuracy']:.3f}, {null['why']}): nothing was learned here; train longer, or "
                         "larger, before comparing")
        unigram = row.get("unigram_loss")
        if unigram is not None and row.get("val_loss") is not None and row["val_loss"] >= unigram:
            lines.append(f"warning: {row['model']}: validation loss {row['val_loss']:.4f} is no better than the unigram "
                         f"baseline's {unigram:.4f}: it learned only how often each token occurs")
    return lines


_SWEPT = ("val_loss", "val_loss_low", "val_loss_high", "accuracy", "accuracy_low", "accuracy_high", "runs")


def _badness(row: dict[str, Any]) -> float:
    """What the sweep minimises: minus the accuracy on a task, else the validation loss (a run without one,
    or a diverged one, last)."""
    value = -row["accuracy"] if "accuracy" in row else row.get("val_loss")
    return value if isinstance(value, (int, float)) and value == value else float("inf")


def _row(spec: str, trained: list[tuple[TrainConfig, Trainer, dict[str, Any]]]) -> dict[str, Any]:
    """One model's row: with one seed its run's numbers; with several, the mean over seeds and its 95%
    interval (``*_low``/``*_high``), each run in ``runs``, tokens/s the median over every run's log records,
    the curve that of the first seed's run (the caller adds the decoding costs, of the rate it keeps)."""
    runs, all_records = [], []
    for cfg, trainer, result in trained:
        records = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
        all_records += records
        run = {"seed": cfg.seed, "val_loss": result.get("val_loss"),
               "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
               "curve": [{"step": r["step"], "loss": r["loss"], **({"val_loss": r["val_loss"]} if "val_loss" in r else {})}
                         for r in records]}
        if "accuracy" in result:
            run.update({k: result[k] for k in ("accuracy", "accuracy_low", "accuracy_high")})
        runs.append(run)
    first_cfg, first_trainer, first_result = trained[0]
    parameters = sum(p.numel() for p in {id(p): p for p in first_trainer.model.parameters()}.values())
    row = {"model": spec, "parameters": parameters, "val_loss": runs[0]["val_loss"],
           "tokens_per_s": statistics.median(r["tokens_per_s"] for r in all_records), "curve": runs[0]["curve"]}
    if "accuracy" in first_result:
        row.update({k: runs[0][k] for k in ("accuracy", "accuracy_low", "accuracy_high")})
    elif row["val_loss"] is not None:
        row["unigram_loss"] = first_result.get("unigram_loss")
    if len(runs) > 1:
        row["runs"] = runs
        speed = mean_interval([r["tokens_per_s"] for r in runs])
        row.update(tokens_per_s_mean=speed.mean, tokens_per_s_low=speed.low, tokens_per_s_high=speed.high)
        if "accuracy" in first_result:  # the mean over seeds; its interval over seeds, within [0, 1]
            accuracy = mean_interval([r["accuracy"] for r in runs])
            row.update(accuracy=accuracy.mean, accuracy_low=max(0.0, accuracy.low), accuracy_high=min(1.0, accuracy.high))
        elif all(r["val_loss"] is not None for r in runs):
            loss = mean_interval([r["val_loss"] for r in runs])
            row.update(val_loss=loss.mean, val_loss_low=loss.low, val_loss_high=loss.high)
    if "accuracy" not in row and row["val_loss"] is not None:
        row["val_perplexity"] = perplexity(row["val_loss"])
    return row


@torch.no_grad()
def decoding_cost(model: torch.nn.Module, contexts: list[int], steps: int, rounds: int = MIN_ROUNDS) -> list[dict[str, float]]:
    """Per prompt length: the cache's bytes holding the prompt, and the seconds of a one-token step after
    it. Each length's steps are timed in ``rounds`` (``steps`` a round, their median), the lengths taking
    turns round by round (:func:`~scaleformer.bench.common.time_interleaved`), so ``step_ms`` is the
    median of the rounds and ``step_ms_q25``/``step_ms_q75`` their spread. The cache keeps growing by a token a step: the last
    step sees ``context + rounds · steps + 1`` tokens."""
    if not hasattr(model, "new_cache"):  # an encoder does not decode
        return []
    model.eval()
    vocab, device = model.config.vocab_size, next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    costs: dict[int, dict[str, Any]] = {}
    steppers = {}
    for context in contexts:
        prompt = torch.randint(0, vocab, (1, context), generator=generator).to(device)
        try:
            model(torch.zeros(1, context + rounds * steps + 1, dtype=torch.long, device=device))  # all it will see
            out = model(prompt, use_cache=True)
        except ValueError as error:  # e.g. past a learned position table
            costs[context] = {"context": context, "skipped": str(error)}
            continue
        steppers[context] = _DecodeStep(model, out.cache, prompt[:, -1:])
        costs[context] = {"context": context, "cache_mb": out.cache.nbytes() / 2**20}  # holding the prompt
    timings = time_interleaved(steppers, rounds=rounds, repeats=steps, device=device)
    for context, timing in timings.items():
        costs[context].update(step_ms=1000 * timing.median, step_ms_q25=1000 * timing.low,
                              step_ms_q75=1000 * timing.high, rounds=rounds,
                              rounds_ms=[1000 * seconds for seconds in timing.rounds])
    return [costs[context] for context in contexts]


class _DecodeStep:
    """A call is one decode step (the same token each time: what is timed is the step, not a sampler), its
    cache carried from call to call."""

    def __init__(self, model: torch.nn.Module, cache: Any, token: torch.Tensor):
        self.model, self.cache, self.token = model, cache, token

    def __call__(self) -> None:
        self.cache = self.model(self.token, cache=self.cache).cache


def _print(payload: dict[str, Any]) -> None:
    rows = payload["models"]
    contexts = [c["context"] for c in rows[0]["decoding"] if "step_ms" in c] if rows else []
    task = "accuracy" in rows[0]
    swept = "lr" in rows[0] if rows else False
    columns = ["model", "parameters", "val loss", "accuracy (95% CI)" if task else "perplexity", "train tok/s"]
    columns += ["best lr"] if swept else []
    columns += [f"step ms @{c}" for c in contexts] + [f"cache MB @{c}" for c in contexts]
    table = []
    for r in rows:
        cost = {c["context"]: c for c in r["decoding"] if "step_ms" in c}
        quality = (f"{r['accuracy']:.3f} ({r['accuracy_low']:.3f}–{r['accuracy_high']:.3f})" if task
                   else r.get("val_perplexity"))
        loss = (f"{r['val_loss']:.4f} ± {(r['val_loss_high'] - r['val_loss_low']) / 2:.4f}" if "val_loss_low" in r
                else r["val_loss"])
        table.append([r["model"], r["parameters"], loss, quality, r["tokens_per_s"], *([f"{r['lr']:g}"] if swept else []),
                      *(cost.get(c, {}).get("step_ms") for c in contexts),
                      *(cost.get(c, {}).get("cache_mb") for c in contexts)])
    seeds = payload.get("settings", {}).get("seeds", 1)
    print_table("comparison (same data, steps, batch, length and seed)" if seeds == 1 else
                f"comparison over {seeds} seeds (same data, steps, batch, length; loss: mean ± 95% interval)",
                columns, table)


def plot(payload: dict[str, Any], out: Path) -> list[Path]:
    """The PNG plots of a compare.json payload; returns their paths."""
    plt = pyplot()  # compare.json is written before this: without matplotlib, --replot redraws later
    out.mkdir(parents=True, exist_ok=True)
    written = []
    figure, axis = plt.subplots(figsize=(6, 4))
    for row in payload["models"]:
        line, = axis.plot([p["step"] for p in row["curve"]], [p["loss"] for p in row["curve"]], label=row["model"])
        val = [p for p in row["curve"] if "val_loss" in p]
        axis.plot([p["step"] for p in val], [p["val_loss"] for p in val], "o--", color=line.get_color())
    axis.set(xlabel="step", ylabel="loss (nats/token)", title="training loss (lines), validation (dots)")
    axis.legend()
    written.append(save(figure, out / "compare_loss.png"))
    figure, (time_axis, bytes_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for row in payload["models"]:
        cost = [c for c in row["decoding"] if "step_ms" in c]
        time_axis.plot([c["context"] for c in cost], [c["step_ms"] for c in cost], "o-", label=row["model"])
        bytes_axis.plot([c["context"] for c in cost], [c["cache_mb"] for c in cost], "o-", label=row["model"])
    time_axis.set(xlabel="prompt tokens", ylabel="ms per decoded token", title="decode latency")
    bytes_axis.set(xlabel="prompt tokens", ylabel="cache MB", title="decoding cache")
    time_axis.legend()
    written.append(save(figure, out / "compare_decoding.png"))
    rows = [row for row in payload["models"] if "val_loss_low" in row]
    if rows:  # several seeds: each model's mean validation loss and its interval
        figure, axis = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 4))
        axis.errorbar(range(len(rows)), [r["val_loss"] for r in rows], fmt="o", capsize=4,
                      yerr=[[r["val_loss"] - r["val_loss_low"] for r in rows], [r["val_loss_high"] - r["val_loss"] for r in rows]])
        axis.set_xticks(range(len(rows)), [r["model"] for r in rows], rotation=45, ha="right")
        axis.set(ylabel="validation loss (nats/token)",
                 title=f"mean over {payload['settings'].get('seeds')} seeds, 95% interval")
        figure.tight_layout()
        written.append(save(figure, out / "compare_val_loss.png"))
    if payload["models"] and "accuracy" in payload["models"][0]:
        figure, axis = plt.subplots(figsize=(6, 4))
        rows = payload["models"]
        axis.bar(range(len(rows)), [r["accuracy"] for r in rows],
                 yerr=[[r["accuracy"] - r["accuracy_low"] for r in rows], [r["accuracy_high"] - r["accuracy"] for r in rows]],
                 capsize=4, tick_label=[r["model"] for r in rows])
        null = payload.get("null_accuracy")
        if null is not None:  # what a model reaches without learning the task: results at it are no finding
            axis.axhline(null["accuracy"], color="grey", linestyle="--", label=f"without learning ({null['why']})")
            axis.legend(loc="upper left", fontsize="small")
        axis.set(ylabel="accuracy (95% CI)", ylim=(0, 1), title=payload["settings"].get("task") or "task")
        written.append(save(figure, out / "compare_accuracy.png"))
    return written

