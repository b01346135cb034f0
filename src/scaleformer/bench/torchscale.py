"""``scaleformer bench torchscale``: scaleformer and TorchScale side by side, in one process.

Every comparison runs the *same function with the same weights*: each TorchScale model is built, given
random weights, and converted with :mod:`scaleformer.interop.torchscale` (so its logits are ours to
≤ 1e-5). Same shapes, same threads, timings interleaved round-robin (medians), fp32.

(a) forward+backward (cross-entropy on random targets) of a Decoder and of a RetNet in the parallel and
    chunkwise forms, at several lengths and chunk sizes; and of the chunkwise retention computation alone;
(b) per-token decode latency with a cache holding ``context`` tokens (random cache contents of the right
    size: a step's cost depends on the cache's size, not its values); ours also within
    :func:`scaleformer.runtime.decoding_layout` ("scaleformer+layout": wide weights column-major, the
    layout ``scaleformer generate`` decodes in on a CPU), and the laid-out RetNet's compiled step
    (:mod:`scaleformer.compiled_decoding`, "scaleformer+compiled");
(c) cross-form disagreement of each library's RetNet: max |logit difference| between its parallel,
    chunkwise and recurrent forms on the same input. TorchScale's recurrent form is run token by token
    (it cannot prefill); ours is one call.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaleformer.bench.common import machine_info, print_table, time_call, write_json

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096], help="training lengths")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[64, 512],
                        help="chunk lengths of the chunkwise form (both libraries run each; TorchScale's default is 512)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 4096], help="decode contexts")
    parser.add_argument("--disagreement-length", type=int, default=1024,
                        help="input length for table (c); longer than a chunk, so the chunkwise form recurs")
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3, help="rounds per measurement (median)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the RetNet's compiled decoding step (scaleformer.compiled_decoding; "
                             "compiles for ~20 s first (2 cores); needs a C++ compiler)")
    parser.add_argument("--json", help="write the figures to this JSON file")


# ------------------------------------------------------------------------------------------------------------
# the two libraries' models, same weights
# ------------------------------------------------------------------------------------------------------------
def _pairs(args: argparse.Namespace) -> dict[str, tuple[nn.Module, nn.Module, Any]]:
    """{"decoder"|"retnet": (TorchScale model, our model, TorchScale config)}."""
    from scaleformer.interop.torchscale import import_torchscale, load_torchscale

    import_torchscale()
    from torchscale.architecture.config import DecoderConfig, RetNetConfig
    from torchscale.architecture.decoder import Decoder
    from torchscale.architecture.retnet import RetNetDecoder
    from torchscale.component.embedding import TextEmbedding

    d = args.embed_dim
    torch.manual_seed(0)
    decoder_cfg = DecoderConfig(vocab_size=args.vocab, decoder_embed_dim=d, decoder_attention_heads=d // 64,
                                decoder_ffn_embed_dim=4 * d, decoder_layers=args.layers, subln=False,
                                xpos_rel_pos=True)
    decoder = Decoder(decoder_cfg, embed_tokens=TextEmbedding(args.vocab, d))
    value = d * 27 // 16  # TorchScale's RetNet presets: value and FFN width ≈ 1.6875·d
    retnet_cfg = RetNetConfig(vocab_size=args.vocab, decoder_embed_dim=d, decoder_value_embed_dim=value,
                              decoder_retention_heads=max(d // 256, 1), decoder_ffn_embed_dim=value,
                              decoder_layers=args.layers, activation_fn="swish")
    retnet = RetNetDecoder(retnet_cfg, embed_tokens=TextEmbedding(args.vocab, d))
    # TorchScale's own initialization: the models exactly as its users get them.
    return {name: (theirs, load_torchscale(theirs.state_dict(), cfg), cfg)
            for name, (theirs, cfg) in {"decoder": (decoder, decoder_cfg), "retnet": (retnet, retnet_cfg)}.items()}


def _set_torchscale_form(model: nn.Module, chunk: int | None) -> None:
    """TorchScale's RetNet picks its form from attributes set at construction; switch them in place."""
    model.chunkwise_recurrent = chunk is not None
    if chunk is not None:
        model.recurrent_chunk_size = chunk
        model.retnet_rel_pos.recurrent_chunk_size = chunk


def _with_chunk(model: nn.Module, chunk: int) -> nn.Module:
    if model.config.chunk_size == chunk:
        return model
    other = type(model)(model.config.replace(chunk_size=chunk)).to(next(model.parameters()).dtype)
    other.load_state_dict(model.state_dict())
    return other.train(model.training)


# ------------------------------------------------------------------------------------------------------------
# (a) training step
# ------------------------------------------------------------------------------------------------------------
def _train_step(logits_of: Callable[[Tensor], Tensor], model: nn.Module, ids: Tensor,
                targets: Tensor) -> Callable[[], None]:
    def step() -> None:
        logits = logits_of(ids)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).backward()
        model.zero_grad(set_to_none=True)

    return step


def training(args: argparse.Namespace, pairs: dict) -> list[dict[str, Any]]:
    rows = []
    cpu = torch.device("cpu")
    ts_decoder, our_decoder, _ = pairs["decoder"]
    ts_retnet, our_retnet, _ = pairs["retnet"]
    for t in args.lengths:
        ids = torch.randint(0, args.vocab, (1, t))
        targets = torch.randint(0, args.vocab, (1, t))
        cells: dict[str, Callable[[], None]] = {
            "decoder/torchscale": _train_step(lambda x: ts_decoder(x)[0], ts_decoder, ids, targets),
            "decoder/scaleformer": _train_step(lambda x: our_decoder(x).logits, our_decoder, ids, targets),
            "retnet-parallel/torchscale": _train_step(lambda x: (_set_torchscale_form(ts_retnet, None),
                                                                 ts_retnet(x)[0])[1], ts_retnet, ids, targets),
            "retnet-parallel/scaleformer": _train_step(lambda x: our_retnet(x, form="parallel").logits, our_retnet,
                                                       ids, targets),
        }
        for chunk in args.chunk_sizes:
            ours = _with_chunk(our_retnet, chunk)
            cells[f"retnet-chunk{chunk}/torchscale"] = _train_step(
                lambda x, c=chunk: (_set_torchscale_form(ts_retnet, c), ts_retnet(x)[0])[1], ts_retnet, ids, targets)
            cells[f"retnet-chunk{chunk}/scaleformer"] = _train_step(
                lambda x, m=ours: m(x, form="chunkwise").logits, ours, ids, targets)
        for model in (ts_decoder, our_decoder, ts_retnet, our_retnet):
            model.train()
        samples: dict[str, list[float]] = {name: [] for name in cells}
        for _ in range(args.repeats):  # round-robin: a slow spell of the machine hits every cell alike
            for name, step in cells.items():
                samples[name].append(time_call(step, device=cpu, warmup=1, repeats=1))
        _set_torchscale_form(ts_retnet, None)
        for name, values in samples.items():
            model_name, library = name.split("/")
            rows.append({"T": t, "model": model_name, "library": library, "seconds": statistics.median(values)})
        print(f"  T={t}: " + ", ".join(f"{n}={statistics.median(v):.3g}s" for n, v in samples.items()), flush=True)
    for model in (ts_decoder, our_decoder, ts_retnet, our_retnet):
        model.eval()
    return rows


def retention_op(args: argparse.Namespace, pairs: dict) -> list[dict[str, Any]]:
    """Forward+backward of the chunkwise retention computation alone (no projections, FFN or head), at the
    longest length: TorchScale's ``chunk_recurrent_forward`` against our op (whose values carry the
    normalizer's extra column, as in our layer)."""
    from torchscale.architecture.retnet import RetNetRelPos

    from scaleformer.layers.retention import retention_log_decays
    from scaleformer.ops.retention import retention

    _, our_retnet, ts_cfg = pairs["retnet"]
    cfg = our_retnet.config
    h, dk, dv, t = cfg.heads, cfg.key_head_dim, cfg.value_head_dim, max(args.lengths)
    ts_layer = pairs["retnet"][0].layers[0].retention
    log_decay = retention_log_decays(h)
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, h, t, dk, generator=generator).requires_grad_() for _ in range(2))
    v = torch.randn(1, t, h * dv, generator=generator).requires_grad_()
    v_ours = torch.randn(1, h, t, dv + 1, generator=generator).requires_grad_()
    grad = torch.randn(1, t, h, dv, generator=generator)
    grad_ours = torch.randn(1, h, t, dv + 1, generator=generator)
    rows = []
    for chunk in args.chunk_sizes:
        ts_cfg.recurrent_chunk_size = chunk
        _, inner_mask = RetNetRelPos(ts_cfg)(t, chunkwise_recurrent=True)

        def theirs() -> None:
            ts_layer.chunk_recurrent_forward(q, k, v, inner_mask).reshape(1, t, h, dv).backward(grad)

        def ours() -> None:
            retention(q, k, v_ours, log_decay=log_decay, form="chunkwise", chunk_size=chunk)[0].backward(grad_ours)

        samples: dict[str, list[float]] = {"torchscale": [], "scaleformer": []}
        for _ in range(args.repeats):
            for library, fn in (("torchscale", theirs), ("scaleformer", ours)):
                samples[library].append(time_call(fn, device=torch.device("cpu"), warmup=1, repeats=1))
        for library, values in samples.items():
            rows.append({"T": t, "model": f"retention-op-chunk{chunk}", "library": library,
                         "seconds": statistics.median(values)})
    ts_cfg.recurrent_chunk_size = 512
    return rows


# ------------------------------------------------------------------------------------------------------------
# (b) decoding
# ------------------------------------------------------------------------------------------------------------
def _filled_caches(pairs: dict, context: int) -> dict[str, tuple[Callable[[], Any], Any]]:
    """Per model/library: (one decode step, its cache), the cache already holding ``context`` tokens."""
    ts_decoder, our_decoder, _ = pairs["decoder"]
    ts_retnet, our_retnet, _ = pairs["retnet"]
    dec_cfg, ret_cfg = our_decoder.config, our_retnet.config
    token = torch.tensor([[7]])

    ts_dec_state: dict[Any, Any] = {}
    for i in range(dec_cfg.layers):
        shape = (1, dec_cfg.heads, context, dec_cfg.head_dim)
        ts_dec_state[i] = {"prev_key": torch.randn(shape) * 0.1, "prev_value": torch.randn(shape)}
    ts_dec_tokens = torch.full((1, context + 1), 7)

    def ts_dec_step() -> None:  # TorchScale takes the whole prefix and keeps its last token
        nonlocal ts_dec_tokens
        ts_decoder(ts_dec_tokens, incremental_state=ts_dec_state)
        ts_dec_tokens = torch.cat([ts_dec_tokens, token], dim=1)

    our_dec_cache = our_decoder.new_cache()
    for layer in our_dec_cache.layers:
        shape = (1, dec_cfg.heads, context, dec_cfg.head_dim)
        layer.update(torch.randn(shape) * 0.1, torch.randn(shape))
    our_dec_cache.append_tokens(torch.ones(1, context, dtype=torch.bool), torch.arange(context)[None])

    ts_ret_state: dict[Any, Any] = {}
    for i in range(ret_cfg.layers):
        # TorchScale keeps the state as (B, H, value dim, key dim)
        ts_ret_state[i] = {"prev_key_value": torch.randn(1, ret_cfg.heads, ret_cfg.value_head_dim,
                                                         ret_cfg.key_head_dim) * 0.01,
                           "scale": torch.full((ret_cfg.heads,), float(context))}
    ts_ret_tokens = torch.full((1, context + 1), 7)

    def ts_ret_step() -> None:
        nonlocal ts_ret_tokens
        ts_retnet(ts_ret_tokens, incremental_state=ts_ret_state)
        ts_ret_tokens = torch.cat([ts_ret_tokens, token], dim=1)

    our_ret_cache = our_retnet.new_cache()
    for layer in our_ret_cache.layers:  # as if `context` tokens had been read
        layer.update(torch.randn(1, ret_cfg.heads, ret_cfg.key_head_dim, ret_cfg.value_head_dim + 1) * 0.01)
    our_ret_cache.append_tokens(torch.ones(1, context, dtype=torch.bool), torch.arange(context)[None])
    return {
        "decoder/torchscale": (ts_dec_step, ts_dec_state),
        "decoder/scaleformer": (lambda: our_decoder(token, cache=our_dec_cache), our_dec_cache),
        "retnet/torchscale": (ts_ret_step, ts_ret_state),
        "retnet/scaleformer": (lambda: our_retnet(token, cache=our_ret_cache), our_ret_cache),
    }


def _compiled_retnet(args: argparse.Namespace, model: nn.Module) -> Any:
    """The laid-out RetNet's compiled step (:mod:`scaleformer.compiled_decoding`), or None — said in one
    line — where it cannot be compiled here (``--no-compile``, or no C++ compiler for inductor)."""
    from scaleformer.compiled_decoding import CompiledDecoding

    if not args.compile:
        return None
    step = CompiledDecoding(model)
    try:  # compile now, not inside a timed round
        step(torch.tensor([[7]]), model.new_cache())
    except Exception as error:  # inductor's failures have no common type: a missing compiler, a codegen bug
        print(f"compiled step skipped: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        return None
    return step


def decoding(args: argparse.Namespace, pairs: dict) -> list[dict[str, Any]]:
    """Every cell's steps timed round-robin; the "+layout" cells are our models, laid out for decoding
    (copies: the other cells keep the standard layout); "+compiled" the laid-out RetNet's compiled step."""
    from scaleformer.runtime import decoding_layout

    rows = []
    laid_out = {name: copy.deepcopy(pairs[name][1]) for name in ("decoder", "retnet")}
    with torch.no_grad(), decoding_layout(laid_out["decoder"]), decoding_layout(laid_out["retnet"]):
        compiled = _compiled_retnet(args, laid_out["retnet"])
        for context in args.contexts:
            cells = _filled_caches(pairs, context)
            token = torch.tensor([[7]])
            for name, model in laid_out.items():
                cache = copy.deepcopy(cells[f"{name}/scaleformer"][1])  # a cache of its own, same contents
                cells[f"{name}/scaleformer+layout"] = (lambda m=model, c=cache: m(token, cache=c), cache)
            if compiled is not None:
                cache = copy.deepcopy(cells["retnet/scaleformer"][1])
                cells["retnet/scaleformer+compiled"] = (lambda c=cache: compiled(token, c), cache)
            samples: dict[str, list[float]] = {name: [] for name in cells}
            for _ in range(args.repeats):
                for name, (step, _) in cells.items():
                    samples[name].append(time_call(step, device=torch.device("cpu"), warmup=1, repeats=5))
            for name, values in samples.items():
                model_name, library = name.split("/")
                rows.append({"context": context, "model": model_name, "library": library,
                             "ms": 1e3 * statistics.median(values)})
    return rows


# ------------------------------------------------------------------------------------------------------------
# (c) cross-form disagreement
# ------------------------------------------------------------------------------------------------------------
def _torchscale_forms(model: nn.Module, ids: Tensor, chunk: int) -> dict[str, Tensor]:
    _set_torchscale_form(model, None)
    parallel = model(ids)[0]
    _set_torchscale_form(model, chunk)
    chunkwise = model(ids)[0]
    _set_torchscale_form(model, None)
    state: dict[Any, Any] = {}
    steps = []
    for t in range(ids.shape[1]):  # TorchScale's recurrent form takes one new token per call
        steps.append(model(ids[:, :t + 1], incremental_state=state)[0][:, -1:])
    return {"parallel": parallel, "chunkwise": chunkwise, "recurrent": torch.cat(steps, dim=1)}


def _our_forms(model: nn.Module, ids: Tensor, chunk: int) -> dict[str, Tensor]:
    chunked = _with_chunk(model, chunk)
    return {"parallel": model(ids, form="parallel").logits, "chunkwise": chunked(ids, form="chunkwise").logits,
            "recurrent": model(ids, form="recurrent").logits}


def disagreement(args: argparse.Namespace, pairs: dict) -> list[dict[str, Any]]:
    """In float32 (what users run) and float64 (rounding out of the way: what is left is the algorithm)."""
    rows = []
    for dtype in (torch.float32, torch.float64):
        rows += _disagreement(args, pairs, dtype)
    for theirs, ours, _ in pairs.values():
        theirs.float()
        ours.float()
    return rows


def _disagreement(args: argparse.Namespace, pairs: dict, dtype: torch.dtype) -> list[dict[str, Any]]:
    ts_retnet, our_retnet, _ = pairs["retnet"]
    ts_retnet.to(dtype)
    our_retnet.to(dtype)
    smooth = type(our_retnet)(our_retnet.config.replace(normalizer="smooth")).to(dtype).eval()
    smooth.load_state_dict(our_retnet.state_dict())
    t = args.disagreement_length
    ids = torch.randint(0, args.vocab, (1, t), generator=torch.Generator().manual_seed(0))
    rows = []
    with torch.no_grad():
        for chunk in args.chunk_sizes:
            forms = {"torchscale": _torchscale_forms(ts_retnet, ids, chunk),
                     "scaleformer (normalizer=torchscale)": _our_forms(our_retnet, ids, chunk),
                     "scaleformer (normalizer=smooth)": _our_forms(smooth, ids, chunk)}
            reference = forms["torchscale"]["parallel"]
            for library, out in forms.items():
                row = {"T": t, "dtype": str(dtype).removeprefix("torch."), "chunk": chunk, "library": library,
                       "parallel_vs_chunkwise": (out["parallel"] - out["chunkwise"]).abs().max().item(),
                       "parallel_vs_recurrent": (out["parallel"] - out["recurrent"]).abs().max().item(),
                       "chunkwise_vs_recurrent": (out["chunkwise"] - out["recurrent"]).abs().max().item(),
                       "max_abs_logit": out["parallel"].abs().max().item()}
                row["worst"] = max(row["parallel_vs_chunkwise"], row["parallel_vs_recurrent"],
                                   row["chunkwise_vs_recurrent"])
                row["parallel_vs_torchscale_parallel"] = (out["parallel"] - reference).abs().max().item()
                rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    try:
        pairs = _pairs(args)
    except ImportError as error:
        print(f"skipped: {error}")
        return 0
    info = machine_info(torch.device("cpu"))
    print(f"scaleformer vs TorchScale on {info}; width {args.embed_dim}, {args.layers} layers, vocab {args.vocab}, "
          f"batch 1, fp32")
    train = training(args, pairs) + retention_op(args, pairs)
    print_table("(a) forward+backward: median seconds (ratio > 1: scaleformer faster)",
                ["T", "model", "torchscale s", "scaleformer s", "torchscale/scaleformer"],
                [[t, m, ts, ours, ts / ours] for t, m, ts, ours in _paired(train, "T", "seconds")])
    decode = decoding(args, pairs)
    layout = {(r["context"], r["model"]): r["ms"] for r in decode if r["library"] == "scaleformer+layout"}
    compiled = {(r["context"], r["model"]): r["ms"] for r in decode if r["library"] == "scaleformer+compiled"}
    print_table("(b) per-token decoding: median ms (ratio > 1: scaleformer faster; +layout: decoding_layout; "
                "+compiled: its compiled step, the RetNet only: attention is not covered)",
                ["context", "model", "torchscale ms", "scaleformer ms", "torchscale/scaleformer",
                 "+layout ms", "torchscale/+layout", "+compiled ms", "torchscale/+compiled"],
                [[c, m, ts, ours, ts / ours, layout[c, m], ts / layout[c, m], compiled.get((c, m)),
                  ts / compiled[c, m] if (c, m) in compiled else None]
                 for c, m, ts, ours in _paired(decode, "context", "ms")])
    forms = disagreement(args, pairs)
    print_table(f"(c) RetNet cross-form disagreement, max |Δ logit|, T = {args.disagreement_length}",
                ["dtype", "chunk", "library", "par vs chunk", "par vs rec", "chunk vs rec", "worst", "max |logit|",
                 "vs TorchScale parallel"],
                [[r["dtype"], r["chunk"], r["library"], r["parallel_vs_chunkwise"], r["parallel_vs_recurrent"],
                  r["chunkwise_vs_recurrent"], r["worst"], r["max_abs_logit"], r["parallel_vs_torchscale_parallel"]]
                 for r in forms])
    if args.json:
        write_json(args.json, {"benchmark": "torchscale", "machine": info, "settings": {
            k: v for k, v in vars(args).items() if k not in ("json", "run", "command", "bench")},
            "training": train, "decoding": decode, "disagreement": forms})
    return 0


def _paired(rows: list[dict[str, Any]], key: str, value: str) -> list[tuple[Any, str, float, float]]:
    table = {}
    for row in rows:
        table.setdefault((row[key], row["model"]), {})[row["library"]] = row[value]
    return [(k, m, libs["torchscale"], libs["scaleformer"]) for (k, m), libs in table.items()]
