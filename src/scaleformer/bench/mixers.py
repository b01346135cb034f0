"""``scaleformer bench mixers``: Lightning attention (TransNormerLLM) and momentum attention against softmax
attention, in decoders of the same width and depth.

* attention: RoPE softmax attention (the fused kernels);
* momentum: the same plus momentum attention's Σ_{i<t} η^{t−i} v_i (η = ``--momentum``), computed by the
  retention op — what it costs over attention;
* lightning: TransNormerLLM's layer (constant per-head decays, SRMSNorm, output gate) on the retention
  op's chunkwise form (Lightning attention's blocks), with its SGLU;
* gated_deltanet, mamba2: the delta rule and SSD (issue 34, 35);
* diff_attention_v2: DIFF Transformer V2 (twice the query heads, paired); gate_sinks: attention with
  Qwen3-Next's output gate and gpt-oss's sinks (the sinks' explicit-bias path, no flash kernel);
* samba: Mamba-2 and sliding-window attention (window ``--window``) alternating.

Reported, in one process: (a) forward+backward time of the whole model on one sequence, by length, with the
log-log slope against length, and the activation memory — the bytes of the tensors autograd saves for the
backward pass (parameters not counted), the part of training memory that grows with the length, counted
exactly rather than read from the allocator; (b) after a prompt of ``--context`` tokens, the median time
of one decoding step and the decoding state's bytes.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

import scaleformer as sf
from scaleformer.bench.common import log_log_slope, machine_info, print_table, time_call, write_json

__all__ = ["add_arguments", "run", "variants"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--context", type=int, default=4096, help="prompt before the timed decoding steps")
    parser.add_argument("--steps", type=int, default=16, help="decoding steps timed (median)")
    parser.add_argument("--embed-dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--window", type=int, default=512, help="samba's sliding window")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the figures to this JSON file")


def variants(args: argparse.Namespace) -> dict[str, Any]:
    width, heads, layers = args.embed_dim, args.heads, args.layers
    knobs = dict(vocab_size=1024, embed_dim=width, heads=heads, ffn_dim=4 * width, layers=layers, position="rope")
    lightning = sf.ModelConfig(
        vocab_size=1024, embed_dim=width, position=sf.NoPosition(), norm_type="rmsnorm",
        layers=sf.uniform(sf.LayerConfig(mixer=sf.Lightning(heads=heads),
                                         ffn=sf.GLU(ffn_dim=8 * width // 3, activation="none", bias=False)), layers))
    # Gated DeltaNet: fla's proportions (heads of width/heads, SwiGLU of 8/3 · width); Mamba-2: mamba_ssm's
    # blocks (the mixer alone) at twice the layers, expand 2, heads of 2·width/heads, state 64 (mamba2_simple)
    gated_deltanet = sf.delta_rule_lm(vocab_size=1024, embed_dim=width, layers=layers, heads=heads,
                                      head_dim=width // heads)
    mamba2 = sf.mamba2_lm(vocab_size=1024, embed_dim=width, layers=2 * layers, state_dim=64,
                          head_dim=2 * width // heads)
    attention = sf.transformer(**knobs)
    gate_sinks = attention.replace(layers=tuple(layer.replace(mixer=layer.mixer.replace(output_gate=True, sinks=True))
                                                for layer in attention.layers))
    samba = sf.samba(vocab_size=1024, embed_dim=width, layers=layers, heads=heads, window=args.window, state_dim=64,
                     head_dim=2 * width // heads)
    return {"attention": attention, "momentum": sf.transformer(**knobs, momentum=args.momentum),
            "lightning": lightning, "gated_deltanet": gated_deltanet, "mamba2": mamba2,
            "diff_attention_v2": sf.transformer(**knobs, attention="diff2"), "gate_sinks": gate_sinks, "samba": samba}


def activation_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for one forward+backward of ``model`` on ``ids``: each storage once
    (views share one), parameters left out."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(ids).logits.float().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def run(args: argparse.Namespace) -> int:
    cpu = torch.device("cpu")
    info = machine_info(cpu)
    print(f"Mixers on {info}: width {args.embed_dim}, {args.heads} heads, {args.layers} layers, fp32, batch 1")
    models = {}
    for name, cfg in variants(args).items():
        torch.manual_seed(0)
        models[name] = sf.build(cfg)
    training: list[dict[str, Any]] = []
    for length in args.lengths:
        ids = torch.randint(0, 1024, (1, length))
        row: dict[str, Any] = {"length": length}
        for name, model in models.items():
            def step(model=model) -> None:
                model(ids).logits.float().mean().backward()
                model.zero_grad(set_to_none=True)
            row[f"{name}_s"] = time_call(step, device=cpu, repeats=args.repeats)
            row[f"{name}_saved_mb"] = activation_bytes(model, ids) / 2**20
        training.append(row)
        print("  T={}: ".format(length) + ", ".join(f"{n} {row[f'{n}_s']:.3f} s" for n in models), flush=True)
    slopes = {name: log_log_slope([r["length"] for r in training], [r[f"{name}_s"] for r in training]) for name in models}
    memory_slopes = {name: log_log_slope([r["length"] for r in training], [r[f"{name}_saved_mb"] for r in training])
                     for name in models}
    decoding: list[dict[str, Any]] = []
    with torch.no_grad():
        prompt = torch.randint(0, 1024, (1, args.context))
        for name, model in models.items():
            model.eval()
            out = model(prompt, use_cache=True)
            token = torch.randint(0, 1024, (1, 1))
            state = {"cache": out.cache}

            def decode(model=model, state=state) -> None:
                state["cache"] = model(token, cache=state["cache"], use_cache=True).cache

            seconds = time_call(decode, device=cpu, repeats=args.steps)
            decoding.append({"mixer": name, "step_ms": seconds * 1000, "state_mb": state["cache"].nbytes() / 2**20})
    print_table("(a) forward+backward of the model on one sequence: median seconds",
                ["length", *models], [[r["length"], *(r[f"{n}_s"] for n in models)] for r in training])
    print("log-log slope against length: " + ", ".join(f"{n} {s:.2f}" for n, s in slopes.items() if s is not None))
    print_table("(a') activation memory of forward+backward (tensors saved for backward): MB",
                ["length", *models], [[r["length"], *(r[f"{n}_saved_mb"] for n in models)] for r in training])
    print("log-log slope against length: " + ", ".join(f"{n} {s:.2f}" for n, s in memory_slopes.items() if s is not None))
    print_table(f"(b) one decoding step after {args.context} tokens", ["mixer", "step ms", "state MB"],
                [[r["mixer"], r["step_ms"], r["state_mb"]] for r in decoding])
    if args.json:
        write_json(args.json, {"benchmark": "mixers", "machine": info, "settings": {
            k: v for k, v in vars(args).items() if k not in ("json", "run", "command", "bench")},
            "training": training, "slopes": slopes, "memory_slopes": memory_slopes, "decoding": decoding})
    return 0
