"""Sharded checkpoints: every rank writes the part of the model and optimizer state it holds, and any number
of ranks reads them back.

Inside a checkpoint directory (beside config.json, tokenizer.json, rng.safetensors and trainer.json)::

  shards/shard-00001-model-00001-of-00001.safetensors    what rank 0 wrote
  shards/shard-00002-model-00001-of-00001.safetensors    what rank 1 wrote, ...

The files are written by ``torch.distributed.checkpoint`` (DCP) through its Hugging Face storage writer:
plain safetensors files whose header metadata (``DCP_SHARDING_INFO``) say where each piece sits in its
full tensor. Under FSDP2 each rank writes its own shard of every parameter and of its Adam moments; under
DDP or in one process, where every rank holds everything, DCP's planner gives each tensor to one rank, so
the writing is spread over the ranks too. Nothing is gathered to one rank.

We use this writer rather than DCP's default one because reading it never unpickles: the default format
keeps its index in a pickled ``.metadata`` file, and a checkpoint is something people download. The
reader rebuilds the index from the safetensors headers; DCP's load planner then maps the saved pieces onto
the pieces each reading rank holds, which is what lets a run resume on another number of processes.

Keys: ``model/<name>`` for each weight (a tied weight once, under its first name in the model's order) and
``state/<parameter name>/<entry>`` for the optimizer's tensors. ``trainer.json``'s ``"shards"`` records the
files and every tensor's full shape and dtype, so :func:`check_shards` can tell a complete checkpoint from
headers alone.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from scaleformer.files import one_line
from scaleformer.models.base import tensor_names

__all__ = ["SHARDS", "local_state", "write_shards", "read_shards", "describe", "check_shards", "is_sharded",
           "check_sharded_model", "is_distributed"]

SHARDS = "shards"  # the folder of shard files inside a checkpoint
_SHARDING_KEY = "DCP_SHARDING_INFO"  # where DCP's Hugging Face writer records each piece's offsets
_DTYPES = {"F32": torch.float32, "F64": torch.float64, "BF16": torch.bfloat16, "F16": torch.float16,
           "I64": torch.int64, "I32": torch.int32, "BOOL": torch.bool, "U8": torch.uint8}
_FLOATING = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _first_names(model: nn.Module) -> list[str]:
    return [names[0] for names in tensor_names(model).values()]


def local_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None
                ) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, torch.Tensor]]:
    """(model state dict, optimizer state dict, flat tensors to save or load) as this rank holds them: DTensor
    shards under FSDP2, whole tensors otherwise. The flat dict holds the same tensor objects as the two state
    dicts, so loading into it fills them. Getting an optimizer's state creates it when it does not exist yet
    (a fresh optimizer: zero moments, the targets a load fills)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    weights = get_model_state_dict(model)
    flat = {f"model/{name}": weights[name] for name in _first_names(model)}
    optimizer_state = None
    if optimizer is not None:
        optimizer_state = get_optimizer_state_dict(model, optimizer)
        for name, entries in optimizer_state["state"].items():
            flat.update({f"state/{name}/{key}": value for key, value in entries.items() if torch.is_tensor(value)})
    return weights, optimizer_state, flat


def is_distributed() -> bool:
    """Under torchrun, with the process group set up."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def write_shards(folder: Path, flat: dict[str, torch.Tensor]) -> None:
    """Every rank calls this (a collective under torchrun): each writes its pieces into ``folder`` (shared
    storage), each file fsync'ed by DCP's writer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

    with warnings.catch_warnings(), _plain_errors():  # DCP warns that a save without a process group
        warnings.simplefilter("ignore", UserWarning)  # "assumes the intent" of one
        dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True),
                 no_dist=not is_distributed())


def read_shards(folder: Path, flat: dict[str, torch.Tensor], collective: bool | None = None) -> None:
    """Fill ``flat``'s tensors in place from the shard files, each rank reading only the slices it holds (a
    collective under torchrun, unless ``collective`` is False: one process reading whole tensors). The folder
    must have passed :func:`check_shards`."""
    collective = is_distributed() if collective is None else collective
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    with warnings.catch_warnings(), _plain_errors():  # the same warning for a load
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=not collective)


@contextlib.contextmanager
def _plain_errors():
    """DCP reports a failure on any rank as a ``CheckpointException`` on every rank: a BaseException (it
    would pass every ``except Exception`` clean-up and print a traceback per rank). Raise the first failing
    rank's own error instead (an OSError for a full disk), the same on every rank."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as error:
        rank = min(error.failures)
        cause = error.failures[rank][0]
        if isinstance(cause, Exception):
            raise cause from None
        raise RuntimeError(f"rank {rank}: {one_line(cause)}") from None


def describe(folder: Path, flat: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What trainer.json records of the shards just written: the files, and each tensor's full shape and
    dtype (a DTensor's ``shape`` is its full shape)."""
    return {"files": sorted(path.name for path in folder.iterdir()),
            "tensors": {key: [list(value.shape), str(value.dtype).removeprefix("torch.")]
                        for key, value in flat.items()}}


def check_shards(folder: Path, description: Any) -> None:
    """A ``ValueError`` naming what is wrong unless the folder holds exactly the described files and their
    pieces cover every described tensor exactly once (read from headers: no tensor data is read)."""
    if not (isinstance(description, dict) and isinstance(description.get("files"), list)
            and isinstance(description.get("tensors"), dict)):
        raise ValueError(f"{folder.parent / 'trainer.json'}: its \"shards\" entry is not a description of shards")
    tensors = description["tensors"]
    if not folder.is_dir() or folder.is_symlink():
        raise ValueError(f"{folder} is missing")
    present = sorted(path.name for path in folder.iterdir())
    if present != sorted(map(str, description["files"])):
        missing = sorted(set(map(str, description["files"])) - set(present))
        raise ValueError(f"{folder}: " + (f"lacks {', '.join(missing[:3])}" if missing else
                                          f"holds files it did not write: {', '.join(sorted(set(present) - set(description['files']))[:3])}"))
    covered: dict[str, int] = {}
    for name in present:
        path = folder / name
        try:
            with safe_open(str(path), framework="pt") as handle:
                pieces = {key: (handle.get_slice(key).get_dtype(), handle.get_slice(key).get_shape())
                          for key in handle.keys()}
                offsets = json.loads((handle.metadata() or {}).get(_SHARDING_KEY, "{}"))
        except Exception as error:  # noqa: BLE001 - safetensors' own error type (truncated, garbage)
            raise ValueError(f"{path}: not a readable shard ({one_line(error)})") from None
        for key, (dtype, shape) in pieces.items():
            if key not in tensors:
                raise ValueError(f"{path}: holds {one_line(key, 80)!r}, which the checkpoint does not describe")
            full, want = tensors[key]
            offset = (offsets.get(key) or {}).get("saved_offsets", [0] * len(shape))
            if (str(_DTYPES.get(dtype, dtype)).removeprefix("torch.") != want or len(offset) != len(full)
                    or len(shape) != len(full) or any(o < 0 or o + s > f for o, s, f in zip(offset, shape, full))):
                raise ValueError(f"{path}: its piece of {key} ({dtype} {shape} at {offset}) does not fit the "
                                 f"described tensor ({want} {full})")
            covered[key] = covered.get(key, 0) + math.prod(shape)
    for key, (full, _) in tensors.items():
        if covered.get(key, 0) != math.prod(full):
            raise ValueError(f"{folder}: the shards hold {covered.get(key, 0)} of the {math.prod(full)} values of "
                             f"{key}")


def is_sharded(directory: Path) -> bool:
    """A sharded checkpoint (it has shards/ and no model.safetensors), complete or not."""
    return (directory / SHARDS).is_dir() and not (directory / "model.safetensors").exists()


def check_sharded_model(directory: Path, meta: nn.Module, state: dict[str, Any]) -> torch.dtype:
    """Check a sharded checkpoint from headers (``state`` is its trainer.json): the shards complete, their
    weights exactly the tensors of ``meta`` (the model its config.json builds, on the meta device: no
    memory), in one floating dtype, which is returned. A ``ValueError`` naming what is wrong otherwise."""
    description = state.get("shards")
    check_shards(directory / SHARDS, description)
    shapes = meta.state_dict()
    expected = {f"model/{name}": list(shapes[name].shape) for name in _first_names(meta)}
    saved = {key: value for key, value in description["tensors"].items() if key.startswith("model/")}
    if {key: shape for key, (shape, _) in saved.items()} != expected:
        different = sorted(set(saved) ^ set(expected)) or sorted(k for k in saved if saved[k][0] != expected[k])
        raise ValueError(f"{directory}: the shards do not match config.json (at {', '.join(different[:3])})")
    dtypes = {dtype for _, dtype in saved.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _FLOATING:
        raise ValueError(f"{directory}: weights must all have one floating dtype, got {sorted(dtypes)}")
    return _FLOATING[dtypes.pop()]


