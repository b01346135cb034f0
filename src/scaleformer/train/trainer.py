"""``scaleformer train``: pretrain any preset on the built-in corpus or your data, resumable bit for bit.

Determinism is by construction: the batch of step s is a pure function of (seed, s), the learning rate a
pure function of s, and the checkpoint holds the model, the optimizer and torch's RNG state (dropout). So
a run killed at any moment and resumed from its latest checkpoint ends with the same weights, bit for
bit on CPU, as a run that was never interrupted.

Under ``torchrun`` (WORLD_SIZE > 1) the run is data-parallel (DDP; gloo on CPU, nccl on GPU) with
global-batch semantics: ``batch_size`` is the global batch, rank r trains on rows [r·b, (r+1)·b) of the
same global batch (b = batch_size / world), so N ranks follow the loss curve of one process. Only rank 0
logs and writes checkpoints (with every rank's RNG state); every rank resumes from them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import inspect
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from scaleformer import durable
from scaleformer.runtime import native_bfloat16, reusing_freed_memory, thread_advice
from scaleformer.build import build, check_size, read_config
from scaleformer.files import one_line
from scaleformer.config import ConfigBase, ConfigError
from scaleformer.train.options import TrainConfig
from scaleformer.data.corpus import Corpus, builtin_corpus
from scaleformer.data.text_tokens import TextSource, scan_text, text_source, tokenize_text, tokenizer_sample
from scaleformer.data.token_ids import CHUNK, scan_ids, split_ids
from scaleformer.data.tokenizer import ByteTokenizer, IdTokenizer, load_tokenizer, train_tokenizer
from scaleformer.generation import generate
from scaleformer.models.families import arch_of, mixer_summary, with_options
from scaleformer.overrides import parse_options
from scaleformer.layers.moe import moe_layers
from scaleformer.parallel.clip import sparse_clip_grad_norm_
from scaleformer.presets import preset_with_options
from scaleformer.tasks import IGNORE, TaskBatch, accuracy, make_task
from scaleformer.train.checkpoint import (CheckpointError, DamagedCheckpoint, all_finite, checkpoint_candidates, full_state,
                                          load_training_state, note, save_checkpoint, save_sharded_checkpoint,
                                          trainer_state)
from scaleformer.train.rundir import prepare_run_dir, truncate_metrics

__all__ = ["TrainConfig", "Trainer", "TrainingError", "prepare_data"]


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. a non-finite loss under on_nan='stop')."""


#: train options that do not change the trained weights: a resume may change them freely
_DOES_NOT_CHANGE_WEIGHTS = frozenset({"out", "eval_every", "eval_batches", "save_every", "log_every", "samples",
                                      "progress", "resume", "allow_changes", "device", "compile", "on_nan",
                                      "checkpoint", "context_parallel"})


@dataclass
class Data:
    corpus: Corpus
    tokenizer: Any
    train: np.ndarray  # token ids (memory maps of cached token files)
    val: np.ndarray
    #: where each document starts in train and in val (text corpora; None for .npy ids, which have no documents)
    document_starts: tuple[np.ndarray, np.ndarray] | None = None


def _check_digest(cfg: TrainConfig, digest: str, expected: str | None) -> None:
    if expected is not None and digest != expected:
        raise ValueError(f"{one_line(str(cfg.data), 100)} (the training data the checkpoint records): not the data the "
                         "checkpoint was trained on (its sha256 differs); pass --data to evaluate on data of your choice")


def _token_ids(cfg: TrainConfig, expected_sha256: str | None = None) -> Data:
    """Pre-tokenized data: a 1-D integer .npy array (read without pickle); every 10th block held out."""
    path = Path(cfg.data or "")
    if not path.exists():
        raise FileNotFoundError(f"--data {path}: no such file")
    if not path.is_file():
        raise ValueError(f"--data {path}: not a regular file")
    try:  # a memory map: the array is read in chunks, never whole (see scaleformer.data.token_ids)
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as error:
        raise ValueError(f"--data {path}: not a plain .npy array ({error})") from None
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"--data {path}: token ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    if ids.size == 0:
        raise ValueError(f"--data {path}: the data is empty")
    low, high, digest = scan_ids(ids)
    if low < 0 or high >= cfg.vocab_size:
        raise ValueError(f"--data {path}: token ids out of the vocabulary: they span [{low}, {high}] but "
                         f"--vocab-size is {cfg.vocab_size}; pass --vocab-size {high + 1} or more")
    _check_digest(cfg, digest, expected_sha256)
    train, val = split_ids(ids, digest, block=8 * cfg.seq_len, every=round(1 / cfg.val_fraction))
    data = Data(Corpus("", str(path), digest), IdTokenizer(cfg.vocab_size), train, val)
    _check_sizes(data, cfg)
    return data


def _check_sizes(data: Data, cfg: TrainConfig) -> None:
    need = cfg.seq_len + 1
    if len(data.train) < need or len(data.val) < need:
        raise ValueError(f"the data is too small: {len(data.train)} training and {len(data.val)} validation tokens, "
                         f"need more than seq_len + 1 = {need} of each; use a smaller --seq-len or more data")


def prepare_data(cfg: TrainConfig, tokenizer=None, expected_sha256: str | None = None) -> Data:
    """Read, tokenize and split the data, never holding a file corpus whole (see
    :mod:`scaleformer.data.text_tokens` and :mod:`scaleformer.data.token_ids`). With ``expected_sha256`` (a
    checkpoint's corpus), data with another digest is refused before it is tokenized."""
    if cfg.data and cfg.data.endswith(".npy"):
        return _token_ids(cfg, expected_sha256)
    source = text_source(cfg.data, cfg.text_field) if cfg.data else TextSource("builtin", text=builtin_corpus().text)
    scan = scan_text(source)
    _check_digest(cfg, scan.sha256, expected_sha256)
    tokenizer = tokenizer or train_tokenizer(tokenizer_sample(source), cfg.tokenizer, cfg.vocab_size)
    # Documents (pieces between blank lines), every 1/val_fraction-th one held out: validation spans the corpus.
    train, val, train_starts, val_starts = tokenize_text(source, scan, tokenizer, round(1 / cfg.val_fraction),
                                                         progress=cfg.progress)
    data = Data(Corpus("", source.name, scan.sha256), tokenizer, train, val, (train_starts, val_starts))
    _check_sizes(data, cfg)
    return data


@dataclass
class TaskData:
    """A synthetic task in place of a corpus: its name and options, the tokenizer its ids need, and a fixed
    validation set (``corpus`` names the task; its sha256 covers the options, so a resume checks them)."""

    corpus: Corpus
    tokenizer: Any
    name: str
    options: dict[str, Any]
    val: TaskBatch

    def batch(self, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        examples = make_task(self.name, count, seed=seed, **self.options)
        return examples.inputs, examples.labels


def task_options(cfg: TrainConfig) -> dict[str, Any]:
    """The task's options: --task-options, with the length making examples seq_len tokens long."""
    options = parse_model_options(cfg.task_options)
    if "length" in options:
        raise ConfigError("the task's length is --seq-len")
    if cfg.task == "selective_copying":  # its `length` is the noise region, before the markers
        options["length"] = cfg.seq_len - options.get("tokens", 16)
    else:
        options["length"] = cfg.seq_len
    return options


def prepare_task(cfg: TrainConfig) -> TaskData:
    assert cfg.task is not None
    options = task_options(cfg)
    try:
        val = make_task(cfg.task, cfg.eval_batches * cfg.batch_size, seed=task_seed(cfg.seed, None), **options)
    except TypeError as error:  # an option the task does not take
        raise ConfigError(f"task {cfg.task}: {one_line(error)}") from None
    spec = json.dumps({"task": cfg.task, **options}, sort_keys=True)
    tokenizer = ByteTokenizer() if cfg.task in ("passkey", "multi_needle") else IdTokenizer(val.vocab_size)
    return TaskData(Corpus("", f"task:{cfg.task}", hashlib.sha256(spec.encode()).hexdigest()), tokenizer, cfg.task,
                    options, val)


def task_seed(seed: int, step: int | None) -> int:
    """The seed of a step's examples (None: the validation set's): a pure function of (seed, step)."""
    return int(np.random.SeedSequence([seed, 0 if step is None else 1, step or 0]).generate_state(1)[0])


def parse_model_options(options: tuple[str, ...]) -> dict[str, Any]:
    """("layers=4", "position.base=500000") -> {"layers": 4, "position.base": 500000}: values are JSON when
    they parse; keys may be dotted paths (:mod:`scaleformer.overrides`)."""
    return parse_options(options)


def model_config(cfg: TrainConfig) -> ConfigBase:
    """The preset (or JSON config file) with --model-options applied (see :func:`with_options`); one
    ConfigError unless it is a causal language model (what the trainer's next-token objective trains)."""
    options = parse_model_options(cfg.model_options)
    if cfg.model.endswith(".json"):
        config = with_options(read_config(Path(cfg.model), saved=False), options)
    else:
        config = preset_with_options(cfg.model, options)
    try:
        kind = {"encoder": "a bidirectional encoder (causal=false)", "encoder_decoder": "an encoder-decoder",
                "decoder": None}[arch_of(config)]
    except TypeError:  # BEiT-3, LongViT: not language models
        kind = f"a {type(config).__name__}"
    if kind is not None:
        raise ConfigError(f"{cfg.model} is {kind}: scaleformer train trains causal language models (next-token "
                          "prediction); choose a decoder preset (gpt-tiny, retnet-mini, ...)")
    return config


def batch_at(tokens: np.ndarray, step: int, seed: int, batch_size: int, seq_len: int) -> torch.Tensor:
    """The (batch_size, seq_len + 1) token windows of step ``step``: a pure function of (seed, step)."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    return torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64))


def document_ids(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) token ids -> (B, T) the document each token belongs to: a document ends with its eos token."""
    ends = (inputs == eos_id).long()
    return ends.cumsum(1) - ends


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on val of add-one-smoothed unigram frequencies from train."""
    # in chunks: train and val may be memory maps larger than memory
    counts = np.ones(vocab_size, dtype=np.float64)
    for start in range(0, len(train), CHUNK):
        counts += np.bincount(train[start:start + CHUNK], minlength=vocab_size)
    log_probs = np.log(counts / counts.sum())
    total = sum(float(log_probs[val[start:start + CHUNK]].sum()) for start in range(0, len(val), CHUNK))
    return -total / len(val)


#: below this width bf16 autocast costs more than it saves on a CPU (it re-casts every weight and activation
#: per product): measured on this project's CPU (AVX512-BF16), gpt-tiny and retnet-tiny (width 64) ran
#: 10-45% slower per step in bf16, retnet-mini (width 128, the default run) 1.2-1.7x faster
AUTO_BFLOAT16_MIN_WIDTH = 128


def _differences(a: Any, b: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, a's value, b's value) wherever two JSON-like values differ (the first few)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b)) for d in _differences(a.get(key), b.get(key), f"{path}{key}.")][:5]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for index, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}{index}.")][:5]
    return [] if a == b else [(path.rstrip("."), a, b)]


def perplexity(loss: float) -> float:
    """exp(loss), inf where that overflows a float (a loss above ~709 nats, from a diverged model)."""
    return math.exp(loss) if loss < 709 else float("inf")


def auto_precision(device: torch.device, width: int) -> str:
    """What ``precision="auto"`` means for a model of this width on ``device``: bfloat16 where the hardware
    multiplies it natively (and, on a CPU, the model is wide enough to gain from it), else float32."""
    wide_enough = device.type != "cpu" or width >= AUTO_BFLOAT16_MIN_WIDTH
    return "bfloat16" if wide_enough and native_bfloat16(device) else "float32"


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        model_config(cfg)  # the model is checked before anything is read or written
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        self.stop_requested = False
        self.stop_signal: int | None = None  # the signal that asked the run to stop (the exit code says it)
        self.device, self.world, self.rank, self.sharded = torch.device("cpu"), 1, 0, False
        self.data_world, self.context_group = 1, None  # data-parallel groups; this rank's context group
        self.lock = None  # rank 0's lock on the run directory, held from set-up to the end of run()

    # -- set-up -----------------------------------------------------------------------------------------
    def _setup_distributed(self) -> None:
        cfg = self.cfg
        wanted = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device
        if wanted.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {cfg.device}: CUDA is not available here (torch {torch.__version__}); use "
                             "--device cpu or auto")
        self.device = torch.device("cpu" if wanted == "auto" else wanted)
        self.world, self.rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        cp = cfg.context_parallel
        if self.world % cp:
            raise ValueError(f"--context-parallel {cp} must divide the {self.world} processes (world = data "
                             f"parallel × context parallel)")
        self.data_world = self.world // cp
        if cfg.batch_size % self.data_world:
            raise ValueError(f"batch_size {cfg.batch_size} (the global batch) must be divisible by the "
                             f"{self.data_world} data-parallel groups")
        self.context_group = None
        if cp > 1:  # consecutive ranks share rows; every rank takes part in creating every group
            for first in range(0, self.world, cp):
                group = dist.new_group(list(range(first, first + cp)))
                if first <= self.rank < first + cp:
                    self.context_group = group

    def _setup(self) -> None:
        self._setup_distributed()
        cfg = self.cfg
        candidates = self._claim_run_dir()
        if candidates and cfg.resume == "never":
            raise ValueError(f"{self.run_dir} already holds checkpoints; use another --out or --resume auto")
        tokenizer = None
        while candidates:  # every rank walks the same list: rank 0's
            try:
                tokenizer = load_tokenizer(candidates[0])
                break
            except (OSError, ValueError) as error:
                candidates = self._pass_over(candidates, error)
        self.data = self._prepare_data(tokenizer)
        self.model_config = model_config(cfg).replace(vocab_size=self.data.tokenizer.vocab_size)
        self.requested_precision = cfg.precision
        if cfg.precision == "auto":  # resolved once, and recorded: a resume compares what actually ran
            self.cfg = cfg = cfg.replace(precision=auto_precision(self.device, self.model_config.embed_dim))
        check_size(self.model_config, self.device)  # before building: no allocator traceback, no endless build
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model: nn.Module = build(self.model_config).to(self.device)
        if cfg.pack_documents and "document_ids" not in inspect.signature(self.model.forward).parameters:
            raise ConfigError(f"pack_documents: a {type(self.model).__name__} takes no document_ids; pack for "
                              "decoder-style models (Decoder, RetNet)")
        torch.manual_seed(cfg.seed + 1_000_003 * self.rank)  # then per-rank dropout streams
        if self.device.type == "cuda":
            torch.cuda.manual_seed(cfg.seed + 1_000_003 * self.rank)
        fsdp = self.world > 1 and cfg.parallel == "fsdp"
        self.sharded = fsdp  # every forward is then a collective: evaluation and samples run on all ranks
        if fsdp:
            _fully_shard(self.model)
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
        self.step = 0
        while candidates:  # after sharding: under FSDP2 each rank loads only its shard
            self._check_same_setup(candidates[0])
            try:
                state = load_training_state(candidates[0], self.model, self.optimizer, rank=self.rank,
                                            world=self.world, seed=cfg.seed, device=self.device)
                break
            except DamagedCheckpoint as error:  # e.g. NaN weights: its headers looked complete
                candidates = self._pass_over(candidates, error)
        self.checkpoint = candidates[0] if candidates else None
        if self.checkpoint is None and self.rank == 0:  # a run killed before its first checkpoint starts over
            truncate_metrics(self.run_dir / "metrics.jsonl", 0)
        if self.checkpoint is not None:
            self.step = state["step"]
            if self.rank == 0:
                truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
                if "rng_restarted" in state:
                    note(f"{self.checkpoint.name} was saved by {state['rng_restarted']} process(es) and continues on "
                         f"{self.world}: the batches and loss curve go on as before, but each process's random "
                         "stream (dropout) restarts from the seed and step")
        self.trained = self.model
        if self.world > 1 and not fsdp:
            from torch.nn.parallel import DistributedDataParallel

            self.trained = DistributedDataParallel(self.model, device_ids=[self.device.index]
                                                   if self.device.type == "cuda" else None)
        if cfg.compile:
            self.trained = torch.compile(self.trained)
        if self.rank == 0:
            self._write_run_json()

    def _prepare_data(self, tokenizer) -> "Data | TaskData":
        """Rank 0 first (it builds the cached token files), then the others (they find them, on shared
        storage); an error on rank 0 reaches every rank, so none waits for it in a collective."""
        cfg = self.cfg
        if cfg.task:
            return prepare_task(cfg)
        if self.world == 1:
            return prepare_data(cfg, tokenizer)
        failure: list[str | None] = [None]
        data, error = None, None
        if self.rank == 0:
            try:
                data = prepare_data(cfg, tokenizer)
            except Exception as caught:  # noqa: BLE001 - passed on to the other ranks, then raised here
                failure[0], error = one_line(caught, 400), caught
        dist.broadcast_object_list(failure, src=0)
        if error is not None:
            raise error
        if failure[0] is not None:
            raise ValueError(failure[0])
        return data if data is not None else prepare_data(cfg.replace(progress=False), tokenizer)

    def _claim_run_dir(self) -> list[Path]:
        """Rank 0 locks and cleans the run directory and lists the usable checkpoints, best first; every
        rank gets the same answer (or the same error), so no rank waits in a collective for a failed one."""
        outcome: list[Any] = [None, None]
        if self.rank == 0:
            try:
                self.lock = prepare_run_dir(self.run_dir)
                outcome[0] = [str(p) for p in checkpoint_candidates(self.run_dir, report=note)]
            except ValueError as error:
                outcome[1] = str(error)
        if self.world > 1:
            dist.broadcast_object_list(outcome, src=0)
        if outcome[1] is not None:
            raise ValueError(outcome[1])
        return [Path(p) for p in outcome[0]]

    def _pass_over(self, candidates: list[Path], error: Exception) -> list[Path]:
        """Drop the first candidate, damaged in a way only loading it showed; say so in one line."""
        if len(candidates) == 1:
            raise CheckpointError(f"{one_line(error, 400)}; and no earlier checkpoint is complete: move "
                                  "checkpoints/ away to start again, or train into a new --out")
        if self.rank == 0:
            note(f"{one_line(error, 400)}; using {candidates[1].name}, the newest complete checkpoint before it")
        return candidates[1:]

    def _check_same_setup(self, checkpoint: Path) -> None:
        """Refuse to continue a run under options that change its result, unless --allow-changes."""
        state = trainer_state(checkpoint)  # checked complete by checkpoint_candidates
        if state.get("corpus_sha256") != self.data.corpus.sha256:
            raise ValueError(f"{checkpoint}: trained on other data (sha256 {one_line(str(state.get('corpus_sha256')), 70)}); "
                             "resume with the same --data, or start a new --out")
        saved, ours = state.get("train", {}), json.loads(json.dumps(self.cfg.to_dict()))  # tuples as JSON lists
        changed = [f"{name} {saved[name]!r} -> {ours[name]!r}" for name in sorted(ours)
                   if name not in _DOES_NOT_CHANGE_WEIGHTS and name in saved and saved[name] != ours[name]]
        # the same options can build another model when a preset's defaults change between versions (S2's
        # head_offset did): the model the checkpoint was trained as is compared too
        changed = changed or [f"model {key} {a!r} -> {b!r}" for key, a, b in _differences(
            read_config(checkpoint / "config.json").to_dict(), self.model_config.to_dict())]
        if changed and not self.cfg.allow_changes:
            raise ValueError(f"{checkpoint} was trained with other options ({one_line('; '.join(changed), 300)}); "
                             "resume with the same options, pass --allow-changes to continue anyway, or train "
                             "into a new --out")
        if changed and self.rank == 0:
            note(f"continuing {checkpoint.name} with changed options: {one_line('; '.join(changed), 300)}")

    def _write_run_json(self) -> None:
        sizes = ({"task_options": self.data.options, "val_examples": self.data.val.inputs.shape[0]}
                 if isinstance(self.data, TaskData) else
                 {"train_tokens": len(self.data.train), "val_tokens": len(self.data.val)})
        meta = {"train": self.cfg.to_dict(), "model": self.model_config.to_dict(), "processes": self.world,
                "corpus": {"source": self.data.corpus.source, "sha256": self.data.corpus.sha256, **sizes},
                "tokenizer": type(self.data.tokenizer).__name__, "torch": torch.__version__}
        durable.atomic_write_text(self.run_dir / "run.json", json.dumps(meta, indent=1))

    # -- the loop ---------------------------------------------------------------------------------------
    def learning_rate(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        progress = min((step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1), 1.0)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch of ``step`` as (inputs, targets), a pure function of (seed, step): windows of the
        corpus (targets: the next tokens), or a task's fresh examples (targets: its labels)."""
        cfg = self.cfg
        if isinstance(self.data, TaskData):
            return self.data.batch(cfg.batch_size, task_seed(cfg.seed, step))
        batch = batch_at(self.data.train, step, cfg.seed, cfg.batch_size, cfg.seq_len)
        return batch[:, :-1], batch[:, 1:]

    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor, model: nn.Module | None = None,
              split: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy over the positions that have a target (a task's answers), and the aux loss.
        ``split``: this rank's positions of the rows, which are split across its context group; the loss is
        then its share of the group's mean, times the group's size (the data-parallel average of gradients
        over every rank then gives each group's mean, as one process would)."""
        inputs, targets, options = inputs.to(self.device), targets.to(self.device), {}
        if self.cfg.pack_documents:  # numbered along whole rows: a document may continue on the next rank
            options["document_ids"] = document_ids(inputs, self.data.tokenizer.eos_id)
            targets = targets.masked_fill(inputs == self.data.tokenizer.eos_id, -100)  # the next document's first token
        if split is not None:
            options["sequence_group"] = self.context_group
            inputs, targets = inputs[:, split], targets[:, split]
            options = {k: v[:, split] if k == "document_ids" else v for k, v in options.items()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bfloat16"):
            out = (model if model is not None else self.model)(inputs, **options)
        if split is None:
            loss = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
            return loss, out.aux_loss.float()
        summed = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                                 reduction="sum")
        counted = (targets != IGNORE).sum().to(summed.dtype).reshape(1)
        dist.all_reduce(counted, group=self.context_group)
        size = dist.get_world_size(self.context_group)
        return summed / counted.clamp(min=1)[0] * size, out.aux_loss.float()

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(step)
        inputs, targets = self._batch(step)
        cp = cfg.context_parallel
        rows = cfg.batch_size // self.data_world
        mine = slice(self.rank // cp * rows, (self.rank // cp + 1) * rows)  # this rank's share of the global batch
        if cp == 1:
            loss, aux = self._loss(inputs[mine], targets[mine], self.trained)
        else:  # and of each of those sequences: positions [c·n, (c + 1)·n)
            n = inputs.shape[1] // cp
            part = slice(self.rank % cp * n, (self.rank % cp + 1) * n)
            loss, aux = self._loss(inputs[mine], targets[mine], self.trained, split=part)
        total = loss + aux
        if self.world > 1:  # every rank must take the same decision about a non-finite loss
            finite = torch.tensor([float(torch.isfinite(total))], device=self.device)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if not finite.item():
                total = total * float("nan")
        if not torch.isfinite(total):
            if cfg.on_nan == "stop":
                raise TrainingError(f"step {step}: the loss is {total.item()} (not finite). Lower --lr, raise "
                                    "--warmup or --grad-clip, or pass --on-nan skip to skip such steps")
            self.optimizer.zero_grad(set_to_none=True)
            return {"loss": float("nan"), "skipped": 1.0}
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = sparse_clip_grad_norm_(self.model, cfg.grad_clip) if cfg.grad_clip > 0 else torch.tensor(0.0)
        self.optimizer.step()
        reported = torch.stack([loss.detach(), aux.detach()])
        if self.world > 1:  # log the global batch's loss, not rank 0's share
            dist.all_reduce(reported)
            reported /= self.world
        metrics = {"loss": reported[0].item(), "aux_loss": reported[1].item(), "grad_norm": float(grad_norm),
                   "lr": self.learning_rate(step)}
        for index, layer in enumerate(moe_layers(self.model)):
            if layer.load is not None:  # load balance: the busiest expert's share, relative to a fair one
                metrics[f"moe{index}_max_load"] = float(layer.load.max() * layer.cfg.experts)
        return metrics

    @torch.no_grad()
    def evaluate(self, batches: int | None = None) -> float:  # on the unwrapped model: no collectives
        """Mean validation cross-entropy (nats/token) over fixed windows of the validation split, or over a
        task's fixed validation examples (their answers)."""
        cfg = self.cfg
        self.model.eval()
        if isinstance(self.data, TaskData):
            val, size = self.data.val, cfg.batch_size
            chunks = [(val.inputs[i:i + size], val.labels[i:i + size]) for i in range(0, val.inputs.shape[0], size)]
        else:
            chunks = [(b[:, :-1], b[:, 1:]) for b in (batch_at(self.data.val, index, cfg.seed + 1, cfg.batch_size,
                                                                cfg.seq_len) for index in range(batches or cfg.eval_batches))]
        return float(np.mean([self._loss(inputs, targets)[0].item() for inputs, targets in chunks]))

    @property
    def checkpoint_format(self) -> str:
        """"sharded" or "full" (--checkpoint auto: sharded under FSDP2, where gathering is what sharding avoids)."""
        if self.cfg.checkpoint != "auto":
            return self.cfg.checkpoint
        return "sharded" if self.world > 1 and self.cfg.parallel == "fsdp" else "full"

    def save(self) -> Path | None:
        """Write a checkpoint (every rank's RNG state in it): full, by rank 0 from state gathered to it, or
        sharded, by every rank. All ranks return after it exists (rank 0 gets its path)."""
        if not all_finite([p.detach() for p in self.model.parameters()]):  # every rank takes the same decision
            raise TrainingError(f"step {self.step}: the weights hold NaN or infinite values after the update (the "
                                "loss before it was finite), so they are not saved; the last checkpoint is kept. "
                                "Lower --lr, raise --warmup or --grad-clip")
        states = _gather_all(torch.get_rng_state(), self.world)
        cuda_states = (_gather_all(torch.cuda.get_rng_state(self.device), self.world)
                       if self.device.type == "cuda" else None)
        extra = {"corpus_sha256": self.data.corpus.sha256, "train": self.cfg.to_dict(), "processes": self.world}
        if self.checkpoint_format == "sharded":  # every rank writes its part; nothing is gathered
            path = save_sharded_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.data.tokenizer,
                                           extra, rng_states=states, cuda_rng_states=cuda_states)
            if self.world > 1:
                dist.barrier()
            return path
        weights, optimizer_state = full_state(self.model, self.optimizer)  # a collective under FSDP2
        path = None
        if self.rank == 0:
            unsharded = self.model
            if self.world > 1 and self.cfg.parallel == "fsdp":
                unsharded = build(self.model_config)
                unsharded.load_state_dict(weights)
            path = save_checkpoint(self.run_dir, self.step, unsharded, optimizer_state, self.data.tokenizer, extra,
                                   rng_states=states, cuda_rng_states=cuda_states)
        if self.world > 1:
            dist.barrier()
        return path

    def validation_label(self, batches: int | None = None) -> str:
        """What a validation loss averages: the metrics lines' fixed windows, or the final report's more."""
        cfg = self.cfg
        if isinstance(self.data, TaskData):
            return f"mean over the answers of {self.data.val.inputs.shape[0]} held-out examples"
        count = batches or cfg.eval_batches
        return f"mean over {count} fixed validation batches of {cfg.batch_size} × {cfg.seq_len} tokens"

    def header(self) -> list[str]:
        """What the run is about to do, for the console: model, data, precision and why, where it writes,
        and where it starts."""
        cfg, data = self.cfg, self.data
        parameters = sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())
        mixers, depth = mixer_summary(self.model_config)
        lines = [f"model: {cfg.model} ({type(self.model_config).__name__}, {parameters:,} parameters; {depth} layers: "
                 f"{mixers}, width {self.model_config.embed_dim})"]
        if isinstance(data, TaskData):
            lines.append(f"data: task {data.name} ({', '.join(f'{k}={v}' for k, v in sorted(data.options.items()))}); "
                         f"fresh examples every step, {data.val.inputs.shape[0]} held out")
        else:
            source = "the built-in corpus" if data.corpus.source == "builtin" else data.corpus.source
            lines.append(f"data: {source}: {len(data.train):,} training and {len(data.val):,} validation tokens "
                         f"({type(data.tokenizer).__name__}, vocab {data.tokenizer.vocab_size:,})")
        if self.requested_precision != "auto":
            why = "as asked"
        elif cfg.precision == "bfloat16":
            why = "auto: this device multiplies bfloat16 natively"
        elif native_bfloat16(self.device):
            why = f"auto: the model is {self.model_config.embed_dim} wide; bfloat16 pays on this CPU from 128"
        else:
            why = "auto: this device has no native bfloat16"

        lines.append(f"precision: {cfg.precision} ({why}); device {self.device}"
                     + (f", {self.world} processes" if self.world > 1 else f", {torch.get_num_threads()} threads")
                     + (f" ({self.data_world} data parallel × {cfg.context_parallel} context parallel: each sequence "
                        f"split in {cfg.context_parallel})" if cfg.context_parallel > 1 else ""))
        tokens = cfg.steps * cfg.batch_size * cfg.seq_len
        lines.append(f"run: {self.run_dir}: {cfg.steps:,} steps of {cfg.batch_size} × {cfg.seq_len} tokens "
                     f"({tokens:,} tokens), a checkpoint every {cfg.save_every:,} steps, validation every "
                     f"{cfg.eval_every:,}")
        lines.append(f"resuming from {self.checkpoint.name} (step {self.step:,} of {cfg.steps:,})" if self.checkpoint
                     else "starting from step 0")
        advice = thread_advice() if self.device.type == "cpu" and self.world == 1 else None
        if advice is not None:
            lines.append(f"note: {advice}")
        return lines

    def _check_validation(self, val: float | None) -> None:
        """A non-finite validation loss after an update (the training loss before it was finite: e.g. --lr
        far too high) stops the run before it saves such weights, as a non-finite training loss does (under
        --on-nan stop). Collective: every rank takes rank 0's decision."""
        finite = torch.tensor([float(val is None or math.isfinite(val))], device=self.device)
        if self.world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item() and self.cfg.on_nan == "stop":
            raise TrainingError(f"step {self.step}: the validation loss is {val} (not finite) after the update, so "
                                "these weights are not saved; the last checkpoint is kept. Lower --lr, raise "
                                "--warmup or --grad-clip")

    def _on_signal(self, signum, frame) -> None:
        self.stop_requested = True
        self.stop_signal = signum

    def _should_stop(self) -> bool:
        """A stop request on any rank stops every rank at the same step."""
        if self.world == 1:
            return self.stop_requested
        flag = torch.tensor([float(self.stop_requested)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.stop_requested = bool(flag.item())
        return self.stop_requested

    def run(self) -> dict[str, Any]:
        """Train (or continue) the run; returns the final report. The run directory stays locked throughout."""
        try:
            return self._run()
        finally:
            if self.lock is not None:
                self.lock.release()
                self.lock = None

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        # Handlers first: a signal during set-up is honoured at the first step boundary, never a hard kill.
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._setup()
        except BaseException:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            raise
        main = self.rank == 0
        if main:
            for line in self.header():
                print(line, flush=True)
        log = (self.run_dir / "metrics.jsonl").open("a") if main else None
        tensorboard = _tensorboard(self.run_dir) if main else None
        progress = _progress(cfg, self.step) if main else None
        say = (progress.write if progress is not None else print) if main else (lambda line: None)
        start, tokens_done = time.perf_counter(), 0
        try:
            # each step's large tensors reuse the last step's pages (CPU); the data passes before and the
            # report after run with the allocator's usual thresholds
            with reusing_freed_memory() if self.device.type == "cpu" else contextlib.nullcontext():
                while self.step < cfg.steps and not self._should_stop():
                    metrics = self.train_step(self.step)
                    self.step += 1
                    tokens_done += cfg.batch_size * cfg.seq_len
                    rate = tokens_done / (time.perf_counter() - start)
                    if progress is not None:
                        progress.update(1)
                        progress.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{rate:,.0f}")
                    evaluate_now = self.step % cfg.eval_every == 0 or self.step == cfg.steps
                    if self.step % cfg.log_every == 0 or evaluate_now:
                        val = self.evaluate() if evaluate_now and (main or self.sharded) else None
                        record = {"step": self.step, **metrics, "tokens_per_s": rate * self.world}
                        if val is not None:
                            record["val_loss"] = val
                            say(f"step {self.step}/{cfg.steps}: loss {metrics['loss']:.4f}, validation loss {val:.4f} "
                                f"({self.validation_label()})")
                        if log is not None:
                            log.write(json.dumps(record) + "\n")
                            log.flush()
                        if evaluate_now:
                            self._check_validation(val)
                        if tensorboard is not None and log is not None:
                            for key, value in record.items():
                                if key != "step":
                                    tensorboard.add_scalar(key, value, self.step)
                    if self.step % cfg.save_every == 0 or self.step == cfg.steps or self.stop_requested:
                        self.save()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if progress is not None:
                progress.close()
            if log is not None:
                log.close()
            if tensorboard is not None:
                tensorboard.close()
        elapsed = time.perf_counter() - start  # training only: the report's evaluation and samples come after
        if self.stop_requested:
            if tokens_done == 0:  # stopped during set-up: no step was taken, so save the state we resumed
                self.save()
            signum = self.stop_signal or signal.SIGTERM  # a rank told by another rank stops as for SIGTERM
            if main:
                print(f"stopped by signal ({signal.Signals(signum).name}) at step {self.step} of {cfg.steps}; "
                      f"checkpoint saved; run the same command again to continue (exit code {128 + signum})")
            return {"step": self.step, "stopped": True, "signal": int(signum)}
        result = self._report() if main or self.sharded else {"step": self.step}
        if main:
            print(f"done: {self.step:,} steps ({tokens_done / max(elapsed, 1e-9):,.0f} tokens/s over {elapsed:,.0f} s of training); "
                  f"checkpoints in {self.run_dir / 'checkpoints'}, metrics in {self.run_dir / 'metrics.jsonl'}")
        return result

    def _report(self) -> dict[str, Any]:
        if isinstance(self.data, TaskData):
            return _task_report(self)
        val = self.evaluate(batches=max(self.cfg.eval_batches, 32))
        baseline = unigram_loss(self.data.train, self.data.val, self.data.tokenizer.vocab_size)
        tok = self.data.tokenizer
        say = print if self.rank == 0 else (lambda *args, **kwargs: None)
        batches = max(self.cfg.eval_batches, 32)
        say(f"\nvalidation loss {val:.4f} (perplexity {perplexity(val):.2f}; {self.validation_label(batches)}, more "
            f"than the {self.cfg.eval_batches} of the lines above) — unigram baseline {baseline:.4f} (perplexity "
            f"{perplexity(baseline):.2f}); {tok.__class__.__name__}, vocab {tok.vocab_size}")
        samples = []
        prompts = ["The ", "A list ", "def "] if not isinstance(tok, IdTokenizer) else [
            " ".join(str(i) for i in self.data.val[k * 97:k * 97 + 8]) for k in range(3)]
        for index, prompt in enumerate(prompts[: self.cfg.samples]):
            ids = torch.tensor([tok.encode(prompt, add_bos=False)], device=self.device)
            out = generate(self.model, ids, 40, temperature=0.8, top_k=40, stop_tokens=tok.eos_id,
                           generator=torch.Generator().manual_seed(index))
            samples.append(prompt + tok.decode(out[0, ids.shape[1]:].tolist()))
            say(f"--- sample {index + 1}: {samples[-1]!r}")
        result = {"step": self.step, "val_loss": val, "val_perplexity": perplexity(val), "unigram_loss": baseline,
                  "unigram_perplexity": perplexity(baseline), "samples": samples}
        if self.rank == 0:
            (self.run_dir / "result.json").write_text(json.dumps(result, indent=1))
        return result


def _gather_all(state: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Every rank's copy of an RNG state (a CPU byte tensor), in rank order."""
    if world == 1:
        return [state]
    states = [torch.empty_like(state) for _ in range(world)]
    dist.all_gather(states, state)
    return states


def _task_report(trainer: "Trainer") -> dict[str, Any]:
    data = trainer.data
    assert isinstance(data, TaskData)
    val, score = trainer.evaluate(), accuracy(trainer.model, data.val, batch_size=trainer.cfg.batch_size)
    if trainer.rank == 0:
        print(f"\n{data.name}: validation loss {val:.4f} on the answers; accuracy {score} over "
              f"{data.val.inputs.shape[0]} held-out examples of {trainer.cfg.seq_len} tokens")
    result = {"step": trainer.step, "task": data.name, "task_options": data.options, "val_loss": val,
              "accuracy": score.value, "accuracy_low": score.low, "accuracy_high": score.high,
              "correct": score.correct, "total": score.total}
    if trainer.rank == 0:
        (trainer.run_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result


def _fully_shard(model: nn.Module) -> None:
    """FSDP2: one shard group per block (RetNet or Transformer layer), then the rest at the root."""
    from torch.distributed.fsdp import fully_shard

    from scaleformer.layers.block import Block

    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module)
    fully_shard(model)


def _progress(cfg: TrainConfig, initial: int):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=initial, unit="step", dynamic_ncols=True)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))
