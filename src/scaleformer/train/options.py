"""The options of ``scaleformer train``: a typed, frozen config whose fields are also the command's flags.

Kept apart from the trainer and free of torch, so that ``scaleformer train --help`` and a mistyped flag are
answered without importing it.
"""

from __future__ import annotations

import math
import re
from typing import ClassVar, Literal

from scaleformer.config import ConfigBase, ConfigError, check_choice, config

__all__ = ["TrainConfig", "MAX_VOCAB", "TASK_NAMES"]

#: the synthetic tasks (scaleformer.tasks.TASKS; a test holds the two equal)
TASK_NAMES = ("mqar", "selective_copying", "passkey", "multi_needle")


@config
class TrainConfig(ConfigBase):
    """Options of ``scaleformer train`` (each is also a command-line flag)."""

    family: ClassVar[str] = "train"

    #: model preset (see `scaleformer presets`), or a .json file holding any model config (e.g. a ModelConfig's
    #: to_json(): a list of layers); its vocab_size is set to the tokenizer's
    model: str = "retnet-mini"
    #: model options overriding the preset's, as KEY=VALUE (VALUE read as JSON if it parses, e.g. layers=4
    #: dropout=0.1 norm=deepnorm moe={"experts":4})
    model_options: tuple[str, ...] = ()
    #: training data: a .txt, .jsonl, .parquet or .arrow file or a folder of them (e.g. a Hugging Face dataset's
    #: save_to_disk folder; read as a stream and tokenized once into a cache), or pre-tokenized ids as a 1-D
    #: integer .npy array (then the model's vocabulary is `vocab_size`); None = the built-in corpus
    data: str | None = None
    #: the field holding the text in .jsonl lines and in .parquet / .arrow records (Hugging Face datasets)
    text_field: str = "text"
    #: "auto" (byte-level BPE when `tokenizers` is installed, else bytes), "bpe" or "byte"
    tokenizer: Literal["auto", "bpe", "byte"] = "auto"
    #: BPE vocabulary size (for .npy token ids: the model's vocabulary, larger than every id)
    vocab_size: int = 4096
    #: tokens per training sequence
    seq_len: int = 128
    #: train on a synthetic task instead of text (scaleformer.tasks: mqar, selective_copying, passkey,
    #: multi_needle): examples of seq_len tokens, generated afresh for every step; the loss is only on answers,
    #: and evaluation reports accuracy. The model's vocabulary is the task's. "shapes": BEiT-3's vision demo
    #: (images of coloured shapes: classification and image-text retrieval; scaleformer.train.shapes)
    task: str | None = None
    #: the task's options as KEY=VALUE (VALUE read as JSON), e.g. pairs=16 vocab_size=8192 for mqar
    task_options: tuple[str, ...] = ()
    #: pack documents instead of concatenating them: each document (ending with its eos token; for .npy ids,
    #: id vocab_size - 1) restarts at position 0, attends only to itself (retention and dilated states reset),
    #: and the token after an eos is not a target
    pack_documents: bool = False
    #: sequences per step
    batch_size: int = 16
    #: optimizer steps
    steps: int = 800
    #: peak learning rate (AdamW), reached after `warmup` steps, then cosine decay to lr · min_lr_ratio
    lr: float = 3e-3
    #: linear warm-up steps
    warmup: int = 80
    #: final learning rate as a fraction of `lr`
    min_lr_ratio: float = 0.1
    #: AdamW weight decay
    weight_decay: float = 0.1
    #: gradient-norm clip (SparseClip for MoE models); 0 = off
    grad_clip: float = 1.0
    #: seed of initialization, batches and dropout
    seed: int = 0
    #: run directory (checkpoints, metrics.jsonl, run.json)
    out: str = "runs/default"
    #: evaluate on the validation split every this many steps (and at the end)
    eval_every: int = 200
    #: validation batches per evaluation
    eval_batches: int = 16
    #: checkpoint every this many steps (and at the end, and on SIGTERM/SIGINT)
    save_every: int = 200
    #: log a metrics line every this many steps
    log_every: int = 10
    #: "auto" continues from the run's latest checkpoint if there is one; "never" refuses to overwrite one
    resume: Literal["auto", "never"] = "auto"
    #: resume even though options that change the trained weights (seed, seq_len, lr, ...) differ from the
    #: checkpoint's (without it such a resume is refused, naming what changed)
    allow_changes: bool = False
    #: what a non-finite loss does: "stop" the run with an error, or "skip" the step
    on_nan: Literal["stop", "skip"] = "stop"
    #: fraction of the corpus held out for validation
    val_fraction: float = 0.1
    #: sampled continuations printed at the end
    samples: int = 3
    #: show a progress bar
    progress: bool = True
    #: "auto" (cuda when available), "cpu" or "cuda"
    device: str = "auto"
    #: compute precision: "float32", "bfloat16" autocast (weights, optimizer and loss stay float32), or
    #: "auto": bfloat16 where the device multiplies it in hardware (recent CPUs and GPUs; on a CPU for models
    #: of width 128 or more, below which it is slower), else float32; the run records which
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    #: torch.compile the training forward/backward (the first steps are slow while it compiles)
    compile: bool = False
    #: under torchrun: "ddp" (replicated model) or "fsdp" (FSDP2: parameters, gradients and optimizer
    #: state sharded across ranks, one shard group per layer)
    parallel: Literal["ddp", "fsdp"] = "ddp"
    #: under torchrun: split each sequence across this many consecutive processes (context parallelism,
    #: scaleformer.parallel.context); the rest of the world is data parallel (world = data × context)
    context_parallel: int = 1
    #: checkpoint format: "full" (rank 0 gathers the state and writes it as one model.safetensors and one
    #: optimizer.safetensors), "sharded" (every rank writes the part it holds, with torch.distributed.checkpoint;
    #: resumable on any number of processes; `scaleformer export` makes a plain model directory of it), or
    #: "auto": sharded under FSDP2, full otherwise
    checkpoint: Literal["auto", "full", "sharded"] = "auto"

    def _validate(self) -> None:
        for name in ("vocab_size", "seq_len", "batch_size", "steps", "eval_every", "eval_batches", "save_every",
                     "log_every", "context_parallel"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size > MAX_VOCAB:  # a BPE trainer would try to allocate tables this large
            raise ConfigError(f"vocab_size must be <= {MAX_VOCAB:,} (2^24), got {self.vocab_size:,}")
        if not 0 < self.val_fraction < 0.5:
            raise ConfigError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if not (math.isfinite(self.lr) and self.lr > 0) or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"lr must be a finite number > 0 (got {self.lr}) and min_lr_ratio in [0, 1] "
                              f"(got {self.min_lr_ratio})")
        for name in ("warmup", "grad_clip", "weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.task is not None:
            check_choice(self.task, TASK_NAMES, "task")
            if self.pack_documents or self.data:
                raise ConfigError("a task generates its own examples: it takes no --data or --pack-documents")
        elif self.task_options:
            raise ConfigError("task_options are given but no task")
        if self.context_parallel > 1 and self.seq_len % self.context_parallel:
            raise ConfigError(f"context_parallel {self.context_parallel} must divide seq_len ({self.seq_len}): each "
                              "process holds an equal share of every sequence")


#: the largest vocabulary a run may ask for (the largest in use are about 2^18)
MAX_VOCAB = 1 << 24
