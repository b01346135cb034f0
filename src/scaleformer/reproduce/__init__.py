"""``scaleformer reproduce NAME``: each paper's headline claim, trained at a size a laptop runs, with the
claim printed beside what was measured and whether it held. ``--quick`` is the small version the tests
run; the outputs are ``NAME.json`` and ``NAME.png`` under ``--out``."""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from pathlib import Path

__all__ = ["REPRODUCTIONS", "add_arguments", "run"]

REPRODUCTIONS = {"deepnet": "scaleformer.reproduce.deepnet", "subln": "scaleformer.reproduce.subln",
                 "xpos": "scaleformer.reproduce.xpos", "retnet": "scaleformer.reproduce.retnet",
                 "xmoe": "scaleformer.reproduce.xmoe", "longnet": "scaleformer.reproduce.longnet",
                 "mqar": "scaleformer.reproduce.mqar", "s2": "scaleformer.reproduce.s2",
                 "icl": "scaleformer.reproduce.icl", "longvit-scaling": "scaleformer.reproduce.longvit_scaling",
                 "ruler": "scaleformer.reproduce.long_context"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(REPRODUCTIONS), help="which paper's claim")
    parser.add_argument("--quick", action="store_true", help="the small version (under 2 minutes on 2 CPU cores)")
    parser.add_argument("--out", default="runs/reproduce", help="directory of NAME.json and NAME.png")
    parser.add_argument("--seed", type=int, default=0, help="the seed of every run (the first, with --seeds)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="run the whole reproduction with N seeds (--seed, --seed + 1, ...), each in "
                             "OUT/seed-S; each claim is then decided by the 95%% intervals of its numbers over "
                             "the seeds, written to OUT/NAME-seeds.json")
    parser.add_argument("--protocol", choices=["zoology"], default=None,
                        help="mqar only: Zoology's Figure 2 protocol over every mixer (the default size 76 min "
                             "on 2 CPU cores; the results as OUT/mqar-zoology.json, .md and .png)")
    parser.add_argument("--full", action="store_true", help="with --protocol zoology: the paper's whole grid")
    parser.add_argument("--lrs", type=float, nargs="+", default=None, metavar="RATE",
                        help="train every model at each of these learning rates and keep its best (Zoology's "
                             "protocol), in the reproductions that sweep: the `lrs` setting")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="change the size: any key of the reproduction's settings (printed in NAME.json), e.g. "
                             "--set steps=20000 width=256 (VALUE read as JSON)")


def run(args: argparse.Namespace) -> int:
    from scaleformer.reproduce.common import override
    from scaleformer.runtime import check_device, thread_advice
    from scaleformer.train.trainer import parse_model_options

    from scaleformer.config import ConfigError

    if args.protocol is not None and args.name != "mqar":
        raise ConfigError(f"--protocol {args.protocol} is a protocol of `reproduce mqar`, not of {args.name}")
    if args.full and args.protocol is None:
        raise ConfigError("--full runs the whole grid of a protocol: give --protocol zoology")
    name = "mqar-zoology" if args.protocol == "zoology" else args.name
    module = importlib.import_module("scaleformer.reproduce.zoology" if args.protocol else REPRODUCTIONS[args.name])
    check_device(args.device)
    overrides = parse_model_options(tuple(args.set))
    if args.full:  # the paper's grid, and the user's --set on top of it
        overrides = {**module.FULL, **overrides}
    if args.seeds < 1:
        raise ConfigError(f"--seeds takes a count >= 1, got {args.seeds}")
    if args.lrs is not None:
        if not all(math.isfinite(rate) and rate > 0 for rate in args.lrs):
            raise ConfigError(f"lrs takes a list of positive learning rates, got {args.lrs}")
        if "lrs" not in module.settings(args.quick):
            sweeping = sorted(name for name, path in REPRODUCTIONS.items()
                              if "lrs" in importlib.import_module(path).settings(True))
            raise ConfigError(f"reproduce {args.name} trains at one learning rate (--set lr=RATE); --lrs sweeps in: "
                              f"{', '.join(sweeping)}")
        overrides = {**overrides, "lrs": list(args.lrs)}
    override(module.settings(args.quick), overrides)  # every setting checked before anything trains
    print(module.__doc__.strip().splitlines()[0], flush=True)
    advice = thread_advice() if args.device == "cpu" else None
    if advice:
        print(f"note: {advice}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    out = Path(args.out)
    if args.seeds == 1:
        module.reproduce(quick=args.quick, out=out, seed=args.seed, device=args.device, overrides=overrides)
    else:
        _over_seeds(module, name, args, out, overrides)
    print(f"done in {_duration(time.perf_counter() - start)}")
    return 0


def _over_seeds(module: object, name: str, args: argparse.Namespace, out: Path, overrides: dict) -> None:
    """The reproduction once per seed (each in OUT/seed-S, its own JSON and figure), then every claim decided
    over the seeds (:func:`scaleformer.reproduce.common.combine_seeds`), printed and written to
    OUT/NAME-seeds.json with each seed's verdicts."""
    import json
    from dataclasses import asdict

    from scaleformer.reproduce.common import combine_seeds

    seeds = list(range(args.seed, args.seed + args.seeds))
    runs = []
    for index, seed in enumerate(seeds):
        print(f"\n== seed {seed} ({index + 1} of {len(seeds)}) ==", flush=True)
        folder = out / f"seed-{seed}"
        module.reproduce(quick=args.quick, out=folder, seed=seed, device=args.device, overrides=overrides)
        runs.append(json.loads((folder / f"{name}.json").read_text())["verdicts"])
    verdicts = combine_seeds(runs)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-seeds.json"
    path.write_text(json.dumps({"reproduction": name, "quick": args.quick, "seeds": seeds,
                                "verdicts": [asdict(v) for v in verdicts],
                                "per_seed": {str(seed): run for seed, run in zip(seeds, runs)}}, indent=1))
    print(f"\n== over {len(seeds)} seeds ==")
    for verdict in verdicts:
        print(verdict)
    print(f"\nwrote {path}")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
