"""Training checkpoints: safetensors and JSON only (loading never unpickles), written atomically.

A checkpoint is a directory ``<run>/checkpoints/step_0000100/`` holding:
  config.json, model.safetensors   — loadable by ``scaleformer.load`` (and ``generate``/``eval``)
  tokenizer.json                   — the run's tokenizer
  optimizer.safetensors            — every optimizer state tensor, keyed ``state/<parameter name>/<name>``
  rng.safetensors                  — torch's RNG state of every rank (dropout), so a resumed run is bit-identical
  trainer.json                     — step, train config, optimizer hyper-parameters, corpus sha256
It is written into a temporary directory and renamed into place; ``<run>/checkpoints/latest`` names the
newest complete one and is itself replaced atomically. A kill at any moment leaves the previous checkpoint
intact and ``latest`` pointing at a complete directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from scaleformer.build import load as load_model_dir
from scaleformer.build import save as save_model_dir

__all__ = ["save_checkpoint", "full_state", "load_weights", "load_training_state", "latest_checkpoint",
           "resolve_checkpoint"]


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
                    trainer_state: dict[str, Any], keep: int = 2,
                    rng_states: list[torch.Tensor] | None = None) -> Path:
    """Write a checkpoint (one process: rank 0). ``model`` is an unsharded model holding the weights to save;
    ``optimizer_state`` the full optimizer state (see :func:`full_state`); ``rng_states`` every
    rank's torch RNG state (default: ours)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model_dir(model, tmp)
    tokenizer.save(tmp)
    tensors, meta = _split(optimizer_state)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    states = rng_states if rng_states is not None else [torch.get_rng_state()]
    save_file({f"torch/{rank}": state for rank, state in enumerate(states)}, str(tmp / "rng.safetensors"))
    (tmp / "trainer.json").write_text(json.dumps({**trainer_state, "step": step, "optimizer": meta}, indent=1))
    final = root / name
    if final.exists():  # an earlier save of the same step (a resumed run): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / f".latest-{os.getpid()}"
    pointer.write_text(name)
    os.replace(pointer, root / "latest")
    old = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name != name)
    for stale in old[:max(len(old) - (keep - 1), 0)]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "trainer.json").is_file() else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run directory (its latest checkpoint)."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint directory nor a run directory with checkpoints")
    return latest


def _corrupt(path: Path, error: Exception) -> ValueError:
    return ValueError(f"{path}: the checkpoint is corrupt or incomplete ({type(error).__name__}: "
                      f"{str(error).splitlines()[0] if str(error) else ''}); remove it (the previous one stays "
                      "usable) or train into a new --out")


def load_weights(path: Path, model: nn.Module) -> None:
    """Load a checkpoint's weights into an unsharded model (before any sharding)."""
    try:
        loaded = load_model_dir(path)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise _corrupt(path, error) from None
    except Exception as error:  # safetensors' own error type
        if type(error).__name__ != "SafetensorError":
            raise
        raise _corrupt(path, error) from None
    try:
        model.load_state_dict(loaded.state_dict())
    except RuntimeError as error:
        raise ValueError(f"{path}: the checkpoint's weights do not fit this model ({str(error).splitlines()[0]}); "
                         "resume with the same --model and options, or start a new --out") from None


def load_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0) -> dict[str, Any]:
    """Restore the optimizer (plain, DDP or FSDP2 model) and this rank's RNG; return the trainer state."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    try:
        state = json.loads((path / "trainer.json").read_text())
        saved = _join(load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    except (OSError, ValueError, KeyError) as error:
        raise _corrupt(path, error) from None
    except Exception as error:
        if type(error).__name__ != "SafetensorError":
            raise
        raise _corrupt(path, error) from None
    set_optimizer_state_dict(model, optimizer, optim_state_dict=saved, options=_options())
    states = load_file(str(path / "rng.safetensors"))
    if f"torch/{rank}" not in states:
        raise ValueError(f"{path}: saved by {len(states)} process(es), cannot resume rank {rank}; resume with the "
                         "same number of processes")
    torch.set_rng_state(states[f"torch/{rank}"])
    return state
