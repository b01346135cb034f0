"""``scaleformer bench icl``: the cost of in-context learning against the number of demonstrations, structured
prompting against conventional prompting, until the conventional prompt no longer fits the context.

One decoder (``--preset``, random weights: cost does not depend on them) reads N demonstrations of
``--demo-length`` tokens, then a test input of ``--test-length`` tokens, and scores it:

* conventional: the demonstrations and the test as one sequence of N·d + t tokens — only while that fits
  ``--context`` (by default the length of a learned position table, else :data:`TRAINED_LENGTH`: the length
  the model is taken to be trained at; past it, conventional in-context learning is off the model's training
  distribution, and with learned positions impossible);
* structured (:func:`scaleformer.icl.structured_prompt`): the demonstrations in M = ⌈N·d / (context − t)⌉
  groups, each short enough that the test still fits after it, encoded independently (a batch of M), then
  the test over their joined cache (N is rounded down to a multiple of M).

Reported per N: median seconds of one test (encoding included, one process, after a warm-up), peak tensor
memory, and the log-log slope of each method's time against N (1 = linear in the demonstrations).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from scaleformer.bench.common import log_log_slope, machine_info, peak_memory, print_table, time_call, write_json
from scaleformer.build import build
from scaleformer.icl import structured_prompt
from scaleformer.models.architecture import LearnedPosition
from scaleformer.presets import preset_with_options
from scaleformer.train.trainer import parse_model_options

__all__ = ["add_arguments", "run"]

#: the training length assumed of a model whose positions have no table (RoPE reads any length)
TRAINED_LENGTH = 4096


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="gpt-tiny")
    parser.add_argument("--model-options", nargs="*", default=["position=rope"],
                        metavar="KEY=VALUE", help="knobs and overrides of the preset (default: RoPE)")
    parser.add_argument("--context", type=int, default=None,
                        help="tokens a conventional prompt may hold (default: a learned position table's length, "
                             f"else {TRAINED_LENGTH})")
    parser.add_argument("--demos", type=int, nargs="+", default=[8, 16, 32, 64, 127, 256, 512, 1024],
                        help="numbers of demonstrations N")
    parser.add_argument("--demo-length", type=int, default=32)
    parser.add_argument("--test-length", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the figures to this JSON file")


def run(args: argparse.Namespace) -> int:
    cpu = torch.device("cpu")
    info = machine_info(cpu)
    torch.manual_seed(0)
    config = preset_with_options(args.preset, parse_model_options(tuple(args.model_options)))
    model = build(config).eval()
    vocab = config.vocab_size
    # A model with learned positions cannot read past its table at all; with any kind, past the length it
    # was trained at conventional prompting is off its training distribution.
    position = config.position
    args.context = args.context or (position.max_positions if isinstance(position, LearnedPosition) else TRAINED_LENGTH)
    if args.context <= args.test_length:
        raise ValueError(f"--context ({args.context}) must be longer than --test-length ({args.test_length})")
    print(f"In-context learning cost on {info}: {args.preset} {' '.join(args.model_options)}, demonstrations of {args.demo_length} tokens, "
          f"a test of {args.test_length}, context {args.context}")
    test = torch.randint(0, vocab, (args.test_length,))
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        for count in args.demos:
            demos = torch.randint(0, vocab, (count * args.demo_length,))
            # each group, then the test after it, within the context
            groups = math.ceil(count * args.demo_length / (args.context - args.test_length))
            per_group = count // groups
            grouped = demos[:groups * per_group * args.demo_length].view(groups, per_group * args.demo_length)
            row: dict[str, Any] = {"demos": count, "groups": groups, "conventional_s": None,
                                   "conventional_peak_mb": None}
            structured = lambda: structured_prompt(model, grouped, test, groups=groups)  # noqa: E731
            row["structured_peak_mb"] = peak_memory(structured, device=cpu) / 2**20
            row["structured_s"] = time_call(structured, device=cpu, repeats=args.repeats)
            if count * args.demo_length + args.test_length <= args.context:
                conventional = lambda: model(torch.cat([demos, test])[None])  # noqa: E731
                row["conventional_peak_mb"] = peak_memory(conventional, device=cpu) / 2**20
                row["conventional_s"] = time_call(conventional, device=cpu, repeats=args.repeats)
            rows.append(row)
            print(f"  N={count}: structured {row['structured_s']:.3f} s in {groups} groups, conventional "
                  f"{row['conventional_s'] if row['conventional_s'] is not None else 'does not fit'}", flush=True)
    slopes = {kind: log_log_slope([r["demos"] for r in rows if r[f"{kind}_s"]], [r[f"{kind}_s"] for r in rows if r[f"{kind}_s"]])
              for kind in ("structured", "conventional")}
    print_table("one test example after N demonstrations: median seconds, peak tensor MB",
                ["N", "groups M", "structured s", "conventional s", "structured MB", "conventional MB"],
                [[r["demos"], r["groups"], r["structured_s"], r["conventional_s"] or "does not fit",
                  r["structured_peak_mb"], r["conventional_peak_mb"] or "-"] for r in rows])
    print("log-log slope of time against N: " + ", ".join(
        f"{kind} {slope:.2f}" if slope is not None else f"{kind} -" for kind, slope in slopes.items()))
    if args.json:
        write_json(args.json, {"benchmark": "icl", "machine": info, "settings": {
            k: v for k, v in vars(args).items() if k not in ("json", "run", "command", "bench")},
            "rows": rows, "slopes": slopes})
    return 0
