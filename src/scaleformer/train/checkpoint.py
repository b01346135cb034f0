"""Training checkpoints: safetensors and JSON only (loading never unpickles), written atomically.

A checkpoint is a directory ``<run>/checkpoints/step_0000100/`` holding:
  config.json, model.safetensors   — loadable by ``scaleformer.load`` (and ``generate``/``eval``)
  tokenizer.json                   — the run's tokenizer
  optimizer.safetensors            — every optimizer state tensor, keyed ``state/<param index>/<name>``
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

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "resolve_checkpoint"]


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state/{index}/{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}/{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split("/", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, tokenizer,
                    trainer_state: dict[str, Any], keep: int = 2,
                    rng_states: list[torch.Tensor] | None = None) -> Path:
    """Write a checkpoint (one process: rank 0). ``rng_states``: every rank's torch RNG state (default: ours)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model_dir(model, tmp)
    tokenizer.save(tmp)
    tensors, meta = _optimizer_tensors(optimizer)
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


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG in place; return the trainer state (step, ...)."""
    state = json.loads((path / "trainer.json").read_text())
    loaded = load_model_dir(path)
    try:
        model.load_state_dict(loaded.state_dict())
    except RuntimeError as error:
        raise ValueError(f"{path}: the checkpoint's weights do not fit this model ({str(error).splitlines()[0]}); "
                         "resume with the same --model and options, or start a new --out") from None
    _restore_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    states = load_file(str(path / "rng.safetensors"))
    if f"torch/{rank}" not in states:
        raise ValueError(f"{path}: saved by {len(states)} process(es), cannot resume rank {rank}; resume with the "
                         "same number of processes")
    torch.set_rng_state(states[f"torch/{rank}"])
    return state
