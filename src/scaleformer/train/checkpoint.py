"""Training checkpoints: safetensors and JSON only (loading never unpickles), written atomically.

A checkpoint is a directory ``<run>/checkpoints/step_0000100/`` holding:
  config.json, model.safetensors   — loadable by ``scaleformer.load`` (and ``generate``/``eval``)
  tokenizer.json                   — the run's tokenizer
  optimizer.safetensors            — every optimizer state tensor, keyed ``state/<parameter name>/<name>``
  rng.safetensors                  — torch's CPU (and CUDA) RNG state of every rank (dropout), so a resumed
                                     run is bit-identical
  trainer.json                     — step, train config, optimizer hyper-parameters, corpus sha256

How a kill at any moment loses nothing (see :mod:`scaleformer.durable`):
* a checkpoint is written complete into a hidden temporary directory, fsync'ed, and then put in place in
  one step — renamed, or atomically exchanged with an earlier save of the same step, so the directory that
  ``latest`` names is never deleted before its replacement is complete;
* ``<run>/checkpoints/latest`` (a file holding a name like ``step_0000100``) is replaced atomically after
  that, and only then are older checkpoints pruned (never ones of later steps);
* readers (:func:`checkpoint_candidates`) resolve ``latest`` only to a ``step_*`` directory inside the run,
  check a checkpoint is complete before trusting it, and otherwise fall back to the newest complete one,
  saying so. A run directory holding checkpoints never silently restarts from scratch.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from scaleformer import durable
from scaleformer.build import check_weights, read_config, write_model_files
from scaleformer.files import one_line, read_json_object
from scaleformer.build import load as load_model_dir

__all__ = ["save_checkpoint", "full_state", "load_weights", "load_training_state", "latest_checkpoint",
           "resolve_checkpoint", "checkpoint_candidates", "incomplete_reason", "trainer_state", "note", "CheckpointError", "DamagedCheckpoint"]

FILES = ("config.json", "model.safetensors", "tokenizer.json", "optimizer.safetensors", "rng.safetensors",
         "trainer.json")
_NAME = re.compile(r"^step_(\d{7,})$")
MAX_TRAINER_JSON_BYTES = 16 << 20


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
    """{"state": {name: {key: value}}, "param_groups": [...]} -> safetensors entries + JSON-able rest."""
    tensors, scalars = {}, {}
    for name, entries in optimizer_state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state/{name}/{key}"] = value.detach().cpu().contiguous()
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
        durable.write_safetensors(save_file, tmp / "optimizer.safetensors", tensors)
        states = {f"torch/{rank}": state for rank, state in enumerate(rng_states or [torch.get_rng_state()])}
        states.update({f"cuda/{rank}": state for rank, state in enumerate(cuda_rng_states or [])})
        durable.write_safetensors(save_file, tmp / "rng.safetensors", states)
        durable.fault_point("write", tmp / "trainer.json")
        (tmp / "trainer.json").write_text(json.dumps({**extra_state, "step": step, "optimizer": meta}, indent=1))
        durable.fsync_tree(tmp)
    except Exception:
        durable.remove_tree(tmp)
        raise
    durable.install_dir(tmp, final)  # atomic exchange when this step was saved before (a resumed run)
    durable.atomic_write_text(root / "latest", name)
    # Prune only older checkpoints: a later one can only be a damaged checkpoint this run fell back from,
    # which stays for the user to inspect until this run reaches its step and replaces it.
    older = sorted(path for path in _step_dirs(root) if _step_of(path) < step)
    for stale in older[:max(len(older) - (keep - 1), 0)]:
        durable.remove_tree(stale)
    return final


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
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        return f"{path} lacks {', '.join(missing)}"
    try:
        if trainer_state(path)["step"] != _step_of(path):
            return f"{path}: trainer.json is for another step than its directory's"
        check_weights(path / "model.safetensors", read_config(path / "config.json"))
        for name in ("optimizer.safetensors", "rng.safetensors"):
            _header(path / name)
    except ValueError as error:
        return one_line(error, 300)
    except OSError as error:  # pruned or replaced by a writer while we read it: not complete as far as we saw
        return f"{path} changed while it was read ({one_line(error, 200)})"
    return None


def checkpoint_candidates(run_dir: Path, report: Callable[[str], None] | None = None) -> list[Path]:
    """The run's complete checkpoints, best first: the one ``latest`` names, then the others, newest first
    (each checked by :func:`incomplete_reason`). ``report`` receives one line when the best one is passed
    over. Raises :class:`CheckpointError` when the run holds checkpoints but none is complete: the caller
    must never restart from scratch then."""
    root = Path(run_dir) / "checkpoints"
    for _ in range(3):  # a writer may replace or prune checkpoints while we look: then look again
        listing = _listing(root)
        named, problem = _pointer(root)
        ordered = ([named] if named is not None else []) + sorted(
            (p for p in _step_dirs(root) if p != named), key=_step_of, reverse=True)
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
    if passed_over and report is not None:
        report(f"{one_line('; '.join(passed_over), 400)}: using {complete[0].name}, the newest complete checkpoint")
    return complete


def _listing(root: Path) -> tuple:
    try:
        pointer = (root / "latest").read_text() if (root / "latest").is_file() else None
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
    if (path / "model.safetensors").is_file():
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


def trainer_state(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer.json, checked (a ``ValueError`` naming the file when it is damaged)."""
    file = path / "trainer.json"
    state = read_json_object(file, "the trainer state", MAX_TRAINER_JSON_BYTES)
    if not (isinstance(state.get("step"), int) and state["step"] >= 0 and isinstance(state.get("train"), dict)
            and isinstance(state.get("optimizer"), dict)):
        raise ValueError(f"{file}: not a trainer state (an object with step, train and optimizer)")
    return state


def load_weights(path: Path, model: nn.Module) -> None:
    """Load a checkpoint's weights into an unsharded model (before any sharding). The trainer keeps float32
    weights, so a checkpoint in any other dtype is refused rather than cast."""
    try:
        loaded = load_model_dir(path)
    except (OSError, ValueError) as error:
        raise _corrupt(path, error) from None
    dtypes = {t.dtype for t in loaded.state_dict().values()}
    if dtypes != {torch.float32}:
        raise CheckpointError(f"{path}: the weights are {', '.join(sorted(map(str, dtypes)))}, but training keeps "
                              "float32 weights; this checkpoint was not written by scaleformer train")
    try:
        model.load_state_dict(loaded.state_dict())
    except RuntimeError as error:
        raise CheckpointError(f"{path}: the checkpoint's weights do not fit this model ({one_line(error)}); resume "
                              "with the same --model and options, or start a new --out") from None


def load_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0,
                        device: torch.device | None = None) -> dict[str, Any]:
    """Restore the optimizer (plain, DDP or FSDP2 model) and this rank's RNGs; return the trainer state."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    try:
        state = trainer_state(path)
        saved = _join(load_file(str(path / "optimizer.safetensors")), state["optimizer"])
        set_optimizer_state_dict(model, optimizer, optim_state_dict=saved, options=_options())
        states = load_file(str(path / "rng.safetensors"))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError) as error:
        raise _corrupt(path, error) from None
    except Exception as error:  # noqa: BLE001 - safetensors' own error type
        if type(error).__name__ != "SafetensorError":
            raise
        raise _corrupt(path, error) from None
    if f"torch/{rank}" not in states:
        raise CheckpointError(f"{path}: saved by {sum(k.startswith('torch/') for k in states)} process(es), cannot "
                              f"resume rank {rank}; resume with the same number of processes")
    try:
        torch.set_rng_state(states[f"torch/{rank}"])
        if device is not None and device.type == "cuda" and f"cuda/{rank}" in states:
            torch.cuda.set_rng_state(states[f"cuda/{rank}"], device)
    except (RuntimeError, TypeError) as error:
        raise _corrupt(path, f"rng.safetensors: {one_line(error)}") from None
    return state
