"""``scaleformer bench attention``: what grouped-query and sliding-window attention save when decoding.

One decoder per variant — full multi-head attention, grouped-query (``kv_heads``), multi-query
(``kv_heads=1``) and a sliding window — with the same width, depth and heads. Each reads a prompt of
``--context`` tokens in one call, then decodes ``--steps`` tokens one at a time. Reported per variant: the
cache's bytes after the prompt and after decoding (``cache.nbytes()``: keys and values held), and the
median latency of one decoding step, all in one process so the variants compare as ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

import scaleformer as sf
from scaleformer.bench.common import machine_info, print_table, write_json

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--context", type=int, default=2048, help="prompt tokens read before decoding")
    parser.add_argument("--steps", type=int, default=32, help="tokens decoded one at a time (timed)")
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads of the grouped-query variant")
    parser.add_argument("--window", type=int, default=256, help="window of the sliding-window variant")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="decoding runs per variant (round-robin)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the figures to this JSON file")


def _variants(args: argparse.Namespace) -> dict[str, sf.ModelConfig]:
    base = dict(vocab_size=1024, embed_dim=args.embed_dim, heads=args.heads, layers=args.layers,
                ffn_dim=4 * args.embed_dim, position="rope")
    return {"full": sf.transformer(**base), f"gqa-{args.kv_heads}": sf.transformer(**base, kv_heads=args.kv_heads),
            "mqa": sf.transformer(**base, kv_heads=1), f"window-{args.window}": sf.transformer(**base, window=args.window)}


def _decode(model: torch.nn.Module, prompt: torch.Tensor, tokens: torch.Tensor, device: torch.device) -> tuple[int, int, list[float]]:
    """(cache bytes after the prompt, after decoding, seconds of each step)."""
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        after_prompt = out.cache.nbytes()
        seconds = []
        for step in range(tokens.shape[1]):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            out = model(tokens[:, step:step + 1], cache=out.cache)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - start)
    return after_prompt, out.cache.nbytes(), seconds


def measure(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    prompt = torch.randint(0, 1024, (args.batch, args.context), device=device)
    tokens = torch.randint(0, 1024, (args.batch, args.steps), device=device)
    models = {name: sf.build(cfg).to(device).eval() for name, cfg in _variants(args).items()}
    for model in models.values():  # warm-up: kernels, allocator
        _decode(model, prompt[:, :64], tokens[:, :4], device)
    steps: dict[str, list[float]] = {name: [] for name in models}
    bytes_: dict[str, tuple[int, int]] = {}
    for _ in range(args.repeats):  # round-robin, so drifting machine load touches every variant alike
        for name, model in models.items():
            after_prompt, after_decoding, seconds = _decode(model, prompt, tokens, device)
            bytes_[name] = (after_prompt, after_decoding)
            steps[name].extend(seconds)
    rows = [{"variant": name, "cache_mb_after_prompt": bytes_[name][0] / 2**20,
             "cache_mb_after_decoding": bytes_[name][1] / 2**20, "step_ms": 1000 * statistics.median(steps[name])}
            for name in models]
    full = rows[0]  # "full" comes first
    for row in rows:
        row["cache_ratio"] = row["cache_mb_after_decoding"] / full["cache_mb_after_decoding"]
        row["step_speedup"] = full["step_ms"] / row["step_ms"]
    return rows


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    info = machine_info(device)
    print(f"Attention variants, decoding on {info}: {args.layers} layers, width {args.embed_dim}, {args.heads} heads, "
          f"RoPE, fp32, batch {args.batch}; prompt {args.context} tokens, then {args.steps} one-token steps "
          f"(median of {args.repeats} runs)")
    rows = measure(args, device)
    print_table("KV cache and decoding latency vs full multi-head attention",
                ["variant", "cache MB (prompt)", "cache MB (end)", "cache ratio", "step ms", "step speed-up"],
                [[r["variant"], r["cache_mb_after_prompt"], r["cache_mb_after_decoding"], r["cache_ratio"],
                  r["step_ms"], r["step_speedup"]] for r in rows])
    if args.json:
        write_json(args.json, {"benchmark": "attention", "machine": info, "settings": {
            k: v for k, v in vars(args).items() if k not in ("json", "run", "command", "bench")}, "results": rows})
    return 0
