"""``scaleformer bench generate``: inference as a server runs it, for a Transformer, a RetNet, Gated DeltaNet
and a hybrid (Gated DeltaNet with one attention layer in four) of one width and depth.

1. **Decoding throughput against batch size** through the continuous-batching engine: B requests are
   prefilled and joined, then the engine's steps are timed; tokens/s = B × steps / seconds (median of
   rounds, the models taking turns, with the interquartile range).
2. **Time to first token against prompt length**, with and without a cached prefix: the step that admits one
   request to an idle engine (its prefill and first token). "no cache": one prefill call; "storing": the
   first request with a :class:`~scaleformer.engine.PrefixCache` (prefilled in blocks, each block's state
   kept); "cached prefix": a second request sharing all but its last 16 tokens with the first.
3. **Speculative decoding** (``--target`` and ``--draft`` checkpoints with one tokenizer): time and acceptance
   of the target alone against the target with the draft, greedy and at temperature 1.
4. **The compiled decoding step** (:mod:`scaleformer.compiled_decoding`; ``--no-compile`` skips it): per-token
   milliseconds of the model's own eager step against its compiled step, batch 1 and 4, after a prompt of
   ``--prompt`` tokens (the two taking turns round by round); a model the step does not cover says why.
5. **The server under load** (``--requests``, ``--concurrency``): ``scaleformer serve`` in a process of its
   own on loopback, a fixed number of requests from a fixed number of clients; requests/s, tokens/s, and
   the 50th and 99th percentile latency.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch

import scaleformer as sf
from scaleformer.bench.common import Timing, machine_info, print_table, time_interleaved, write_json
from scaleformer.engine import Engine, PrefixCache, SamplingOptions

__all__ = ["add_arguments", "run", "models"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens of each request (throughput table)")
    parser.add_argument("--steps", type=int, default=16, help="decoding steps timed per batch")
    parser.add_argument("--rounds", type=int, default=5, help="rounds over the models (the medians' sample)")
    parser.add_argument("--prompts", type=int, nargs="+", default=[128, 512, 2048],
                        help="prompt lengths of the time-to-first-token table")
    parser.add_argument("--prefix-block", type=int, default=64)
    parser.add_argument("--target", help="a trained checkpoint: the target of the speculative table")
    parser.add_argument("--draft", help="a smaller checkpoint with the target's tokenizer: the draft")
    parser.add_argument("--lookahead", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per speculative run")
    parser.add_argument("--requests", type=int, default=64, help="requests of the server load test (0: skip it)")
    parser.add_argument("--concurrency", type=int, default=16, help="clients sending them at once")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each load-test request")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="time the compiled decoding step against the eager one (compiles each covered model, "
                             "10-35 s apiece on 2 cores; needs a C++ compiler)")
    parser.add_argument("--json", help="write the figures to this JSON file")


def models(args: argparse.Namespace) -> dict[str, sf.ConfigBase]:
    d, n, h, v = args.embed_dim, args.layers, args.heads, args.vocab_size
    head_dim = d // h
    return {
        "gpt": sf.transformer(vocab_size=v, embed_dim=d, layers=n, heads=h, kv_heads=h // 4 or 1, ffn_dim=8 * d // 3,
                              ffn="glu", activation="swish", norm_type="rmsnorm", position="rope", bias=False),
        "retnet": sf.retnet(vocab_size=v, embed_dim=d, value_dim=d, layers=n, heads=h, ffn_dim=8 * d // 3),
        "gdn": sf.delta_rule_lm(vocab_size=v, embed_dim=d, layers=n, heads=h, head_dim=head_dim),
        "gdn-hybrid": sf.delta_rule_lm(vocab_size=v, embed_dim=d, layers=n, heads=h, head_dim=head_dim,
                                       attention_every=4, attention_heads=h, attention_kv_heads=h // 4 or 1),
    }


def _prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=generator).tolist()


def throughput(args: argparse.Namespace, built: dict[str, torch.nn.Module]) -> list[dict[str, Any]]:
    rows = []
    for batch in args.batches:
        seconds: dict[str, list[float]] = {name: [] for name in built}
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for name, model in built.items():
                engine = Engine(model, max_batch=batch)
                for prompt in _prompts(batch, args.prompt, args.vocab_size, round_):
                    engine.submit(prompt, SamplingOptions(max_new_tokens=args.steps + 1))
                engine.step()  # every request prefilled and joined
                start = time.perf_counter()
                for _ in range(args.steps):
                    engine.step()
                if round_:
                    seconds[name].append(time.perf_counter() - start)
        for name, values in seconds.items():
            timing = Timing(tuple(values))
            tokens = batch * args.steps
            rows.append({"model": name, "batch": batch, "tokens_per_s": tokens / timing.median,
                         "tokens_per_s_q25": tokens / timing.high, "tokens_per_s_q75": tokens / timing.low,
                         "step_ms": 1e3 * timing.median / args.steps, "timing": timing.as_dict()})
    for row in rows:
        single = next(r for r in rows if r["model"] == row["model"] and r["batch"] == args.batches[0])
        row["vs_first_batch"] = row["tokens_per_s"] / single["tokens_per_s"]
    return rows


def first_token(args: argparse.Namespace, built: dict[str, torch.nn.Module]) -> list[dict[str, Any]]:
    rows = []
    options = SamplingOptions(max_new_tokens=1)
    for length in args.prompts:
        seconds: dict[tuple[str, str], list[float]] = {}
        for round_ in range(args.rounds + 1):
            shared = _prompts(1, length - 16, args.vocab_size, 100 + round_)[0]
            first, second = (shared + tail for tail in _prompts(2, 16, args.vocab_size, 200 + round_))
            for name, model in built.items():
                timings = []
                for cached in (False, True):
                    engine = Engine(model, prefix_cache=PrefixCache(args.prefix_block) if cached else None)
                    for prompt in (first, second) if cached else (first,):
                        engine.submit(prompt, options)
                        start = time.perf_counter()
                        engine.step()
                        timings.append(time.perf_counter() - start)
                if round_:
                    for kind, value in zip(("no cache", "storing", "cached prefix"), timings):
                        seconds.setdefault((name, kind), []).append(value)
        for (name, kind), values in seconds.items():
            timing = Timing(tuple(values))
            rows.append({"model": name, "prompt": length, "kind": kind, "ttft_ms": 1e3 * timing.median,
                         "timing": timing.as_dict()})
    return rows


def speculative(args: argparse.Namespace) -> list[dict[str, Any]]:
    from scaleformer.train.checkpoint import resolve_checkpoint
    from scaleformer.data.tokenizer import load_tokenizer
    from scaleformer.serve import encode_prompt
    from scaleformer.speculative import SpeculativeStats

    target_dir, draft_dir = resolve_checkpoint(args.target), resolve_checkpoint(args.draft)
    target, draft = sf.load(target_dir).eval(), sf.load(draft_dir).eval()
    tokenizer = load_tokenizer(target_dir)
    texts = ["The ", "Once upon a time", "In the beginning", "She said that", "It was the best of times"]
    rows = []
    for temperature in (0.0, 1.0):
        alone: list[float] = []
        with_draft: list[float] = []
        stats = SpeculativeStats()
        for round_ in range(args.rounds + 1):
            for index, text in enumerate(texts):
                ids = torch.tensor([encode_prompt(tokenizer, text)])
                seed = 1000 * round_ + index
                start = time.perf_counter()
                sf.generate(target, ids, args.new_tokens, temperature=temperature, stop_tokens=None,
                            generator=torch.Generator().manual_seed(seed))
                middle = time.perf_counter()
                sf.generate(target, ids, args.new_tokens, temperature=temperature, stop_tokens=None,
                            generator=torch.Generator().manual_seed(seed), draft=draft, lookahead=args.lookahead,
                            stats=stats if round_ else None)
                end = time.perf_counter()
                if round_:
                    alone.append(middle - start)
                    with_draft.append(end - middle)
        ratios = np.asarray(alone) / np.asarray(with_draft)  # paired: the same prompt and seed
        rows.append({"temperature": temperature, "lookahead": args.lookahead,
                     "target_alone_tokens_per_s": args.new_tokens / statistics.median(alone),
                     "speculative_tokens_per_s": args.new_tokens / statistics.median(with_draft),
                     "speedup": float(np.median(ratios)), "speedup_q25": float(np.percentile(ratios, 25)),
                     "speedup_q75": float(np.percentile(ratios, 75)), "acceptance": stats.acceptance_rate,
                     "tokens_per_target_call": stats.tokens_per_round})
    return rows


def compiled_steps(args: argparse.Namespace, built: dict[str, torch.nn.Module]) -> list[dict[str, Any]]:
    """Per-token ms, the eager step against the compiled one, on caches holding ``args.prompt`` tokens."""
    from scaleformer.compiled_decoding import CompiledDecoding, unsupported_reason

    rows = []
    for name, model in built.items():
        reason = unsupported_reason(model)
        if reason is not None:
            rows.append({"model": name, "not_covered": reason})
            continue
        step = CompiledDecoding(model)
        for batch in (1, 4):
            ids = torch.tensor(_prompts(batch, args.prompt, args.vocab_size, 300))
            token = ids[:, -1:]
            with torch.no_grad():
                prefilled = model(ids, use_cache=True).cache
                eager, compiled = prefilled.fork(), prefilled.fork()
                step(token, compiled.fork())  # compile here (this batch size's version), not in a timed round
                timings = time_interleaved({"eager": lambda: model(token, cache=eager),
                                            "compiled": lambda: step(token, compiled)},
                                           rounds=args.rounds, repeats=args.steps)
            rows.append({"model": name, "batch": batch, "eager_ms": 1e3 * timings["eager"].median,
                         "compiled_ms": 1e3 * timings["compiled"].median,
                         "speedup": timings["eager"].median / timings["compiled"].median,
                         "eager": timings["eager"].as_dict(), "compiled": timings["compiled"].as_dict()})
    return rows


def _iqr_ms(timing: dict[str, Any]) -> str:
    return f"{1e3 * timing['q25_s']:.3g}–{1e3 * timing['q75_s']:.3g}"


def server_load(args: argparse.Namespace, config: sf.ConfigBase, name: str) -> dict[str, Any]:
    """``scaleformer serve`` on a random-weight checkpoint of ``config`` (byte tokenizer), under load."""
    from scaleformer.data.tokenizer import ByteTokenizer

    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder) / name
        torch.manual_seed(0)
        sf.save(sf.build(config), directory)
        ByteTokenizer().save(directory)
        process = subprocess.Popen([sys.executable, "-m", "scaleformer", "serve", str(directory), "--port", "0",
                                    "--max-batch", str(args.concurrency), "--max-queue", str(args.requests)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            line = process.stdout.readline()
            match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            if not match:
                raise RuntimeError(f"the server did not start: {line}")
            url = f"http://127.0.0.1:{match.group(1)}/v1/completions"

            def one(index: int) -> tuple[float, int]:
                body = json.dumps({"model": name, "prompt": f"Request number {index}: tell me a story about",
                                   "max_tokens": args.max_tokens, "temperature": 0}).encode()
                start = time.perf_counter()
                request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=600) as response:
                    answer = json.loads(response.read())
                return time.perf_counter() - start, answer["usage"]["completion_tokens"]

            one(-1)  # warm-up
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
                results = list(pool.map(one, range(args.requests)))
            elapsed = time.perf_counter() - start
        finally:
            process.terminate()
            process.wait(timeout=60)
    latencies = np.asarray([r[0] for r in results])
    tokens = sum(r[1] for r in results)
    return {"model": name, "requests": args.requests, "concurrency": args.concurrency, "completed": len(results),
            "requests_per_s": len(results) / elapsed, "tokens_per_s": tokens / elapsed,
            "latency_p50_s": float(np.percentile(latencies, 50)), "latency_p99_s": float(np.percentile(latencies, 99))}


def run(args: argparse.Namespace) -> int:
    info = machine_info(torch.device("cpu"))
    configs = models(args)
    print(f"Generation on {info}: width {args.embed_dim}, {args.layers} layers, {args.heads} heads, vocabulary "
          f"{args.vocab_size}, fp32; medians of {args.rounds} rounds (models taking turns) with the IQR")
    torch.manual_seed(0)
    built = {name: sf.build(cfg).eval() for name, cfg in configs.items()}
    for name, model in built.items():
        print(f"  {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    payload: dict[str, Any] = {"benchmark": "generate", "machine": info, "settings": {
        k: v for k, v in vars(args).items() if k not in ("json", "run", "command", "bench")}}
    rows = payload["throughput"] = throughput(args, built)
    print_table(f"decoding throughput through the engine (prompts of {args.prompt}, {args.steps} steps timed)",
                ["model", "batch", "tokens/s", "IQR", "step ms", f"vs batch {args.batches[0]}"],
                [[r["model"], r["batch"], r["tokens_per_s"], f"{r['tokens_per_s_q25']:.0f}–{r['tokens_per_s_q75']:.0f}",
                  r["step_ms"], r["vs_first_batch"]] for r in rows])
    rows = payload["first_token"] = first_token(args, built)
    print_table(f"time to first token (ms; cached prefix: all but the last 16 tokens, kept every "
                f"{args.prefix_block})", ["model", "prompt", "no cache", "storing", "cached prefix"],
                [[name, length] + [next(r["ttft_ms"] for r in rows if (r["model"], r["prompt"], r["kind"]) ==
                                        (name, length, kind)) for kind in ("no cache", "storing", "cached prefix")]
                 for length in args.prompts for name in built])
    if args.target and args.draft:
        rows = payload["speculative"] = speculative(args)
        print_table(f"speculative decoding: {args.draft} drafting for {args.target} (lookahead {args.lookahead}, "
                    f"{args.new_tokens} tokens; speed-up: paired per prompt and seed)",
                    ["temperature", "target tokens/s", "speculative tokens/s", "speed-up", "IQR", "acceptance",
                     "tokens per target call"],
                    [[r["temperature"], r["target_alone_tokens_per_s"], r["speculative_tokens_per_s"], r["speedup"],
                      f"{r['speedup_q25']:.2f}–{r['speedup_q75']:.2f}", r["acceptance"], r["tokens_per_target_call"]]
                     for r in rows])
    if args.compile:
        rows = payload["compiled"] = compiled_steps(args, built)
        print_table(f"compiled decoding step against the eager one (ms per token after {args.prompt} prompt tokens; "
                    f"IQR over {args.rounds} rounds)", ["model", "batch", "eager ms", "IQR", "compiled ms", "IQR",
                                                       "eager/compiled"],
                    [[r["model"], r["batch"], r["eager_ms"], _iqr_ms(r["eager"]), r["compiled_ms"],
                      _iqr_ms(r["compiled"]), r["speedup"]] if "batch" in r
                     else [r["model"], "-", "-", "-", "-", "-", "not covered: " + r["not_covered"].split(";")[0]] for r in rows])
    if args.requests:
        loads = payload["server"] = [server_load(args, configs[name], name) for name in ("gpt", "gdn-hybrid")]
        print_table(f"scaleformer serve on loopback: {args.requests} requests from {args.concurrency} clients, "
                    f"max_tokens {args.max_tokens} (random weights: a request may stop early at EOS)",
                    ["model", "completed", "requests/s", "tokens/s", "p50 latency s", "p99 latency s"],
                    [[r["model"], r["completed"], r["requests_per_s"], r["tokens_per_s"], r["latency_p50_s"],
                      r["latency_p99_s"]] for r in loads])
    if args.json:
        write_json(args.json, payload)
    return 0
