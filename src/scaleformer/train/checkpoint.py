"""Training checkpoints: safetensors and JSON only (loading never unpickles), written atomically.

A checkpoint is a directory ``<run>/checkpoints/step_0000100/`` holding:
  config.json, model.safetensors   — loadable by ``scaleformer.load`` (and ``generate``/``eval``)
  tokenizer.json                   — the run's tokenizer
  optimizer.safetensors            — every optimizer state tensor, keyed ``state/<parameter name>/<name>``
  rng.safetensors                  — torch's CPU (and CUDA) RNG state of every rank (dropout), so a resumed
                                     run is bit-identical
  trainer.json                     — step, train config, optimizer hyper-parameters, corpus sha256

That is the *full* format, written by rank 0 from state gathered to it. The *sharded* format (the default
under FSDP2; see :mod:`scaleformer.train.sharded`) has ``shards/`` in place of model.safetensors and
optimizer.safetensors, written by every rank, and trainer.json describes the shards. Both load on any number
of processes; ``scaleformer.load`` reads both, and ``scaleformer export`` turns either into a plain model
directory.

How a kill at any moment loses nothing (see :mod:`scaleformer.durable`):
* a checkpoint is written complete into a hidden temporary directory, fsync'ed, and then put in place in
  one step — renamed, or atomically exchanged with an earlier save of the same step, so the directory that
  ``latest`` names is never deleted before its replacement is complete;
* ``<run>/checkpoints/latest`` (a file holding a name like ``step_0000100``) is replaced atomically after
  that, and only then are older checkpoints pruned (never ones of later steps);
* readers (:func:`checkpoint_candidates`) take the newest complete ``step_*`` directory inside the run
  (``latest`` is resolved only to one of those), check a checkpoint is complete before trusting it, and
  otherwise fall back to the newest complete one, saying so. A run directory holding checkpoints never silently restarts from scratch.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from scaleformer import durable
from scaleformer.build import check_weights, meta_model, read_config, write_model_files
from scaleformer.files import one_line
from scaleformer.build import load as load_model_dir
from scaleformer.train.state import trainer_state
from scaleformer.train.sharded import (SHARDS, check_sharded_model, describe, is_distributed, is_sharded, local_state,
                                      read_shards, write_shards)

__all__ = ["save_checkpoint", "save_sharded_checkpoint", "export_model", "full_state", "load_training_state", "latest_checkpoint",
           "resolve_checkpoint", "checkpoint_candidates", "incomplete_reason", "trainer_state", "note", "CheckpointError", "DamagedCheckpoint"]

FILES = ("config.json", "tokenizer.json", "rng.safetensors", "trainer.json")  # in both formats
FULL_FILES = ("model.safetensors", "optimizer.safetensors")  # the full format's (the sharded one has shards/)
_NAME = re.compile(r"^step_(\d{7,})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (damaged, incomplete, from another setup); the message says which."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files are damaged (an earlier complete one can be used instead)."""


_FULL = None  # StateDictOptions, created lazily (torch.distributed.checkpoint imports are heavy)


def _options():
    global _FULL
    if _FULL is None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        _FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return _FULL


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """Unsharded model and optimizer state dicts (optimizer state keyed by parameter name), on CPU.

    Works for a plain, DDP-wrapped or FSDP2-sharded model; under FSDP2 it is a collective that every rank
    must call, and only rank 0 receives the tensors.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return get_model_state_dict(model, options=_options()), get_optimizer_state_dict(model, optimizer,
                                                                                      options=_options())


def _split(optimizer_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """{"state": {name: {key: value}}, "param_groups": [...]} -> its tensors (keyed ``state/<name>/<key>``, as
    they are: whole, or a rank's DTensor shards) + the JSON-able rest."""
    tensors, scalars = {}, {}
    for name, entries in optimizer_state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state/{name}/{key}"] = value
            else:
                scalars[f"{name}/{key}"] = value
    return tensors, {"param_groups": optimizer_state["param_groups"], "scalars": scalars}


def _join(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, name, entry = key.split("/", 2)
        state.setdefault(name, {})[entry] = value
    for key, value in meta["scalars"].items():
        name, entry = key.rsplit("/", 1)
        state.setdefault(name, {})[entry] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer_state: dict[str, Any], tokenizer,
                    extra_state: dict[str, Any], keep: int = 2, rng_states: list[torch.Tensor] | None = None,
                    cuda_rng_states: list[torch.Tensor] | None = None) -> Path:
    """Write a checkpoint (one process: rank 0). ``model`` is an unsharded model holding the weights to save;
    ``optimizer_state`` the full optimizer state (see :func:`full_state`); ``rng_states`` every rank's torch
    CPU RNG state (default: ours) and ``cuda_rng_states`` every rank's CUDA generator state (GPU runs)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    final = root / name
    tmp = durable.temporary_name(final)
    try:
        durable.fault_point("mkdir", tmp)
        tmp.mkdir()
        write_model_files(model, tmp)
        durable.fault_point("write", tmp / "tokenizer.json")
        tokenizer.save(tmp)
        tensors, meta = _split(optimizer_state)
        tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
        meta["tensors"] = _manifest(tensors)  # what optimizer.safetensors must hold, checked on every read
        durable.write_safetensors(save_file, tmp / "optimizer.safetensors", tensors)
        _write_rest(tmp, step, tokenizer, {**extra_state, "optimizer": meta}, rng_states, cuda_rng_states)
    except Exception:
        durable.remove_tree(tmp)
        raise
    _install(tmp, final, keep)
    return final


def save_sharded_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, tokenizer,
                            extra_state: dict[str, Any], keep: int = 2, rng_states: list[torch.Tensor] | None = None,
                            cuda_rng_states: list[torch.Tensor] | None = None) -> Path | None:
    """Write a sharded checkpoint: every rank calls this (a collective under torchrun), and each writes the
    model and optimizer state it holds, nothing gathered (see :mod:`scaleformer.train.sharded`). Rank 0 then
    writes the small files and puts the checkpoint in place, with the same guarantees as
    :func:`save_checkpoint`: the shards are written into the same hidden temporary directory (which must be
    on storage every rank sees), so a kill of any rank at any moment leaves the previous checkpoints as they
    were. Returns the checkpoint's path on rank 0, None on the others."""
    rank = dist.get_rank() if is_distributed() else 0
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:07d}"
    name = [None]
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        name = [str(durable.temporary_name(final))]
        durable.fault_point("mkdir", Path(name[0]))
        Path(name[0]).mkdir()
    if is_distributed():
        dist.broadcast_object_list(name, src=0)
    tmp = Path(name[0])
    try:
        _, optimizer_state, flat = local_state(model, optimizer)
        durable.fault_point("write", tmp / SHARDS)
        write_shards(tmp / SHARDS, flat)
        if rank == 0:
            durable.fault_point("write", tmp / "config.json")
            (tmp / "config.json").write_text(model.config.to_json())
            extra = {**extra_state, "optimizer": _split(optimizer_state)[1], "shards": describe(tmp / SHARDS, flat)}
            _write_rest(tmp, step, tokenizer, extra, rng_states, cuda_rng_states)
    except Exception:
        if rank == 0:
            durable.remove_tree(tmp)
        raise
    if rank != 0:
        return None
    _install(tmp, final, keep)
    return final


def _write_rest(tmp: Path, step: int, tokenizer, state: dict[str, Any], rng_states: list[torch.Tensor] | None,
                cuda_rng_states: list[torch.Tensor] | None) -> None:
    """The files both formats share (tokenizer, RNG states, trainer.json), then fsync the whole directory."""
    durable.fault_point("write", tmp / "tokenizer.json")
    tokenizer.save(tmp)
    states = {f"torch/{rank}": state for rank, state in enumerate(rng_states or [torch.get_rng_state()])}
    states.update({f"cuda/{rank}": state for rank, state in enumerate(cuda_rng_states or [])})
    durable.write_safetensors(save_file, tmp / "rng.safetensors", states)
    durable.fault_point("write", tmp / "trainer.json")
    (tmp / "trainer.json").write_text(json.dumps({**state, "step": step}, indent=1))
    durable.fsync_tree(tmp)


def _install(tmp: Path, final: Path, keep: int) -> None:
    """Put a complete checkpoint in place, point ``latest`` at it, then prune older ones."""
    root, step = final.parent, _step_of(final)
    durable.install_dir(tmp, final)  # atomic exchange when this step was saved before (a resumed run)
    durable.atomic_write_text(root / "latest", final.name)
    # Prune only older checkpoints: a later one can only be a damaged checkpoint this run fell back from,
    # which stays for the user to inspect until this run reaches its step and replaces it.
    older = sorted(path for path in _step_dirs(root) if _step_of(path) < step)
    for stale in older[:max(len(older) - (keep - 1), 0)]:
        durable.remove_tree(stale)


def _step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def _step_dirs(root: Path) -> list[Path]:
    """The run's ``step_*`` checkpoint directories (real directories inside it; links are ignored)."""
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if _NAME.match(p.name) and p.is_dir() and not p.is_symlink()]


def _pointer(root: Path) -> tuple[Path | None, str | None]:
    """What ``latest`` names, resolved only inside ``root``: (path, None) or (None, why it is unusable)."""
    pointer = root / "latest"
    if not pointer.exists() and not pointer.is_symlink():
        return None, None
    if pointer.is_symlink() or not pointer.is_file() or pointer.stat().st_size > 64:
        return None, f"{pointer} is not a small regular file"
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        return None, f"{pointer} is unreadable ({one_line(error)})"
    if not _NAME.match(name):
        return None, f"{pointer} names {one_line(name, 60)!r}, which is not a checkpoint of this run"
    return root / name, None


def incomplete_reason(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint (None when it is): every file present, trainer.json an
    object with a step, config.json a valid config whose weights' header matches it, the optimizer and
    RNG files readable safetensors. Reads headers only, not tensor data."""
    if path.is_symlink() or not path.is_dir():
        return f"{path} does not exist"
    sharded = is_sharded(path)
    missing = [name for name in FILES + (() if sharded else FULL_FILES) if not (path / name).is_file()]
    if missing:
        return f"{path} lacks {', '.join(missing)}"
    try:
        state = trainer_state(path)
        if state["step"] != _step_of(path):
            return f"{path}: trainer.json is for another step than its directory's"
        if sharded:
            check_sharded_model(path, meta_model(read_config(path / "config.json")), state)
        else:
            check_weights(path / "model.safetensors", read_config(path / "config.json"))
            _check_optimizer_header(path / "optimizer.safetensors", state["optimizer"].get("tensors"))
        _header(path / "rng.safetensors")
    except ValueError as error:
        return one_line(error, 300)
    except OSError as error:  # pruned or replaced by a writer while we read it: not complete as far as we saw
        return f"{path} changed while it was read ({one_line(error, 200)})"
    return None


def checkpoint_candidates(run_dir: Path, report: Callable[[str], None] | None = None) -> list[Path]:
    """The run's complete checkpoints, best first: newest first (each checked by :func:`incomplete_reason`).
    A kill after a checkpoint is installed but before ``latest`` is rewritten leaves ``latest`` naming an
    older one; the newer complete one is used, so no save interval is redone. ``report`` receives one line
    when the one ``latest`` names is not the one used. Raises :class:`CheckpointError` when the run holds
    checkpoints but none is complete: the caller must never restart from scratch then."""
    root = Path(run_dir) / "checkpoints"
    for _ in range(3):  # a writer may replace or prune checkpoints while we look: then look again
        listing = _listing(root)
        named, problem = _pointer(root)
        ordered = sorted(set(_step_dirs(root)) | ({named} if named is not None else set()), key=_step_of,
                         reverse=True)
        reasons = {path: incomplete_reason(path) for path in ordered}
        if _listing(root) == listing:
            break
    complete = [path for path, reason in reasons.items() if reason is None]
    passed_over = [problem] if problem else []
    for path in ordered:
        if reasons[path] is None:
            break
        passed_over.append(reasons[path] if path != named else f"checkpoints/latest names {path.name}: "
                                                                 f"{reasons[path]}")
    if not complete and passed_over:
        raise CheckpointError(f"{run_dir} holds checkpoints but none is complete ({one_line('; '.join(passed_over), 400)}); "
                              "it will not restart from scratch over them: move checkpoints/ away to start "
                              "again, or train into a new --out")
    if complete and named is not None and _step_of(complete[0]) > _step_of(named) and reasons[named] is None:
        passed_over.append(f"checkpoints/latest names {named.name}, but {complete[0].name} is newer and complete "
                           "(a run was stopped after saving it, before it rewrote latest)")
    if passed_over and report is not None:
        report(f"{one_line('; '.join(passed_over), 400)}: using {complete[0].name}, the newest complete checkpoint")
    return complete


def _listing(root: Path) -> tuple:
    try:
        pointer = (root / "latest").read_bytes() if (root / "latest").is_file() else None
    except OSError:
        pointer = None
    return pointer, tuple(sorted(p.name for p in _step_dirs(root)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a run continues from (see :func:`checkpoint_candidates`), or None for a new run."""
    return next(iter(checkpoint_candidates(run_dir)), None)


def note(line: str) -> None:
    """Tell the user, in one line on stderr, something they should know but that is not an error."""
    print(f"note: {line}", file=sys.stderr, flush=True)


def resolve_checkpoint(path: str | os.PathLike, report: Callable[[str], None] | None = note) -> Path:
    """A checkpoint directory, or a run directory (its newest complete checkpoint; when that is not the one
    ``latest`` names, ``report`` gets one line saying why, by default on stderr)."""
    path = Path(path)
    if (path / "model.safetensors").is_file() or is_sharded(path):
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint or run directory")
    latest = next(iter(checkpoint_candidates(path, report)), None)
    if latest is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint directory nor a run directory with checkpoints")
    return latest


def _corrupt(path: Path, error: BaseException | str) -> DamagedCheckpoint:
    return DamagedCheckpoint(f"{path}: the checkpoint is corrupt or incomplete ({one_line(error)}); remove it "
                           "(the run continues from the newest complete checkpoint before it) or train into a "
                           "new --out")


def _header(path: Path) -> None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            list(handle.keys())
    except Exception as error:  # noqa: BLE001 - safetensors' own error type
        raise ValueError(f"{path}: not a readable safetensors file ({one_line(error)})") from None


def _manifest(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    """key -> [shape, dtype]: the optimizer tensors a full checkpoint holds (the sharded format's
    ``describe`` records the same for its shards)."""
    return {key: [list(value.shape), str(value.dtype).removeprefix("torch.")] for key, value in tensors.items()}


_SAFETENSORS_DTYPES = {"F32": "float32", "F64": "float64", "BF16": "bfloat16", "F16": "float16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _check_optimizer_header(path: Path, manifest: Any) -> None:
    """optimizer.safetensors is readable and, where trainer.json records what it holds (checkpoints written
    since the manifest was added), holds exactly those tensors, in those shapes and dtypes. Header only."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = {key: [list(handle.get_slice(key).get_shape()),
                            _SAFETENSORS_DTYPES.get(handle.get_slice(key).get_dtype(), handle.get_slice(key).get_dtype())]
                      for key in handle.keys()}
    except Exception as error:  # noqa: BLE001 - safetensors' own error type
        raise ValueError(f"{path}: not a readable safetensors file ({one_line(error)})") from None
    if manifest is None:
        return
    if not isinstance(manifest, dict):
        raise ValueError(f"{path.parent / 'trainer.json'}: its optimizer \"tensors\" entry is not a manifest")
    missing, unexpected = sorted(set(manifest) - set(header)), sorted(set(header) - set(manifest))
    if missing or unexpected:
        raise ValueError(f"{path}: the optimizer state does not match trainer.json ("
                         + "; ".join(filter(None, [missing and f"missing {len(missing)} tensors, e.g. {missing[0]}",
                                                   unexpected and f"unexpected {unexpected[0]}"])) + ")")
    different = sorted(key for key in manifest if manifest[key] != header[key])
    if different:
        raise ValueError(f"{path}: {different[0]} is {header[different[0]]}, but trainer.json records "
                         f"{manifest[different[0]]}")


def _check_optimizer_state(path: Path, tensors: dict[str, torch.Tensor], model: nn.Module) -> None:
    """The optimizer tensors fit the model's parameters: each a per-parameter scalar (Adam's step) or a
    tensor of its parameter's shape and dtype (the moments), every parameter with state holding the same
    entries, all finite. Catches what a header cannot: a file from another model, or damaged values."""
    parameters = dict(model.named_parameters())
    entries: dict[str, set[str]] = {}
    for key, value in tensors.items():
        _, name, entry = key.split("/", 2) if key.count("/") >= 2 else (None, key, "")
        if name not in parameters or not entry:
            raise _corrupt(path, f"optimizer.safetensors holds {one_line(key, 80)!r}, which is no parameter's state")
        entries.setdefault(name, set()).add(entry)
        param = parameters[name]
        if value.dim() == 0:
            if not value.is_floating_point():
                raise _corrupt(path, f"optimizer.safetensors: {key} is {value.dtype}, not a floating scalar")
        elif tuple(value.shape) != tuple(param.shape) or value.dtype != param.dtype:
            raise _corrupt(path, f"optimizer.safetensors: {key} is {value.dtype} {list(value.shape)}, but its parameter "
                                 f"is {param.dtype} {list(param.shape)}")
    kinds = {frozenset(found) for found in entries.values()}
    if len(kinds) > 1:
        raise _corrupt(path, "optimizer.safetensors: its parameters hold different state entries "
                             f"({', '.join(sorted('+'.join(sorted(k)) for k in kinds))}); entries are missing")
    if not all_finite(tensors.values()):
        raise _corrupt(path, "optimizer.safetensors holds NaN or infinite values")


def _load_full_weights(path: Path, model: nn.Module) -> None:
    """A full checkpoint's weights into the model (plain, or already sharded by FSDP2: each rank keeps its
    shard). The trainer keeps float32 weights, so a checkpoint in any other dtype is refused, not cast."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    try:
        loaded = load_model_dir(path)
    except (OSError, ValueError) as error:
        raise _corrupt(path, error) from None
    dtypes = {t.dtype for t in loaded.state_dict().values()}
    if dtypes != {torch.float32}:
        raise CheckpointError(f"{path}: the weights are {', '.join(sorted(map(str, dtypes)))}, but training keeps "
                              "float32 weights; this checkpoint was not written by scaleformer train")
    try:
        set_model_state_dict(model, loaded.state_dict(), options=StateDictOptions(full_state_dict=True))
    except (RuntimeError, KeyError, ValueError) as error:
        raise CheckpointError(f"{path}: the checkpoint's weights do not fit this model ({one_line(error)}); resume "
                              "with the same --model and options, or start a new --out") from None


def _load_shards(path: Path, state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A sharded checkpoint's weights and optimizer state: each rank reads the slices it holds."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    saved = {key for key in state["shards"]["tensors"] if key.startswith("model/")}
    weights, optimizer_state, flat = local_state(model, optimizer)
    if {key for key in flat if key.startswith("model/")} != saved:
        raise CheckpointError(f"{path}: the checkpoint's weights do not fit this model (other tensor names); resume "
                              "with the same --model and options, or start a new --out")
    read_shards(path / SHARDS, flat)
    if not all_finite(flat.values()):
        raise _corrupt(path, "its weights or optimizer state hold NaN or infinite values")
    set_model_state_dict(model, weights)
    meta = state["optimizer"]
    for key, value in meta["scalars"].items():
        name, entry = key.rsplit("/", 1)
        optimizer_state["state"].setdefault(name, {})[entry] = value
    set_optimizer_state_dict(model, optimizer, {"state": optimizer_state["state"], "param_groups": meta["param_groups"]})


def all_finite(tensors) -> bool:
    """Every rank's answer: are all values finite on every rank (DTensors: their local shards)?"""
    finite = all(bool(torch.isfinite(t.to_local() if hasattr(t, "to_local") else t).all())
                 for t in tensors if t.is_floating_point())
    if is_distributed():
        flag = torch.tensor([float(finite)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = bool(flag.item())
    return finite


def load_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0,
                        world: int = 1, seed: int = 0, device: torch.device | None = None) -> dict[str, Any]:
    """Restore a checkpoint of either format into a model (plain, DDP's module, or FSDP2-sharded) and its
    optimizer, and this rank's RNGs; return the trainer state. On the number of processes that saved it each
    rank gets its own saved RNG state back (a bit-identical resume); on another number, the batches and the
    loss curve continue the same, and each rank's RNG (dropout) restarts from (seed, step, rank), noted in
    the state as ``"rng_restarted"``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    try:
        state = trainer_state(path)
        if "shards" in state:
            _load_shards(path, state, model, optimizer)
        else:
            _load_full_weights(path, model)
            _check_optimizer_header(path / "optimizer.safetensors", state["optimizer"].get("tensors"))
            tensors = load_file(str(path / "optimizer.safetensors"))
            _check_optimizer_state(path, tensors, model)
            saved = _join(tensors, state["optimizer"])
            set_optimizer_state_dict(model, optimizer, optim_state_dict=saved,
                                     options=StateDictOptions(full_state_dict=True))
        states = load_file(str(path / "rng.safetensors"))
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError, AssertionError) as error:
        raise _corrupt(path, error) from None
    except Exception as error:  # noqa: BLE001 - safetensors' and DCP's own error types
        if type(error).__name__ not in ("SafetensorError", "CheckpointException"):
            raise
        raise _corrupt(path, error) from None
    saved_by = sum(key.startswith("torch/") for key in states)
    try:
        if saved_by == world and f"torch/{rank}" in states:
            torch.set_rng_state(states[f"torch/{rank}"])
            if device is not None and device.type == "cuda" and f"cuda/{rank}" in states:
                torch.cuda.set_rng_state(states[f"cuda/{rank}"], device)
        else:
            stream = int(np.random.SeedSequence([seed, state["step"], rank]).generate_state(1)[0])
            torch.manual_seed(stream)
            if device is not None and device.type == "cuda":
                torch.cuda.manual_seed(stream)
            state = {**state, "rng_restarted": saved_by}
    except (RuntimeError, TypeError) as error:
        raise _corrupt(path, f"rng.safetensors: {one_line(error)}") from None
    return state


def export_model(source: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write a checkpoint of either format (or a run directory's newest) as a plain model directory:
    config.json, one model.safetensors (optionally cast to ``dtype``) and the tokenizer, for
    ``scaleformer.load``, ``generate`` and ``export-hf``. The directory is built complete beside ``out`` and
    put in place in one step; an existing ``out`` is replaced only when it holds a model directory."""
    path = resolve_checkpoint(source)
    out = durable.check_output_dir(out, "export", path)
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise ValueError(f"{out} holds other files; export into a new or empty directory (an earlier export is "
                         "replaced)")
    model = load_model_dir(path)
    if dtype is not None:
        model = model.to(dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = durable.temporary_name(out)
    try:
        tmp.mkdir()
        write_model_files(model, tmp)
        if (path / "tokenizer.json").is_file():
            durable.fault_point("write", tmp / "tokenizer.json")
            (tmp / "tokenizer.json").write_bytes((path / "tokenizer.json").read_bytes())
        durable.fsync_tree(tmp)
    except Exception:
        durable.remove_tree(tmp)
        raise
    durable.install_dir(tmp, out)
    return out
