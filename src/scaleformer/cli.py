"""The ``scaleformer`` command line."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from scaleformer.bench import dilated as bench_dilated
from scaleformer.bench import moe as bench_moe
from scaleformer.bench import retention as bench_retention
from scaleformer.build import build, load
from scaleformer.config import ConfigError, TransformerConfig
from scaleformer.data.tokenizer import ByteTokenizer
from scaleformer.generation import generate
from scaleformer.presets import list_presets, load_preset


def _cmd_presets(args: argparse.Namespace) -> int:
    for name in list_presets():
        cfg = load_preset(name)
        if isinstance(cfg, TransformerConfig):
            print(f"{name:14s} {cfg.arch:16s} d={cfg.embed_dim:<5d} layers={cfg.layers:<3d} heads={cfg.heads:<3d} "
                  f"norm={cfg.norm:9s} position={cfg.position}")
        else:
            print(name)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    print(load_preset(args.preset).to_json())
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    if args.checkpoint:
        model = load(args.checkpoint)
        origin = f"checkpoint {args.checkpoint}"
    else:
        model = build(load_preset(args.preset))
        origin = f"preset {args.preset} (random weights: train one first for meaningful text)"
    config = model.config
    tokenizer = ByteTokenizer()
    if config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"the byte tokenizer needs vocab_size >= {tokenizer.vocab_size}, model has {config.vocab_size}")
    prompt = torch.tensor([tokenizer.encode(args.prompt, add_bos=True)])
    model.eval()
    kwargs = {}
    if getattr(config, "arch", None) == "encoder_decoder":
        kwargs["source_ids"] = prompt
        prompt = torch.tensor([[tokenizer.bos_id]])
    elif getattr(config, "arch", None) == "encoder":
        raise ConfigError(f"{args.preset} is an encoder (bidirectional): it cannot generate; try gpt-tiny or mt-tiny")
    start = time.perf_counter()
    ids = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, stop_tokens=tokenizer.eos_id, **kwargs)
    elapsed = time.perf_counter() - start
    new = ids.shape[1] - prompt.shape[1]
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {origin}, {params / 1e6:.2f}M parameters")
    print(f"prompt: {args.prompt!r}")
    print(f"output: {tokenizer.decode(ids[0, prompt.shape[1]:].tolist())!r}")
    print(f"{new} tokens in {elapsed:.2f}s ({new / max(elapsed, 1e-9):.1f} tokens/s)")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scaleformer", description="Foundation architectures for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("presets", help="list the named configs").set_defaults(run=_cmd_presets)
    cfg = sub.add_parser("config", help="print a preset's config as JSON")
    cfg.add_argument("preset")
    cfg.set_defaults(run=_cmd_config)
    gen = sub.add_parser("generate", help="generate text from a preset (random weights) or a checkpoint")
    gen.add_argument("--preset", default="gpt-tiny", help="named config (see `scaleformer presets`)")
    gen.add_argument("--checkpoint", help="directory written by scaleformer.save (overrides --preset)")
    gen.add_argument("--prompt", default="The ")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(run=_cmd_generate)
    bench = sub.add_parser("bench", help="run a benchmark (prints a table; --json PATH writes the figures)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    retention = bench_sub.add_parser("retention", help="RetNet forms vs attention: training and decoding cost")
    bench_retention.add_arguments(retention)
    retention.set_defaults(run=bench_retention.run)
    dilated = bench_sub.add_parser("dilated", help="LongNet dilated vs dense attention; sequence-parallel traffic")
    bench_dilated.add_arguments(dilated)
    dilated.set_defaults(run=bench_dilated.run)
    moe = bench_sub.add_parser("moe", help="MoE dispatch by index vs one-hot einsums: tokens/s and memory")
    bench_moe.add_arguments(moe)
    moe.set_defaults(run=bench_moe.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
