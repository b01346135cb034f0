"""The ``scaleformer`` command line: its parser, and dispatch to :mod:`scaleformer.commands`.

Nothing here imports torch. The parser is built for the one command asked for (every command's name and
summary, that command's flags), so ``scaleformer --help``, ``scaleformer train --help`` and a mistyped flag
are answered at once; torch and the command's code load only when the command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import sys
import typing
from typing import Callable

__all__ = ["main", "make_parser"]


def _field_help(cls: type) -> dict[str, str]:
    """The ``#:`` comment above each field of a config class (the one place options are documented)."""
    helps, pending = {}, []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
        elif pending and ":" in stripped:
            helps[stripped.split(":")[0].strip()] = " ".join(pending)
            pending = []
    return helps


def _add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per config field, typed from its annotation and documented by its comment."""
    helps = _field_help(cls)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        flag, hint = "--" + field.name.replace("_", "-"), hints[field.name]
        text = f"{helps.get(field.name, '')} (default: {field.default})"
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif typing.get_origin(hint) is tuple:
            parser.add_argument(flag, nargs="*", default=None, help=text)
        elif typing.get_origin(hint) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(hint), default=None, help=text)
        else:
            base = next((t for t in (int, float, str) if t is hint or t in typing.get_args(hint)), str)
            parser.add_argument(flag, type=base, default=None, help=text)


def _runner(name: str) -> Callable[[argparse.Namespace], int]:
    """A command's function, imported when it runs: "module:function" or a function of scaleformer.commands."""
    module, _, function = name.rpartition(":")
    return getattr(importlib.import_module(module or "scaleformer.commands"), function)


def _generate(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("--preset", default="gpt-tiny", help="named config (see `scaleformer presets`)")
    gen.add_argument("--checkpoint", help="a checkpoint or run directory (overrides --preset)")
    gen.add_argument("--prompt", default="The ")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--standard-layout", action="store_true",
                     help="decode with the weights in nn.Linear's order (default: scaleformer.decoding_layout, "
                          "faster one-row products on a CPU; logits equal to rounding)")
    gen.add_argument("--compile", action="store_true",
                     help="decode with the model's compiled step (scaleformer.compiled_decoding: models whose layers "
                          "are all retention; compiles for seconds first; the same tokens to rounding)")


def _serve(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("checkpoint", help="a checkpoint or run directory (with its tokenizer.json)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000, help="0: any free port (the one chosen is printed)")
    serve.add_argument("--name", help="the model's name in the API (default: the directory's name)")
    serve.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    serve.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those; more get 429")
    serve.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take (then 504)")
    serve.add_argument("--max-tokens", type=int, default=4096, help="the largest max_tokens a request may ask")
    serve.add_argument("--prefix-block", type=int, default=32, help="prompt states are kept every this many tokens")
    serve.add_argument("--prefix-cache-mb", type=float, default=256.0, help="memory for them (0: no prefix cache)")
    serve.add_argument("--device", default="cpu")


def _icl(icl: argparse.ArgumentParser) -> None:
    icl.add_argument("--demos", required=True, help='JSONL of demonstrations: {"input": ..., "output": ...}')
    icl.add_argument("--tests", required=True, help='JSONL of tests: {"input": ..., "options": [...], "answer": i} '
                     '(multiple choice) or {"input": ..., "output": ...} (generation, exact match)')
    icl.add_argument("--groups", type=int, default=1, help="M: demonstration groups encoded independently")
    icl.add_argument("--preset", default="gpt-tiny")
    icl.add_argument("--checkpoint", help="a checkpoint or run directory (overrides --preset)")
    icl.add_argument("--separator", default=" ", help="between an input and its output")
    icl.add_argument("--seed", type=int, default=0)


def _train(train: argparse.ArgumentParser) -> None:
    from scaleformer.train.options import TrainConfig

    train.add_argument("--config", help="a JSON or YAML file of train options (flags override it)")
    _add_config_flags(train, TrainConfig)


def _eval(evaluate: argparse.ArgumentParser) -> None:
    from scaleformer.train.options import TASK_NAMES

    evaluate.add_argument("--checkpoint", required=True, help="a checkpoint directory or a run directory")
    evaluate.add_argument("--data", help="text file or folder (default: the data the run trained on)")
    evaluate.add_argument("--batches", type=int, default=32)
    evaluate.add_argument("--task", help="accuracy on a synthetic task instead: " + ", ".join(TASK_NAMES) + "; or "
                          "`ruler` (every RULER task: NIAH, vt, cwe, fwe; scaleformer.ruler) or one, `ruler-NAME`")
    evaluate.add_argument("--task-options", nargs="*", default=[],
                          help="the task's KEY=VALUE options (default: the run's own, when it trained on this task)")
    evaluate.add_argument("--count", type=int, help="examples per length (and depth): default 256, 20 for RULER")
    evaluate.add_argument("--lengths", type=int, nargs="*", help="example lengths (default: the run's --seq-len)")
    evaluate.add_argument("--depths", type=float, nargs="*", help="passkey: needle depths (default 0 .25 .5 .75 1)")
    evaluate.add_argument("--seed", type=int, default=12345, help="seed of the evaluation examples")


def _export(plain: argparse.ArgumentParser) -> None:
    plain.add_argument("checkpoint", help="a checkpoint or run directory")
    plain.add_argument("out", help="output directory (config.json, model.safetensors, tokenizer.json)")
    plain.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                       help="cast the weights (default: as saved, float32 for training checkpoints)")


def _export_hf(export: argparse.ArgumentParser) -> None:
    export.add_argument("checkpoint", help="a checkpoint, run or scaleformer.save directory")
    export.add_argument("out", help="output directory (save_pretrained format)")


def _pack_bitnet(packer: argparse.ArgumentParser) -> None:
    packer.add_argument("checkpoint", help="a checkpoint, run or scaleformer.save directory")
    packer.add_argument("out", help="output directory (config.json + packed.safetensors)")


def _convert(convert: argparse.ArgumentParser) -> None:
    convert.add_argument("--weights", required=True, help="a torch.save'd state dict (tensors only), or "
                         "{'model': state dict} as fairseq and the released BEiT-3 .pth files hold it")
    convert.add_argument("--config", help="JSON of the TorchScale config options (optional for BEiT-3, whose "
                         "shape is read from the weights)")
    convert.add_argument("--kind", choices=["encoder", "decoder", "encoder_decoder", "retnet", "beit3", "longvit"],
                         help="which TorchScale model (default: BEiT-3 if the weights are one, else inferred "
                              "from the config's keys)")
    convert.add_argument("--heads", type=int, help="BEiT-3: attention heads (default: the config's, else width / 64); "
                         "LongViT: (default 16, LongViT-small's)")
    convert.add_argument("--out", required=True, help="output directory (scaleformer.save format)")


def _lm_eval(lm: argparse.ArgumentParser) -> None:
    lm.add_argument("lm_eval_args", nargs=argparse.REMAINDER)


def _reproduce(again: argparse.ArgumentParser) -> None:
    from scaleformer import reproduce

    reproduce.add_arguments(again)


def _compare(comparison: argparse.ArgumentParser) -> None:
    from scaleformer import compare  # (imports torch: `compare --help` waits for it)

    compare.add_arguments(comparison)


#: bench NAME -> (module under scaleformer.bench, summary)
BENCHMARKS = {
    "retention": ("retention", "RetNet forms vs attention: training and decoding cost"),
    "delta": ("delta", "the delta rule's chunkwise and recurrent forms vs causal attention, by length"),
    "dilated": ("dilated", "LongNet dilated vs dense attention; sequence-parallel traffic"),
    "moe": ("moe", "MoE dispatch by index vs one-hot einsums: tokens/s and memory"),
    "attention": ("attention", "grouped-query and sliding-window attention: KV cache and decode latency"),
    "torchscale": ("torchscale", "scaleformer vs TorchScale: training, decoding, form agreement"),
    "bitlinear": ("bitlinear", "BitNet linears (latent and 2-bit packed) vs fp32 and bf16: memory, time"),
    "yoco": ("yoco", "YOCO vs Transformer and RetNet decoding: cache bytes and step latency by context"),
    "s2": ("s2", "S2-Attention vs dense and dilated attention by length; memory; reduced cache"),
    "sparse": ("sparse", "dilated and S2 attention by kernel (PyTorch paths, Triton) against fused dense"),
    "mixers": ("mixers", "Lightning and momentum attention vs softmax attention: training, decoding"),
    "icl": ("icl", "structured vs conventional in-context learning: cost by number of demonstrations"),
    "train": ("train", "training throughput and model FLOPs utilisation against the measured matmul rate"),
    "context-parallel": ("context_parallel", "one sequence split across processes: bytes per rank, memory, time"),
    "generate": ("generate", "inference: engine throughput by batch, time to first token, speculative, server"),
    "layout": ("layout", "one-row products by weight shape: row-major (nn.Linear) vs column-major"),
    "kernels": ("kernels", "every Triton kernel, forward and backward, against its float64 reference"),
}


def _bench(bench: argparse.ArgumentParser, argv: list[str]) -> None:
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    chosen = next((a for a in argv[argv.index("bench") + 1:] if not a.startswith("-")), None) if "bench" in argv else None
    for name, (module, text) in BENCHMARKS.items():
        one = bench_sub.add_parser(name, help=text)
        if name == chosen:  # only the benchmark asked for is imported (each imports torch)
            loaded = importlib.import_module(f"scaleformer.bench.{module}")
            loaded.add_arguments(one)
            one.set_defaults(run=f"scaleformer.bench.{module}:run")


_DEFAULTS = argparse.ArgumentDefaultsHelpFormatter
#: name -> (summary, how to add its flags, its function, formatter)
COMMANDS: dict[str, tuple[str, Callable | None, str, type | None]] = {
    "presets": ("list the named configs", None, "_cmd_presets", None),
    "config": ("print a preset's config as JSON", lambda p: p.add_argument("preset"), "_cmd_config", None),
    "generate": ("generate text from a preset (random weights) or a checkpoint", _generate, "_cmd_generate", None),
    "serve": ("an OpenAI-compatible HTTP server (/v1/completions) over a checkpoint, with continuous batching",
              _serve, "_cmd_serve", _DEFAULTS),
    "icl": ("in-context learning with structured prompting: accuracy on multiple-choice or generation tests", _icl,
            "_cmd_icl", None),
    "train": ("pretrain a preset (default: a small RetNet on the built-in corpus)", _train, "_cmd_train", None),
    "eval": ("perplexity of a checkpoint on its validation split or --data, or its accuracy on a synthetic --task",
             _eval, "_cmd_eval", None),
    "export": ("write a training checkpoint (full or sharded) as one model directory", _export, "_cmd_export", None),
    "export-hf": ("write a checkpoint (and tokenizer) as a Hugging Face directory", _export_hf, "_cmd_export_hf", None),
    "pack-bitnet": ("pack a BitNet (linear='bitlinear') checkpoint at 2 bits per weight", _pack_bitnet,
                    "_cmd_pack_bitnet", None),
    "convert-torchscale": ("convert TorchScale weights to a scaleformer directory", _convert,
                           "_cmd_convert_torchscale", None),
    "lm-eval": ("lm-eval-harness with `--model scaleformer` registered; arguments go to lm_eval (e.g. --model_args "
                "pretrained=RUN --tasks T)", _lm_eval, "_cmd_lm_eval", None),
    "reproduce": ("a paper's headline claim at laptop size: measured beside the claim, with NAME.json and NAME.png",
                  _reproduce, "scaleformer.reproduce:run", _DEFAULTS),
    "compare": ("train several models on the same data and budget; a table, compare.json and plots", _compare,
                "scaleformer.compare:run", _DEFAULTS),
    "bench": ("run a benchmark (prints a table; --json PATH writes the figures)", None, "", None),
}


def make_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv``: every command's name and summary, and the flags of the command ``argv`` names
    (all commands' flags when ``argv`` is None: what a test or a tool inspecting the whole CLI wants)."""
    parser = argparse.ArgumentParser(prog="scaleformer", description="Foundation architectures for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = None if argv is None else next((a for a in argv if not a.startswith("-")), "")
    for name, (text, add_flags, function, formatter) in COMMANDS.items():
        one = sub.add_parser(name, help=text, **({"formatter_class": formatter} if formatter else {}))
        if chosen is not None and name != chosen:
            continue
        if name == "bench":
            _bench(one, argv if argv is not None else [])
            continue
        if add_flags is not None:
            add_flags(one)
        one.set_defaults(run=function)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command. What the user got wrong (an option, a file, a damaged checkpoint, a full disk) is
    one line on stderr and exit code 2; anything else is a bug and keeps its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser(argv).parse_args(argv)
    from scaleformer.files import one_line
    from scaleformer.train.trainer import TrainingError

    try:
        return _runner(args.run)(args)
    except (ValueError, ImportError, TrainingError, OSError) as error:
        text = error.strerror if isinstance(error, OSError) and error.filename and error.strerror else None
        text = f"{error.filename}: {text}" if text else str(error)
        print(f"error: {one_line(text, 600)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
