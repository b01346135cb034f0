"""``scaleformer bench yoco``: what caching once saves when decoding, against a Transformer and a RetNet.

Four decoders of one width and depth: a Transformer with grouped-query attention (as many key/value heads
as YOCO's one cache), a RetNet, and YOCO with a gated-retention or a sliding-window self-decoder. For each
context length the cache is filled to that length, then one-token steps are timed (median, the models
round-robin). Reading a long prompt through the model on a CPU would take minutes per point, and a step's
cost depends only on what the cache holds, so the caches are filled directly: each model reads one real
token, then every key/value buffer it keeps is extended with random keys and values up to the context
(and the positions with it), exactly the shapes a prompt would leave. Reported: the cache's bytes
(``cache.nbytes()``) and the step latency. A second table times a real prefill, YOCO with and without
skipping the cross-decoder for the prompt's earlier tokens (``logits_to_keep=1``, what ``generate`` asks).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

import scaleformer as sf
from scaleformer.bench.common import machine_info, print_table, time_call, write_json
from scaleformer.cache import KVCache, TransformerCache

__all__ = ["add_arguments", "run", "models", "filled_cache"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536],
                        help="tokens in the cache before the timed steps")
    parser.add_argument("--steps", type=int, default=8, help="one-token steps timed per context and model")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the models (round-robin)")
    parser.add_argument("--embed-dim", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--ffn-dim", type=int, default=2048)
    parser.add_argument("--window", type=int, default=1024, help="window of YOCO's sliding-window self-decoder")
    parser.add_argument("--prefill", type=int, default=2048, help="prompt tokens of the prefill table (0: skip it)")
    parser.add_argument("--json", help="write the figures to this JSON file")


def models(args: argparse.Namespace) -> dict[str, sf.ConfigBase]:
    """The compared configs: one width, depth, head width and FFN width; vocabulary 1024."""
    d, n, h = args.embed_dim, args.layers, args.heads
    yoco = dict(vocab_size=1024, embed_dim=d, layers=n, self_heads=h, heads=h, kv_heads=args.kv_heads,
                ffn_dim=args.ffn_dim)
    return {
        f"Transformer (GQA, {args.kv_heads} kv heads)": sf.transformer(
            vocab_size=1024, embed_dim=d, layers=n, heads=h, kv_heads=args.kv_heads, ffn_dim=args.ffn_dim, ffn="glu",
            activation="swish", norm_type="rmsnorm", position="rope", bias=False),
        "RetNet": sf.retnet(vocab_size=1024, embed_dim=d, value_dim=d, layers=n, heads=h, ffn_dim=args.ffn_dim),
        "YOCO (gated retention)": sf.yoco(**yoco),
        f"YOCO (sliding window {args.window})": sf.yoco(**yoco, self_decoder="sliding_window", window=args.window),
    }


def filled_cache(model: torch.nn.Module, context: int) -> TransformerCache:
    """The cache ``model`` would hold after a prompt of ``context`` tokens (batch 1): one real token read,
    then every key/value buffer extended with random entries to ``context`` slots."""
    with torch.no_grad():
        cache = model(torch.zeros(1, 1, dtype=torch.long), use_cache=True).cache
    extra = context - 1
    for part in cache.parts:
        if isinstance(part, KVCache) and part.key is not None and part.value is not None:
            part.reserve(context + 64)
            key, value = part.key[..., :1, :], part.value[..., :1, :]
            part.update(torch.randn(*key.shape[:-2], extra, key.shape[-1]),
                        torch.randn(*value.shape[:-2], extra, value.shape[-1]))
    mask = torch.ones(1, extra, dtype=torch.bool)
    cache.append_tokens(mask, torch.arange(1, context)[None])
    return cache


def _steps(model: torch.nn.Module, cache: TransformerCache, count: int) -> list[float]:
    seconds = []
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)  # warm-up; windows trim to their span here
        for _ in range(count):
            start = time.perf_counter()
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
            seconds.append(time.perf_counter() - start)
    return seconds


def decoding(args: argparse.Namespace, built: dict[str, torch.nn.Module]) -> list[dict[str, Any]]:
    rows = []
    for context in args.contexts:
        times: dict[str, list[float]] = {name: [] for name in built}
        held: dict[str, int] = {}
        for _ in range(args.repeats):
            for name, model in built.items():
                cache = filled_cache(model, context)
                times[name] += _steps(model, cache, args.steps)
                held[name] = cache.nbytes()
                del cache
        base = statistics.median(times[next(iter(built))])
        for name in built:
            step = statistics.median(times[name])
            rows.append({"context": context, "model": name, "cache_mb": held[name] / 2**20, "step_ms": step * 1e3,
                         "step_vs_transformer": step / base})
    return rows


def prefill(args: argparse.Namespace, built: dict[str, torch.nn.Module]) -> list[dict[str, Any]]:
    prompt = torch.randint(0, 1024, (1, args.prefill))
    cases = [(name, keep) for name in built for keep in ((1, 0) if name.startswith("YOCO") else (1,))]
    rows = []
    with torch.no_grad():
        for name, keep in cases:
            model = built[name]
            seconds = time_call(lambda: model(prompt, use_cache=True, logits_to_keep=keep), device=torch.device("cpu"),
                                warmup=1, repeats=args.repeats)
            rows.append({"model": name, "cross_decoder": "last token" if keep == 1 else "every token",
                         "prefill_s": seconds})
    return rows


def run(args: argparse.Namespace) -> int:
    info = machine_info(torch.device("cpu"))
    print(f"YOCO decoding on {info}: width {args.embed_dim}, {args.layers} layers, {args.heads} heads of "
          f"{args.embed_dim // args.heads}, fp32, batch 1; median of {args.repeats} x {args.steps} steps")
    torch.manual_seed(0)
    built = {name: sf.build(cfg).eval() for name, cfg in models(args).items()}
    rows = decoding(args, built)
    print_table("cache and one decoding step at each context",
                ["context", "model", "cache MB", "step ms", "step vs Transformer"],
                [[r["context"], r["model"], r["cache_mb"], r["step_ms"], r["step_vs_transformer"]] for r in rows])
    prefill_rows = prefill(args, built) if args.prefill else []
    if prefill_rows:
        print_table(f"prefill of {args.prefill} tokens (median s)", ["model", "cross-decoder runs on", "seconds"],
                    [[r["model"], r["cross_decoder"] if r["model"].startswith("YOCO") else "-", r["prefill_s"]]
                     for r in prefill_rows])
    if args.json:
        write_json(args.json, {"benchmark": "yoco", "machine": info, "settings": {
            k: v for k, v in vars(args).items() if k not in ("json", "run", "command", "bench")},
            "decoding": rows, "prefill": prefill_rows})
    return 0
