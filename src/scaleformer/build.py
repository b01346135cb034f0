"""``build(config)`` -> model, and safetensors checkpoints (``save`` / ``load``)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from scaleformer.config import ConfigBase, RetNetConfig, TransformerConfig, config_from_dict
from scaleformer.models.retnet import RetNet
from scaleformer.models.transformer import Decoder, Encoder, EncoderDecoder

__all__ = ["build", "save", "load"]

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def build(config: ConfigBase) -> nn.Module:
    """The model a config describes, freshly initialised."""
    if isinstance(config, TransformerConfig):
        return {"encoder": Encoder, "decoder": Decoder, "encoder_decoder": EncoderDecoder}[config.arch](config)
    if isinstance(config, RetNetConfig):
        return RetNet(config)
    raise TypeError(f"no model is registered for {type(config).__name__}")


def save(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed).

    Each file is written to a temporary name and renamed into place, so an interrupted save never
    leaves a truncated checkpoint where a good one was.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, ConfigBase):
        raise TypeError("save() expects a scaleformer model (with a .config)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / CONFIG_FILE, lambda path: Path(path).write_text(config.to_json()))
    _atomic_write(directory / WEIGHTS_FILE, lambda path: save_model(model, path))
    return directory


def load(directory: str | os.PathLike, *, map_location: str | torch.device = "cpu", **overrides: Any) -> nn.Module:
    """Rebuild a saved model. ``overrides`` change inference-time options (e.g. blockwise_causal_block)."""
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found: not a scaleformer checkpoint directory")
    config = config_from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    if overrides:
        config = config.replace(**overrides)
    model = build(config)
    missing, unexpected = load_model(model, directory / WEIGHTS_FILE, strict=True, device=str(map_location))
    assert not missing and not unexpected  # strict=True raises first
    return model


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
