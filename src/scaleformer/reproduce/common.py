"""What every reproduction shares: a short in-process training loop, the verdict record, output files."""

from __future__ import annotations

import functools
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scaleformer.build import build
from scaleformer.config import ConfigBase
from scaleformer.plots import pyplot

__all__ = ["Verdict", "combine_seeds", "Progress", "override", "corpus_tokens", "probe_batch", "train", "train_best",
           "best_rate", "write_outputs", "figure"]


@dataclass(frozen=True)
class Verdict:
    """One of the paper's claims, what we measured, and whether it held at this scale (None: undecided).

    ``evidence`` (lower, higher): the two numbers the claim compares, the claim being that the first is
    below the second (a loss it says is lower, a gap it says is under a margin). One run's ``held`` may
    use a noise margin; over several seeds (``reproduce --seeds N``) the verdict is drawn from the two
    numbers' intervals instead (:func:`combine_seeds`)."""

    claim: str
    measured: str
    held: bool | None
    evidence: tuple[float, float] | None = None

    def __str__(self) -> str:
        outcome = {True: "HELD", False: "DID NOT HOLD", None: "UNDECIDED"}[self.held]
        return f"[{outcome}] claim: {self.claim}\n           measured: {self.measured}"


def combine_seeds(runs: list[list[dict[str, Any]]]) -> list[Verdict]:
    """Each claim's verdict over the runs of several seeds (each run a list of verdict records, as the JSON
    keeps them), claims matched by their text. With evidence from every run, the claim holds only when the
    95% Student-t intervals of its two numbers over the seeds separate the claimed way, did not hold when
    they separate the other way, and is undecided otherwise — saying how many seeds would decide it
    (:func:`scaleformer.stats.verdict`); the interval of their per-seed difference is reported beside it. A claim without numbers holds when every seed's run held it, did
    not hold when none did, and is otherwise undecided, with the count."""
    from scaleformer.stats import mean_interval, verdict

    claims: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        for record in run:
            claims.setdefault(record["claim"], []).append(record)
    combined = []
    for claim, records in claims.items():
        missing = f"; measured in {len(records)} of {len(runs)} runs" if len(records) < len(runs) else ""
        if len(records) > 1 and all(r.get("evidence") is not None for r in records):
            lower = mean_interval([float(r["evidence"][0]) for r in records])
            higher = mean_interval([float(r["evidence"][1]) for r in records])
            outcome = verdict(lower, higher)
            held = {"held": True, "did not hold": False}.get(outcome.outcome)
            # A seed gives both numbers the same data and initialisation, so their per-seed difference is
            # the sharper statistic; it is shown, while the verdict keeps the rule above (each side's own
            # interval), which ignores the pairing and is the more conservative.
            paired = mean_interval([float(r["evidence"][1]) - float(r["evidence"][0]) for r in records])
            measured = (f"over {len(records)} seeds: {lower.mean:.4g} (95% CI {lower.low:.4g} to {lower.high:.4g}) "
                        f"against {higher.mean:.4g} ({higher.low:.4g} to {higher.high:.4g}), the claim being that "
                        f"the first is lower: {outcome}; paired by seed, the second exceeds the first by "
                        f"{paired.mean:.4g} (95% CI {paired.low:.4g} to {paired.high:.4g}){missing}")
        else:
            count = sum(r["held"] is True for r in records)
            refuted = sum(r["held"] is False for r in records)
            held = True if count == len(records) else False if refuted == len(records) else None
            measured = (f"held in {count}, did not hold in {refuted}, undecided in {len(records) - count - refuted} "
                        f"of {len(records)} seeds (this claim has no pair of numbers to put intervals on){missing}")
        combined.append(Verdict(claim, measured, held if not missing else (held if held is not True else None)))
    return combined


class Progress:
    """A reproduction's progress bar over the work it plans (training steps, or timed calls), with what
    runs now and the time left at the average rate so far. A run that stops early (it solved its task)
    takes its unrun steps off the plan, so the estimate is of the work that will actually run. Use it as a
    context manager; it writes to stderr, so the verdicts on stdout stay clean."""

    def __init__(self, total: int, unit: str = "step"):
        from tqdm import tqdm

        # smoothing=0: the rate since the start, not the last few updates (models of different sizes take
        # turns, and a moving rate would swing with each of them)
        self.bar = tqdm(total=total, unit=unit, dynamic_ncols=True, file=sys.stderr, smoothing=0.0)

    def begin(self, label: str) -> None:
        self.bar.set_description(label, refresh=True)

    def advance(self, count: int = 1) -> None:
        self.bar.update(count)

    def write(self, line: str) -> None:
        """A result line on stdout, above the bar (print would break the bar's line in a terminal)."""
        self.bar.write(line, file=sys.stdout)
        sys.stdout.flush()

    def drop(self, count: int) -> None:
        """``count`` planned units will not run after all."""
        if count > 0:
            self.bar.total = max(self.bar.n, self.bar.total - count)
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: settings that may be 0 (no warm-up; noise-free labels); every other number must be > 0
ZERO_ALLOWED = frozenset({"warmup", "noise"})


def override(settings: dict[str, Any], changes: dict[str, Any] | None) -> dict[str, Any]:
    """A reproduction's settings with ``changes`` (``--set steps=20000 width=256 'widths[0]=16'``, paths as
    in :mod:`scaleformer.overrides`): only existing keys, with
    values of the same kind, in range (numbers finite and > 0, or >= 0 for :data:`ZERO_ALLOWED`; a list
    that is not empty by default stays non-empty), so a larger run is a flag away and a typo or an
    impossible size is an error before anything trains, not a silent default or a meaningless result."""
    from scaleformer.config import ConfigError, closest_match
    from scaleformer.overrides import apply_overrides, is_path

    result = dict(settings)
    for path, value in (changes or {}).items():
        key = path.split(".")[0].split("[")[0]
        if key not in settings:
            raise ConfigError(f"unknown setting `{key}`{closest_match(key, settings)}; settings: {', '.join(settings)}")
        if is_path(path):  # e.g. widths[0]=16: the whole setting with that item changed
            value = apply_overrides(result, {path: value})[key]
        kind = type(settings[key])
        if not (isinstance(value, kind) or (kind is float and isinstance(value, int) and not isinstance(value, bool))):
            raise ConfigError(f"setting `{key}` takes {kind.__name__} values (like {settings[key]!r}), got {value!r}")
        if kind is list and settings[key] and not value:
            raise ConfigError(f"setting `{key}` needs at least one value (like {settings[key]!r}), got []")
        for item in value if kind is list else [value]:
            _check_setting(key, item, settings[key][0] if kind is list and settings[key] else settings[key])
        result[key] = value
    return result


def _check_setting(key: str, value: Any, like: Any) -> None:
    from scaleformer.config import ConfigError

    if isinstance(like, bool) or not isinstance(like, (int, float)):
        if type(value) is not type(like) and like is not None and not isinstance(like, list):
            raise ConfigError(f"setting `{key}` takes {type(like).__name__} values (like {like!r}), got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"setting `{key}` takes numbers (like {like!r}), got {value!r}")
    low_ok = key in ZERO_ALLOWED
    if not math.isfinite(value) or value < 0 or (value == 0 and not low_ok):
        raise ConfigError(f"setting `{key}` must be a finite number {'>=' if low_ok else '>'} 0, got {value!r}")
    if isinstance(like, int) and not isinstance(value, int):
        raise ConfigError(f"setting `{key}` takes whole numbers (like {like!r}), got {value!r}")


@functools.lru_cache(maxsize=1)
def corpus_tokens() -> tuple[np.ndarray, np.ndarray]:
    """The built-in corpus as bytes (vocabulary 259), 90% train / 10% validation by paragraph position."""
    from scaleformer.data.corpus import builtin_corpus

    data = np.frombuffer(builtin_corpus().text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    cut = int(len(data) * 0.9)
    return data[:cut], data[cut:]


def probe_batch(seq_len: int, count: int = 4) -> torch.Tensor:
    """A fixed batch of validation bytes (count, seq_len), the same in every run."""
    return _windows(corpus_tokens()[1], count, seq_len, np.random.default_rng(12345))[:, :-1]


def _windows(tokens: np.ndarray, count: int, length: int, rng: np.random.Generator) -> torch.Tensor:
    starts = rng.integers(0, len(tokens) - length - 1, size=count)
    return torch.from_numpy(np.stack([tokens[s:s + length + 1] for s in starts]))


def train(config: ConfigBase, *, steps: int, lr: float, seed: int = 0, batch_size: int = 8, seq_len: int = 64,
          warmup: int = 0, device: str = "cpu", batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None,
          probe_steps: tuple[int, ...] = (),
          callback: Callable[[int, nn.Module], bool | None] | None = None,
          progress: Progress | None = None, label: str = "", schedule: str = "constant",
          weight_decay: float = 0.0) -> dict[str, Any]:
    """Train ``config`` with AdamW (``weight_decay``; a linear warm-up, then a constant lr, or with
    ``schedule="cosine"`` a cosine decay to 0 over ``steps``) and return its record.

    ``batches(step)`` gives (inputs, targets) (targets -100 where nothing is asked); default: byte windows
    of the built-in corpus. The record holds the loss of every step, whether and when training diverged
    (a non-finite loss), the validation loss, and at ``probe_steps`` the relative change of the model's
    output on a fixed batch since initialisation (DeepNet's "model update"). ``callback(step, model)`` runs
    after every step (and with step 0 before the first); when it returns True, training stops there (the
    record's ``steps`` says how many ran). ``progress`` advances a step at a time, shown as ``label``;
    the steps a stop or a divergence leaves unrun come off its plan.
    """
    torch.manual_seed(seed)
    model = build(config).to(device).train()
    rng = np.random.default_rng(seed)
    train_tokens, val_tokens = corpus_tokens()
    if batches is None:
        def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            window = _windows(train_tokens, batch_size, seq_len, rng)
            return window[:, :-1], window[:, 1:]
    if probe_steps:
        probe = probe_batch(seq_len).to(device)
        with torch.no_grad():
            model.eval()
            start = model(probe).logits.float()
            model.train()
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    losses, updates, diverged = [], {}, None
    if progress is not None:
        progress.begin(label)
    stop = callback is not None and bool(callback(0, model))
    for step in range(0 if stop else steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup else lr
            if schedule == "cosine":  # torch's CosineAnnealingLR(T_max=steps, eta_min=0), stepped per step
                group["lr"] *= 0.5 * (1 + math.cos(math.pi * step / steps))
        inputs, targets = (x.to(device) for x in batches(step))
        out = model(inputs)
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100) + out.aux_loss
        if not torch.isfinite(loss):
            diverged = step
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step + 1 in probe_steps:
            updates[step + 1] = _relative_change(model, probe, start)
        if progress is not None:
            progress.advance()
        if callback is not None and callback(step + 1, model):
            break
    if progress is not None:
        progress.drop(steps - len(losses))
    record = {"losses": losses, "steps": len(losses), "diverged_at": diverged, "updates": updates, "model": model,
              "parameters": sum(p.numel() for p in model.parameters())}
    record["final_loss"] = float(np.mean(losses[-max(1, len(losses) // 10):])) if losses and diverged is None else math.nan
    return record


def train_best(config: ConfigBase, *, lrs: list[float], lr: float, **options: Any) -> dict[str, Any]:
    """:func:`train` at each rate of ``lrs`` (at ``lr`` alone when it is empty) and the record of the rate
    with the lowest final loss (a diverged run's is NaN: never the best unless every rate diverged), with
    ``lr`` and ``final_loss_by_lr`` added. Zoology's protocol: each model at its own best rate."""
    from scaleformer.config import ConfigError

    if not all(isinstance(rate, (int, float)) and not isinstance(rate, bool) and math.isfinite(rate) and rate > 0
               for rate in lrs):
        raise ConfigError(f"lrs takes a list of positive learning rates, got {lrs!r}")
    rates = [float(rate) for rate in lrs] or [lr]
    best, record, by_lr = best_rate({rate: train(config, lr=rate, **options) for rate in rates}, "final_loss",
                                    higher=False)
    return {**record, "lr": best, "final_loss_by_lr": by_lr}


def best_rate(tried: dict[float, dict[str, Any]], key: str, *,
              higher: bool) -> tuple[float, dict[str, Any], dict[str, float]]:
    """Of records trained at several learning rates, (the best rate, its record, ``key`` at every rate):
    the highest ``key`` (an accuracy) or the lowest (a loss); a NaN (a diverged run) is never the best
    unless every rate gave one."""
    def rank(rate: float) -> tuple[bool, float]:
        value = tried[rate][key]
        return math.isnan(value), -value if higher else value

    best = min(tried, key=rank)
    return best, tried[best], {str(rate): record[key] for rate, record in tried.items()}


@torch.no_grad()
def _relative_change(model: nn.Module, probe: torch.Tensor, start: torch.Tensor) -> float:
    model.eval()
    now = model(probe).logits.float()
    model.train()
    return float((now - start).norm() / start.norm())


def write_outputs(out: Path, name: str, payload: dict[str, Any], verdicts: list[Verdict]) -> Path:
    """``<out>/<name>.json`` (the payload and the verdicts); prints the verdicts."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "verdicts": [asdict(v) for v in verdicts]}
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=float))
    print()
    for verdict in verdicts:
        print(verdict)
    print(f"\nwrote {path}")
    return path


def figure(columns: int = 1) -> tuple[Any, Any]:
    """A figure and its axes: ``columns`` panels side by side (save it with scaleformer.plots.save)."""
    return pyplot().subplots(1, columns, figsize=(5 * columns, 4))
