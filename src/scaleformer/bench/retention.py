"""``scaleformer bench retention``: the trade-offs of RetNet's forms, against attention.

(a) Training cost: forward+backward time and peak memory of one retention call in the parallel and
    chunkwise forms, and of SDPA causal attention, at the same heads and head dims, T = 1k … 16k.
    ``--decay token`` times gated retention instead: a decay per head and token, which needs gradients.
(b) Decoding cost: per-token latency and cache memory of a RetNet (recurrent form, fixed-size state)
    and a Transformer Decoder (KV cache), same width and depth, at contexts 512 … 16k. The context is
    put in the cache directly (random keys/values/states of the right size): a decode step's cost depends
    on the cache's size, not its contents, and this keeps a 16k-token dense prefill out of the run.
(c) The same trade-off at the model level: forward+backward of whole RetNet presets (batch 1, random
    tokens, cross-entropy) at ``--model-length`` in the parallel and chunkwise forms, each preset with its
    own chunk size — the ratio users see when they train — beside the retention computation alone at the
    preset's heads, head dims, decay and chunk size. "bound" is parallel model time over what the chunkwise
    model spends outside retention (its time less layers × the chunkwise op's): the largest ratio any
    chunkwise form could give, since projections, FFNs and the head cost the same in both forms.
(d) ``--op-presets``: the retention computation alone for presets too large to run whole here (opt-in).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch
import torch.nn.functional as F

from scaleformer.bench.common import log_log_slope, machine_info, peak_memory, print_table, time_call, write_json
from scaleformer.cache import TransformerCache
from scaleformer.build import build
from scaleformer.models.architecture import ModelConfig, Retention
from scaleformer.models.families import retnet, transformer
from scaleformer.presets import load_preset
from scaleformer.layers.retention import retention_log_decays
from scaleformer.models.transformer import Decoder
from scaleformer.ops.retention import retention

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384],
                        help="sequence lengths for the training-cost table")
    parser.add_argument("--contexts", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192, 16384],
                        help="context lengths for the decoding table (none: no decoding table)")
    parser.add_argument("--batch", type=int, default=1, help="batch of the op benchmark, table (a)")
    parser.add_argument("--heads", type=int, default=4, help="heads of the op benchmark")
    parser.add_argument("--head-dim", type=int, default=64, help="key and value head dim of the op benchmark")
    parser.add_argument("--chunk-size", type=int, default=64, help="chunk length of the chunkwise form")
    parser.add_argument("--decay", choices=["head", "token"], default="head",
                        help="retention's decay in table (a): one per head (RetNet) or per head and token (gated)")
    parser.add_argument("--max-quadratic-gb", type=float, default=6.0,
                        help="skip the parallel form where its T×T matrices would exceed this many GB")
    parser.add_argument("--presets", nargs="*", default=["retnet-tiny", "retnet-mini", "gret-tiny", "retnet-base"],
                        help="RetNet presets of table (c)")
    parser.add_argument("--model-length", type=int, default=4096, help="sequence length of tables (c) and (d)")
    parser.add_argument("--op-presets", nargs="*", default=[],
                        help="table (d): RetNet presets whose retention computation alone is timed (e.g. retnet-7b)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median)")
    parser.add_argument("--backends", nargs="+", choices=["torch", "triton", "fla"], default=["torch"],
                        help="table (a)'s chunkwise form: our PyTorch form, our Triton kernels, and/or "
                             "flash-linear-attention's chunk_retention / chunk_simple_gla (when installed)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of table (a)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the figures to this JSON file")


def _op_case(form: str, t: int, heads: int, dim: int, chunk: int, device: torch.device, dtype: torch.dtype,
             decay: str = "head", value_dim: int | None = None, batch: int = 1):
    torch.manual_seed(0)
    value_dim = value_dim or dim
    q, k = (torch.randn(batch, heads, t, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    v = torch.randn(batch, heads, t, value_dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(batch, heads, t, value_dim, device=device, dtype=dtype)
    if decay == "head":
        log_decay = retention_log_decays(heads).to(device)
    else:  # gated: YOCO's logsigmoid(logits) / 16, learned, so it needs a gradient
        log_decay = (F.logsigmoid(torch.randn(batch, heads, t, device=device, dtype=dtype)) / 16).requires_grad_()

    def step() -> None:
        if form == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif form == "fla":
            out = _fla(q, k, v, log_decay if decay == "token" else None)
        elif form == "triton":
            out, _ = retention(q, k, v, log_decay=log_decay, form="chunkwise", chunk_size=chunk, backend="triton")
        else:
            out, _ = retention(q, k, v, log_decay=log_decay, form=form, chunk_size=chunk)
        out.backward(grad)
        q.grad = k.grad = v.grad = log_decay.grad = None

    return step


def _fla(q, k, v, log_decay):
    """flash-linear-attention's chunk kernels on our (B, H, T, D) tensors (its layout is (B, T, H, D)):
    chunk_retention (its decays are RetNet's 1 − 2^(−5−h), as ours) or, for per-token decays,
    chunk_simple_gla."""
    import inspect

    from fla.ops.retention import chunk_retention
    from fla.ops.simple_gla import chunk_simple_gla

    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    if log_decay is None:
        options = {"head_first": False} if "head_first" in inspect.signature(chunk_retention).parameters else {}
        out, _ = chunk_retention(q, k, v, **options)
    else:
        options = {"head_first": False} if "head_first" in inspect.signature(chunk_simple_gla).parameters else {}
        out, _ = chunk_simple_gla(q, k, v, log_decay.transpose(1, 2), **options)
    return out.transpose(1, 2)


def _forms(args: argparse.Namespace) -> list[str]:
    """Table (a)'s columns: our forms and SDPA, then the other chunkwise backends asked for."""
    forms = ["parallel", "chunkwise", "sdpa"] if "torch" in args.backends else ["sdpa"]
    for backend in ("triton", "fla"):
        if backend in args.backends:
            forms.append(backend)
    if "fla" in forms:
        try:
            import fla.ops.retention  # noqa: F401
        except ImportError:
            print("  (flash-linear-attention is not installed: its column is left empty)")
            forms.remove("fla")
    return forms


def training_cost(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    results = []
    for t in args.lengths:
        row: dict[str, Any] = {"T": t}
        for form in _forms(args):
            quadratic_bytes = 4 * args.batch * args.heads * t * t * torch.finfo(dtype).bits // 8  # scores, decay, grads
            if form == "parallel" and quadratic_bytes > args.max_quadratic_gb * 2**30:
                row[f"{form}_s"] = row[f"{form}_peak_mb"] = None
                continue
            step = _op_case(form, t, args.heads, args.head_dim, args.chunk_size, device, dtype, args.decay,
                            batch=args.batch)
            row[f"{form}_peak_mb"] = peak_memory(step, device=device) / 2**20
            row[f"{form}_s"] = time_call(step, device=device, warmup=1, repeats=args.repeats)
        base = "chunkwise" if "chunkwise_s" in row else "triton" if "triton_s" in row else "sdpa"
        for other in ("parallel", "sdpa", "triton", "fla"):
            ratio = None if row.get(f"{other}_s") is None else row[f"{other}_s"] / row[f"{base}_s"]
            row[f"{other}_over_chunkwise"] = ratio
        results.append(row)
        print(f"  T={t}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)), flush=True)
    return results


def op_cost(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The retention computation of one layer of preset ``name`` alone (forward+backward, batch 1, at
    ``--model-length``): its heads, key and value head dims (the value carrying the normalizer's column
    of ones, as the layer's does), decay kind and chunk size, in both forms (the parallel one skipped past
    ``--max-quadratic-gb``)."""
    cfg = load_preset(name)
    mixers = {layer.mixer for layer in cfg.layers} if isinstance(cfg, ModelConfig) else set()
    if len(mixers) != 1 or not isinstance(next(iter(mixers)), Retention):
        raise ValueError(f"{name} is not a RetNet preset (its retention computation is what is timed)")
    mixer = next(iter(mixers))
    t, heads = args.model_length, mixer.heads
    key_dim = cfg.embed_dim // heads
    value_dim = mixer.value_dim // heads + (0 if mixer.normalizer == "none" else 1)
    decay = "token" if mixer.decay == "gated" else "head"
    row: dict[str, Any] = {"preset": name, "T": t, "chunk_size": mixer.chunk_size, "heads": heads,
                           "key_dim": key_dim, "value_dim": value_dim, "layers": len(cfg.layers)}
    for form in ("parallel", "chunkwise"):
        if form == "parallel" and 4 * heads * t * t * 4 > args.max_quadratic_gb * 2**30:
            row["op_parallel_s"] = None
            continue
        step = _op_case(form, t, heads, key_dim, mixer.chunk_size, device, torch.float32, decay, value_dim)
        row[f"op_{form}_s"] = time_call(step, device=device, warmup=1, repeats=args.repeats)
    parallel = row["op_parallel_s"]
    row["op_parallel_over_chunkwise"] = None if parallel is None else parallel / row["op_chunkwise_s"]
    return row


def model_cost(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    results = []
    for name in args.presets:
        torch.manual_seed(0)
        model = build(load_preset(name)).to(device)
        ids = torch.randint(0, model.config.vocab_size, (1, args.model_length + 1), device=device)
        row: dict[str, Any] = {"preset": name, "T": args.model_length,
                               "chunk_size": model.config.layers[0].mixer.chunk_size}
        for form in ("parallel", "chunkwise"):
            def step(form=form, model=model) -> None:
                logits = model(ids[:, :-1], form=form).logits
                F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
                model.zero_grad(set_to_none=True)

            row[f"{form}_s"] = time_call(step, device=device, warmup=1, repeats=args.repeats)
        row["parallel_over_chunkwise"] = row["parallel_s"] / row["chunkwise_s"]
        del model
        op = op_cost(name, args, device)
        row.update({k: op[k] for k in ("op_parallel_s", "op_chunkwise_s", "op_parallel_over_chunkwise")})
        outside = row["chunkwise_s"] - op["layers"] * op["op_chunkwise_s"]  # what both forms spend alike
        row["bound"] = row["parallel_s"] / outside if outside > 0 else None
        results.append(row)
        print(f"  {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)), flush=True)
    return results


def _decode_models(device: torch.device) -> tuple[Decoder, Decoder]:
    torch.manual_seed(0)
    common = dict(vocab_size=1024, embed_dim=512, layers=6, ffn_dim=864)
    retention = build(retnet(value_dim=864, heads=2, **common))
    attention = build(transformer(heads=8, ffn="glu", activation="swish", bias=False, norm_type="rmsnorm",
                                  position="rope", **common))
    return retention.to(device).eval(), attention.to(device).eval()


def _retnet_cache(model: Decoder, context: int, device: torch.device) -> TransformerCache:
    cfg, mixer = model.config, model.config.layers[0].mixer
    cache = model.new_cache()
    shape = (1, mixer.heads, cfg.embed_dim // mixer.heads, mixer.value_dim // mixer.heads + 1)
    for layer in cache.layers:  # as if `context` tokens had been read
        layer.update(torch.randn(shape, device=device) * 0.01)
    cache.append_tokens(torch.ones(1, context, dtype=torch.bool, device=device),
                        torch.arange(context, device=device)[None])
    return cache


def _decoder_cache(model: Decoder, context: int, reserve: int, device: torch.device) -> TransformerCache:
    cfg, heads = model.config, model.config.layers[0].mixer.heads
    cache = model.new_cache()
    for layer in cache.layers:
        layer.reserve(context + reserve)
        shape = (1, heads, context, cfg.embed_dim // heads)
        layer.update(torch.randn(shape, device=device) * 0.1, torch.randn(shape, device=device))
    cache.append_tokens(torch.ones(1, context, dtype=torch.bool, device=device),
                        torch.arange(context, device=device)[None])
    return cache


def decoding_cost(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Per-token latency at each context. Cells are timed round-robin (every model and context once per
    round, medians over rounds), so a slow spell of the shared machine hits all cells alike."""
    retnet, decoder = _decode_models(device)
    token = torch.tensor([[7]], device=device)
    rounds, steps_per_cell = 3 * args.repeats, 5
    reserve = rounds * (steps_per_cell + 1) + 64
    caches = {c: (_retnet_cache(retnet, c, device), _decoder_cache(decoder, c, reserve, device)) for c in args.contexts}
    cache_mb = {c: (r.nbytes() / 2**20, d.nbytes() / 2**20) for c, (r, d) in caches.items()}  # at the context
    samples: dict[tuple[str, int], list[float]] = {(m, c): [] for m in ("retnet", "decoder") for c in args.contexts}
    with torch.no_grad():
        for _ in range(rounds):
            for context, (r_cache, d_cache) in caches.items():
                for name, model, cache in (("retnet", retnet, r_cache), ("decoder", decoder, d_cache)):
                    seconds = time_call(lambda: model(token, cache=cache), device=device, warmup=1,
                                        repeats=steps_per_cell)
                    samples[(name, context)].append(seconds)
    results = []
    for context in caches:
        row: dict[str, Any] = {"context": context}
        row["retnet_ms"] = 1e3 * statistics.median(samples[("retnet", context)])
        row["decoder_ms"] = 1e3 * statistics.median(samples[("decoder", context)])
        row["retnet_cache_mb"], row["decoder_cache_mb"] = cache_mb[context]
        row["decoder_over_retnet"] = row["decoder_ms"] / row["retnet_ms"]
        results.append(row)
    base = results[0]
    for row in results:
        row["retnet_vs_first"] = row["retnet_ms"] / base["retnet_ms"]
        row["decoder_vs_first"] = row["decoder_ms"] / base["decoder_ms"]
    return results


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    info = machine_info(device)
    print(f"retention benchmark on {info}; op: heads={args.heads}, head dim={args.head_dim}, "
          f"chunk={args.chunk_size}, decay per {args.decay}, {args.dtype}, batch {args.batch}")
    training = training_cost(args, device, dtype)
    forms = [form for form in _forms(args) if f"{form}_s" in training[0]]
    print_table("(a) forward+backward of one retention/attention call: median seconds (x/chunk: time over the "
                "chunkwise form's), peak tensor MB",
                ["T", *(f"{f} s" for f in forms), *(f"{f}/chunk" for f in forms if f in ("parallel", "sdpa",
                                                                                       "triton", "fla")),
                 *(f"{f} MB" for f in forms)],
                [[r["T"], *(r[f"{f}_s"] for f in forms),
                  *(r[f"{f}_over_chunkwise"] for f in forms if f in ("parallel", "sdpa", "triton", "fla")),
                  *(r[f"{f}_peak_mb"] for f in forms)] for r in training])
    lengths = [r["T"] for r in training]
    slopes = {form: log_log_slope(lengths, [r[f"{form}_peak_mb"] or 0 for r in training]) for form in forms}
    time_slopes = {form: log_log_slope(lengths, [r[f"{form}_s"] or 0 for r in training]) for form in forms}
    print("log-log slope of peak memory vs T: " + ", ".join(f"{k} {v:.2f}" for k, v in slopes.items() if v))
    print("log-log slope of time vs T:        " + ", ".join(f"{k} {v:.2f}" for k, v in time_slopes.items() if v))

    models = model_cost(args, device) if args.presets else []
    if models:
        print_table(f"(c) forward+backward of whole models at T={args.model_length}, batch 1: median seconds; "
                    "op: one layer's retention computation alone; bound: see the module's docstring",
                    ["preset", "chunk", "parallel s", "chunkwise s", "parallel/chunk", "op parallel s",
                     "op chunkwise s", "op parallel/chunk", "bound"],
                    [[r["preset"], r["chunk_size"], r["parallel_s"], r["chunkwise_s"], r["parallel_over_chunkwise"],
                      r["op_parallel_s"], r["op_chunkwise_s"], r["op_parallel_over_chunkwise"], r["bound"]]
                     for r in models])
    ops = []
    for name in args.op_presets:
        ops.append(op_cost(name, args, device))
        print(f"  {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in ops[-1].items() if isinstance(v, float)),
              flush=True)
    if ops:
        print_table(f"(d) one layer's retention computation alone at T={args.model_length}, batch 1, fp32: "
                    "median seconds (parallel skipped past --max-quadratic-gb)",
                    ["preset", "heads", "key dim", "value dim", "chunk", "parallel s", "chunkwise s", "parallel/chunk"],
                    [[r["preset"], r["heads"], r["key_dim"], r["value_dim"], r["chunk_size"], r["op_parallel_s"],
                      r["op_chunkwise_s"], r["op_parallel_over_chunkwise"]] for r in ops])

    decoding = decoding_cost(args, device) if args.contexts else []
    if decoding:
        first = decoding[0]["context"]
        print_table("(b) per-token decoding, width 512, 6 layers, batch 1: median ms, cache MB",
                    ["context", "retnet ms", "decoder ms", "decoder/retnet", f"retnet vs {first}", f"decoder vs {first}",
                     "retnet cache MB", "decoder cache MB"],
                    [[r["context"], r["retnet_ms"], r["decoder_ms"], r["decoder_over_retnet"], r["retnet_vs_first"],
                      r["decoder_vs_first"], r["retnet_cache_mb"], r["decoder_cache_mb"]] for r in decoding])
    if args.json:
        write_json(args.json, {"benchmark": "retention", "machine": info, "settings": {
            k: v for k, v in vars(args).items() if k not in ("json", "run", "command", "bench")},
            "training": training, "memory_slopes": slopes, "time_slopes": time_slopes, "models": models,
            "ops": ops, "decoding": decoding})
    return 0
