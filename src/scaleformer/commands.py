"""What each ``scaleformer`` command does (the parser and dispatch are :mod:`scaleformer.cli`, which
imports this module only once a command runs)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from scaleformer import durable

from scaleformer.build import build, load, read_config, require_language_model
from scaleformer.bench.common import print_table
from scaleformer.files import one_line, read_json_object
from scaleformer.config import ConfigError
from scaleformer.data.tokenizer import ByteTokenizer, load_tokenizer
from scaleformer.train.checkpoint import resolve_checkpoint, trainer_state
from scaleformer.train.trainer import TrainConfig, Trainer, perplexity, prepare_data, task_options
from scaleformer.generation import generate
from scaleformer.models.families import arch_of, mixer_summary
from scaleformer.runtime import decoding_layout
from scaleformer.presets import list_presets, load_preset, preset_function
from scaleformer.tasks import accuracy, make_task


def _cmd_presets(args: argparse.Namespace) -> int:
    """Every preset: family, its layers' mixers, width, depth and parameter count (counted on the meta device,
    so the 65B ones cost nothing)."""

    rows = []
    for name in list_presets():
        cfg = load_preset(name)
        with torch.device("meta"):
            parameters = sum(t.numel() for t in {id(t): t for t in build(cfg).parameters()}.values())
        mixers, depth = mixer_summary(cfg)
        rows.append([name, preset_function(name).__name__, mixers, str(cfg.embed_dim), depth, _human(parameters)])
    print_table("presets (scaleformer config NAME prints one in full)", ["preset", "function", "mixers", "width", "layers", "parameters"], rows)
    return 0


def _human(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def _cmd_config(args: argparse.Namespace) -> int:
    print(load_preset(args.preset).to_json())
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    tokenizer = ByteTokenizer()
    if args.checkpoint:
        checkpoint = resolve_checkpoint(args.checkpoint)
        model = load(checkpoint)
        require_language_model(model.config, "generate")
        if not (checkpoint / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{checkpoint / 'tokenizer.json'} not found: without the tokenizer the model was "
                                    "trained with its ids cannot become text; copy the training run's "
                                    "tokenizer.json next to the weights")
        tokenizer = load_tokenizer(checkpoint)
        origin = f"checkpoint {checkpoint}"
    else:
        model = build(load_preset(args.preset))
        origin = f"preset {args.preset} (random weights: train one first for meaningful text)"
    config = model.config
    if config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"the tokenizer needs vocab_size >= {tokenizer.vocab_size}, model has {config.vocab_size}")
    from scaleformer.serve import encode_prompt  # the one rule, shared with the server (no FastAPI imported)

    ids = encode_prompt(tokenizer, args.prompt)  # an empty prompt: the start-of-text token alone
    if not ids:
        raise ValueError("--prompt is empty and this tokenizer has no start token to begin from; give a prompt")
    prompt = torch.tensor([ids], dtype=torch.long)
    model.eval()
    kwargs, arch = {}, arch_of(config)
    if args.compile:
        from scaleformer.compiled_decoding import unsupported_reason

        reason = unsupported_reason(model)
        if reason is not None:  # before the prompt is read, in one line
            raise ConfigError(f"--compile: {reason}")
        kwargs["compile"] = True
    if arch == "encoder_decoder":
        kwargs["source_ids"] = prompt
        prompt = torch.tensor([[tokenizer.bos_id]])
    elif arch == "encoder":
        raise ConfigError("an encoder (bidirectional) cannot generate; use a decoder, RetNet or encoder-decoder model")
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {origin}, {params / 1e6:.2f}M parameters")
    print(f"prompt: {args.prompt!r}")
    print("output: ", end="", flush=True)
    generated: list[int] = []
    shown = ""

    def stream(token: torch.Tensor) -> None:  # print text as tokens arrive (RetNet: recurrent steps)
        nonlocal shown
        generated.append(int(token[0]))
        text = tokenizer.decode(generated)
        print(text[len(shown):], end="", flush=True)
        shown = text

    start = time.perf_counter()
    layout = contextlib.nullcontext() if args.standard_layout else decoding_layout(model)
    with layout:  # one row at a time on a CPU: the order its products are fastest in
        ids = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, stop_tokens=tokenizer.eos_id, on_token=stream, **kwargs)
    elapsed = time.perf_counter() - start
    new = ids.shape[1] - prompt.shape[1]
    print(f"\n{new} tokens in {elapsed:.2f}s ({new / max(elapsed, 1e-9):.1f} tokens/s)")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from scaleformer.serve import serve

    serve(args.checkpoint, host=args.host, port=args.port, name=args.name, max_batch=args.max_batch,
          max_queue=args.max_queue, timeout=args.timeout, max_tokens=args.max_tokens, prefix_block=args.prefix_block,
          prefix_cache_mb=args.prefix_cache_mb, device=args.device)
    return 0


def _cmd_icl(args: argparse.Namespace) -> int:
    """In-context learning with structured prompting: accuracy over the test examples (multiple choice by
    the likeliest option; generation by an exact match of the greedy output's first line)."""
    from scaleformer.icl import read_examples, score_answers, structured_generate

    if args.groups < 1:
        raise ValueError(f"--groups must be >= 1, got {args.groups}")
    demos, tests = read_examples(args.demos, with_options=False), read_examples(args.tests, with_options=True)
    if args.checkpoint:
        checkpoint = resolve_checkpoint(args.checkpoint)
        model, tokenizer = load(checkpoint), load_tokenizer(checkpoint)
        origin = f"checkpoint {checkpoint}"
    else:
        torch.manual_seed(args.seed)
        model, tokenizer = build(load_preset(args.preset)), ByteTokenizer()
        origin = f"preset {args.preset} (random weights)"
    model.eval()
    encode = lambda text: torch.tensor(tokenizer.encode(text, add_bos=False), dtype=torch.long)  # noqa: E731
    demo_ids = [encode(f"{d['input']}{args.separator}{d['output']}\n") for d in demos]
    correct = 0
    newline = tokenizer.encode("\n", add_bos=False)[0]
    for example in tests:
        prompt = encode(f"{example['input']}{args.separator}")
        if "options" in example:
            scores = score_answers(model, demo_ids, prompt, [encode(o) for o in example["options"]], groups=args.groups)
            correct += int(scores.argmax()) == example["answer"]
            continue
        wanted = example["output"].strip()
        new = structured_generate(model, demo_ids, prompt, len(encode(wanted)) + 1, groups=args.groups,
                                  stop_tokens=newline)
        correct += tokenizer.decode(new.tolist()).split("\n")[0].strip() == wanted
    print(f"model: {origin}; {len(demos)} demonstrations in {args.groups} groups, {len(tests)} test examples")
    print(f"accuracy {correct / len(tests):.3f} ({correct}/{len(tests)})")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    if getattr(args, "task", None) == "shapes":
        return _train_shapes(args)
    cfg = _train_config(args)
    result = Trainer(cfg).run()
    return 128 + result["signal"] if result.get("stopped") else 0  # 130 after Ctrl-C: stopped early, saved


# What `train --task shapes` (BEiT-3's vision demo) takes; its own defaults apply to the rest.
_SHAPES_OPTIONS = ("out", "steps", "batch_size", "lr", "warmup", "weight_decay", "seed", "eval_every", "device",
                   "progress", "task")


def _train_shapes(args: argparse.Namespace) -> int:
    from scaleformer.train.shapes import ShapesRun, train_shapes

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name, None)
             not in (None, ())}
    unused = sorted(name for name in given if name not in _SHAPES_OPTIONS)
    if args.config or unused:
        raise ConfigError(f"--task shapes (BEiT-3's vision demo) takes only --out, --steps, --batch-size, --lr, "
                          f"--warmup, --weight-decay, --seed, --eval-every, --device and --no-progress; got "
                          f"{', '.join(['--' + n.replace('_', '-') for n in unused] + (['--config'] if args.config else []))}")
    device = given.pop("device", "auto")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    given.pop("task")
    out = Path(given.pop("out", "runs/shapes"))
    result = train_shapes(ShapesRun(out=out, device=device, **given))
    final = result["final"]
    print(f"{out}: accuracy {final['accuracy']:.3f} (chance {final['accuracy_chance']:.3f}), retrieval recall@1 "
          f"image→text {final['image_to_text_r1']:.3f}, text→image {final['text_to_image_r1']:.3f} (chance "
          f"{final['retrieval_chance']:.3f}) after {result['steps']} steps, {result['seconds']:.0f} s; models in "
          f"{out / 'classifier'} and {out / 'retrieval'}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.batches < 1:
        raise ValueError(f"--batches must be >= 1, got {args.batches}")
    checkpoint = resolve_checkpoint(args.checkpoint)
    if (checkpoint / "config.json").is_file():
        require_language_model(read_config(checkpoint / "config.json"), "eval")
    state = trainer_state(checkpoint) if (checkpoint / "trainer.json").is_file() else {}
    try:
        train_cfg = TrainConfig.from_dict(state["train"]) if "train" in state else TrainConfig()
    except ValueError as error:
        raise ValueError(f"{checkpoint / 'trainer.json'}: damaged train options ({one_line(error)})") from None
    if args.task and (args.task == "ruler" or args.task.startswith("ruler-")):
        return _eval_ruler(args, checkpoint, train_cfg)
    if args.task:
        return _eval_task(args, checkpoint, train_cfg)
    if args.data:
        train_cfg = train_cfg.replace(data=args.data)
    elif train_cfg.data:  # the path a checkpoint names is not trusted: the data must be what it trained on
        _check_recorded_data(checkpoint, train_cfg.data)
    trainer = Trainer(train_cfg)
    recorded = None if args.data or not train_cfg.data else str(state.get("corpus_sha256"))
    trainer.data = prepare_data(train_cfg, load_tokenizer(checkpoint), expected_sha256=recorded)
    trainer.model = load(checkpoint)
    loss = trainer.evaluate(batches=args.batches)
    print(f"{checkpoint}: validation loss {loss:.4f}, perplexity {perplexity(loss):.2f} "
          f"({args.batches} batches of {train_cfg.batch_size} × {train_cfg.seq_len} tokens)")
    return 0


def _eval_ruler(args: argparse.Namespace, checkpoint: Path, train_cfg: TrainConfig) -> int:
    """RULER's score (string_match_all, ×100; the mean over samples with its 95% interval) of a checkpoint's
    greedy continuations, per task and length, and each length's mean over tasks."""
    from scaleformer import ruler
    from scaleformer.stats import mean_interval

    count = 20 if args.count is None else args.count
    if count < 1:
        raise ValueError(f"--count must be >= 1, got {count}")
    tasks = list(ruler.TASKS) if args.task == "ruler" else [args.task[len("ruler-"):]]
    for task in tasks:
        ruler.generate(task, 0, 1)  # an unknown name fails here, before the model is loaded
    model, tokenizer = load(checkpoint).eval(), load_tokenizer(checkpoint)
    rows = []
    for length in args.lengths or [train_cfg.seq_len]:
        scores = []
        for task in tasks:
            try:  # a length too short for the task, or past a learned position table: that row is skipped
                samples = ruler.generate(task, count, length, seed=args.seed, count_tokens=ruler.token_counter(tokenizer))
                shares = [ruler.string_match_all([output], [sample.answers])
                          for output, sample in zip(ruler.continuations(model, samples, tokenizer), samples)]
            except ValueError as error:
                rows.append([length, task, f"skipped: {one_line(error, 90)}", "", ""])
                continue
            score = mean_interval(shares)
            scores.append(score.mean)
            rows.append([length, task, f"{score.mean:.1f}", f"{score.low:.1f}–{score.high:.1f}", len(shares)])
        if scores:
            rows.append([length, "mean", f"{sum(scores) / len(scores):.1f}", "", ""])
    print_table(f"RULER (string_match_all ×100, greedy) of {checkpoint}", ["length", "task", "score", "95% CI",
                                                                           "samples"], rows)
    return 0


def _eval_task(args: argparse.Namespace, checkpoint: Path, train_cfg: TrainConfig) -> int:
    """Accuracy (95% Wilson interval) of a checkpoint on a task, per length (and, for passkey, depth)."""
    args.count = 256 if args.count is None else args.count
    if args.count < 1:
        raise ValueError(f"--count must be >= 1, got {args.count}")
    given = (train_cfg.task_options if train_cfg.task == args.task else ()) + tuple(args.task_options)
    model = load(checkpoint).eval()
    depths = (args.depths or [0.0, 0.25, 0.5, 0.75, 1.0]) if args.task == "passkey" else [None]
    for length in args.lengths or [train_cfg.seq_len]:
        cfg = train_cfg.replace(task=args.task, task_options=given, seq_len=length, data=None, pack_documents=False)
        for depth in depths:
            options = {**task_options(cfg), **({"depth": depth} if depth is not None else {})}
            try:
                batch = make_task(args.task, args.count, seed=args.seed, **options)
            except TypeError as error:
                raise ConfigError(f"task {args.task}: {one_line(error)}") from None
            if batch.vocab_size > model.config.vocab_size:
                raise ValueError(f"task {args.task} uses ids up to {batch.vocab_size - 1}, but the model's vocabulary "
                                 f"is {model.config.vocab_size}")
            score = accuracy(model, batch, batch_size=train_cfg.batch_size)
            where = f"length {length}" + (f", depth {depth:g}" if depth is not None else "")
            print(f"{checkpoint}: {args.task} {where}: accuracy {score}")
    return 0


MAX_RECORDED_DATA_BYTES = 16 << 30


def _check_recorded_data(checkpoint: Path, data: str) -> None:
    """The data path trainer.json records: only a regular file or folder of plausible size is read."""
    path = Path(data)
    advice = "pass --data to evaluate on a file of your choice"
    if not path.exists():
        raise FileNotFoundError(f"{checkpoint}: the training data {one_line(data, 100)} is not there; {advice}")
    if not (path.is_file() or path.is_dir()):
        raise ValueError(f"{checkpoint}: the training data {one_line(data, 100)} is not a regular file or folder; "
                         f"{advice}")
    if path.is_file() and path.stat().st_size > MAX_RECORDED_DATA_BYTES:
        raise ValueError(f"{checkpoint}: the training data {one_line(data, 100)} is {path.stat().st_size:,} bytes, "
                         f"more than {MAX_RECORDED_DATA_BYTES:,}; {advice}")


def _cmd_export_hf(args: argparse.Namespace) -> int:
    from scaleformer.hf import export_hf  # needs the `hf` extra

    out = export_hf(args.checkpoint, args.out)
    tokenizer = "with its tokenizer" if (out / "tokenizer.json").is_file() else "without a tokenizer (none to export)"
    print(f"wrote {out} {tokenizer} (load with `import scaleformer.hf` and AutoModelForCausalLM.from_pretrained)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from scaleformer.train.checkpoint import export_model

    out = export_model(args.checkpoint, args.out, getattr(torch, args.dtype) if args.dtype else None)
    tokenizer = "with its tokenizer" if (out / "tokenizer.json").is_file() else "without a tokenizer (none to export)"
    print(f"wrote {out} {tokenizer}: config.json and one model.safetensors (scaleformer.load, generate, export-hf)")
    return 0


def _cmd_pack_bitnet(args: argparse.Namespace) -> int:
    from scaleformer.bitnet import linear_bytes, pack, save_packed
    from scaleformer.build import load
    from scaleformer.train.checkpoint import resolve_checkpoint

    source = resolve_checkpoint(args.checkpoint)
    durable.check_output_dir(args.out, "pack-bitnet", source)
    model = load(source).eval()
    before = linear_bytes(model)
    pack(model)
    after = linear_bytes(model)
    save_packed(model, args.out)
    print(f"wrote {args.out}: linear weights {before:,} bytes -> {after:,} bytes packed at 2 bits per weight "
          f"({before / after:.1f}x smaller); load with scaleformer.bitnet.load_packed")
    return 0


def _cmd_convert_torchscale(args: argparse.Namespace) -> int:
    from scaleformer.build import save
    from scaleformer.interop.beit3 import is_beit3_state_dict, load_beit3
    from scaleformer.interop.torchscale import load_torchscale

    durable.check_output_dir(args.out, "convert-torchscale", args.weights)
    options = read_json_object(Path(args.config), "a TorchScale config", 1 << 20) if args.config else None
    try:  # tensors only: a checkpoint that needs unpickling of arbitrary objects is refused
        state = torch.load(args.weights, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises several types for unreadable files
        raise ValueError(f"{args.weights}: not a readable tensor checkpoint ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # fairseq-style {"model": state_dict, ...}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{args.weights}: not a state dict of tensors (or {{'model': state dict}})")
    try:
        if args.kind == "beit3" or (args.kind is None and is_beit3_state_dict(state)):
            model = load_beit3(state, options, heads=args.heads)
        elif args.kind == "longvit":
            from scaleformer.interop.longvit import load_longvit

            model = load_longvit(state, **({"heads": args.heads} if args.heads else {}))
        elif options is None:
            raise ValueError("--config (the TorchScale config's options as JSON) is needed for this model; only "
                             "BEiT-3 checkpoints are read without one")
        else:
            model = load_torchscale(state, options, kind=args.kind)
    except RuntimeError as error:  # load_state_dict's report of tensors that do not fit
        if "size mismatch" not in str(error):
            raise
        mismatch = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), str(error))
        raise ValueError(f"{args.weights}: a tensor does not fit the model its config describes ({one_line(mismatch)}); "
                         "check --config (or --heads) against the checkpoint") from None
    save(model, args.out)
    print(f"wrote {args.out}: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters")
    return 0


def _cmd_lm_eval(args: argparse.Namespace) -> int:
    import scaleformer.lmeval  # noqa: F401 - registers --model scaleformer
    from lm_eval.__main__ import cli_evaluate

    from scaleformer.lmeval_tasks import TASKS

    extra = [] if "--include_path" in args.lm_eval_args else ["--include_path", str(TASKS)]  # scaleformer_demo
    saved = sys.argv
    sys.argv = ["lm_eval", *args.lm_eval_args, *extra]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


def _train_config(args: argparse.Namespace) -> TrainConfig:
    values: dict = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config {path}: no such file")
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError("YAML configs need PyYAML: pip install 'scaleformer[yaml]' (or use JSON)") from None
            try:
                values = yaml.safe_load(path.read_text()) or {}
            except (yaml.YAMLError, RecursionError) as error:  # YAMLError: also tags that would build objects
                raise ConfigError(f"--config {path}: not plain YAML ({one_line(error, 150)})") from None
        else:
            try:
                values = json.loads(path.read_text())
            except (ValueError, RecursionError) as error:
                raise ConfigError(f"--config {path}: not valid JSON ({one_line(error, 150)})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"--config {path}: must hold an object of train options, got a {type(values).__name__}")
        values.pop("family", None)
    for field in dataclasses.fields(TrainConfig):
        given = getattr(args, field.name, None)
        if given is not None:
            values[field.name] = given
    return TrainConfig.from_dict(values)
