"""``scaleformer reproduce NAME``: each paper's headline claim, trained at a size a laptop runs, with the
claim printed beside what was measured and whether it held. ``--quick`` is the small version the tests
run; the outputs are ``NAME.json`` and ``NAME.png`` under ``--out``."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

__all__ = ["REPRODUCTIONS", "add_arguments", "run"]

REPRODUCTIONS = {"deepnet": "scaleformer.reproduce.deepnet", "subln": "scaleformer.reproduce.subln",
                 "xpos": "scaleformer.reproduce.xpos", "retnet": "scaleformer.reproduce.retnet",
                 "xmoe": "scaleformer.reproduce.xmoe", "longnet": "scaleformer.reproduce.longnet",
                 "mqar": "scaleformer.reproduce.mqar", "s2": "scaleformer.reproduce.s2",
                 "icl": "scaleformer.reproduce.icl", "longvit-scaling": "scaleformer.reproduce.longvit_scaling"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(REPRODUCTIONS), help="which paper's claim")
    parser.add_argument("--quick", action="store_true", help="the small version (under 2 minutes on 2 CPU cores)")
    parser.add_argument("--out", default="runs/reproduce", help="directory of NAME.json and NAME.png")
    parser.add_argument("--seed", type=int, default=0, help="the one seed of every run")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="change the size: any key of the reproduction's settings (printed in NAME.json), e.g. "
                             "--set steps=20000 width=256 (VALUE read as JSON)")


def run(args: argparse.Namespace) -> int:
    from scaleformer.reproduce.common import override
    from scaleformer.runtime import check_device, thread_advice
    from scaleformer.train.trainer import parse_model_options

    module = importlib.import_module(REPRODUCTIONS[args.name])
    check_device(args.device)
    overrides = parse_model_options(tuple(args.set))
    override(module.settings(args.quick), overrides)  # every setting checked before anything trains
    print(module.__doc__.strip().splitlines()[0], flush=True)
    advice = thread_advice() if args.device == "cpu" else None
    if advice:
        print(f"note: {advice}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    module.reproduce(quick=args.quick, out=Path(args.out), seed=args.seed, device=args.device, overrides=overrides)
    print(f"done in {_duration(time.perf_counter() - start)}")
    return 0


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
