"""``build(config)`` -> model, and safetensors checkpoints (``save`` / ``load``)."""

from __future__ import annotations

import collections
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from scaleformer import durable
from scaleformer.files import one_line, read_json_object
from scaleformer.config import ConfigBase, ConfigError, RetNetConfig, TransformerConfig, YOCOConfig, config_from_dict
from scaleformer.models.architecture import EncoderDecoderConfig, ModelConfig
from scaleformer.models.base import tensor_names
from scaleformer.models.families import MAX_LAYERS, with_options
from scaleformer.models.beit3 import BEiT3Config, build_beit3
from scaleformer.models.longvit import LongViT, LongViTConfig
from scaleformer.models.retnet import RetNet
from scaleformer.models.transformer import Decoder, Encoder, EncoderDecoder
from scaleformer.models.yoco import YOCO
from scaleformer.train.sharded import SHARDS, check_sharded_model, local_state, read_shards
from scaleformer.train.state import trainer_state

__all__ = ["build", "save", "load", "read_config", "require_language_model", "check_weights", "migrate_names", "load_weights",
           "check_size", "declared_depths"]

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
# The layout of parameter names and config fields, in the weights' metadata. Files without it were written
# before it existed and have format 1. A change of layout bumps it and adds a migration from the old one.
FORMAT_KEY, FORMAT = "scaleformer_format", 2

# Parameter renames from each format to the next, applied in order to every name of an older file.
# 1 -> 2: one Block serves every family, so its token mixer is `mixer` (was `self_attn` or `retention`);
# Multiway is an opt-in wrapper, so a model with one way has no `ways.0` level (format 1 wrapped the FFN and
# block norms of every Transformer in it). Config fields added since format 1 all have defaults.
def _single_way(config: ConfigBase) -> bool:
    return getattr(config, "multiway", 1) == 1


def _retnet(config: ConfigBase) -> bool:
    return isinstance(config, RetNetConfig)


MIGRATIONS: dict[int, list[tuple[str, str, Any]]] = {  # (pattern, replacement, applies to this config?)
    1: [(r"\.self_attn\.", ".mixer.", None), (r"\.self_attn_norm\.", ".mixer_norm.", None),
        (r"\.retention\.", ".mixer.", None), (r"\.retention_norm\.", ".mixer_norm.", None),
        (r"\.ways\.0\.", ".", _single_way),
        # RetNet is a Decoder: its stack is `decoder`, like every decoder's
        (r"^\.(blocks|final_norm|embedding_norm)\.", r".decoder.\1.", _retnet)],
}


def build(config: ConfigBase) -> nn.Module:
    """The model a config describes, freshly initialised."""
    if isinstance(config, TransformerConfig):
        return {"encoder": Encoder, "decoder": Decoder, "encoder_decoder": EncoderDecoder}[config.arch](config)
    if isinstance(config, RetNetConfig):
        return RetNet(config)
    if isinstance(config, YOCOConfig):
        return YOCO(config)
    if isinstance(config, BEiT3Config):
        return build_beit3(config)
    if isinstance(config, LongViTConfig):
        return LongViT(config)
    if isinstance(config, EncoderDecoderConfig):
        return EncoderDecoder(config)
    if isinstance(config, ModelConfig):
        if config.cross_attention:
            raise ConfigError("layers with cross_attention read an encoder's output: they are the decoder side of an "
                              "encoder-decoder (EncoderDecoderConfig), not a model of their own")
        return Decoder(config) if config.causal else Encoder(config)
    raise TypeError(f"no model is registered for {type(config).__name__}")


def declared_depths(config: ConfigBase) -> dict[str, int]:
    """Every layer count a config declares, by its path: a flat config's ``layers`` (a number), a model
    config's layer list, an encoder-decoder's two (``encoder.layers``, ``decoder.layers``)."""
    def walk(data: dict[str, Any], prefix: str) -> dict[str, int]:
        found = {}
        for name, value in data.items():
            if isinstance(value, dict):
                found.update(walk(value, f"{prefix}{name}."))
            elif name.endswith("layers") and isinstance(value, (int, list)) and not isinstance(value, bool):
                found[prefix + name] = len(value) if isinstance(value, list) else value
        return found
    return walk(config.to_dict(), "")


def check_size(config: ConfigBase, device: torch.device, bytes_per_parameter: int = 16, what: str = "training") -> int:
    """Bound a model's size before it is built: at most :data:`MAX_LAYERS` layers, then its parameters
    (counted on the meta device, no memory) times ``bytes_per_parameter`` (16 for training in float32:
    weights, gradients and Adam's two moments) must fit the memory ``device`` has free. One ``ValueError``
    otherwise, instead of an allocator traceback or a build that never ends. Returns the parameter count."""
    for name, value in declared_depths(config).items():
        if value > MAX_LAYERS:
            raise ValueError(f"{name}={value} is more than {MAX_LAYERS} layers; no model of this library is that deep")
    with torch.device("meta"):
        model = build(config)
    parameters = sum(t.numel() for t in {id(t): t for t in model.parameters()}.values())
    needed, free = parameters * bytes_per_parameter, _free_memory(device)
    if free is not None and needed > free:
        raise ValueError(f"the model has {parameters:,} parameters: {what} needs about {needed / 2**30:,.1f} GiB, but "
                         f"{device} has {free / 2**30:,.1f} GiB free; choose a smaller model (vocab_size, embed_dim, "
                         "layers)")
    return parameters


def _free_memory(device: torch.device) -> int | None:
    """Bytes ``device`` can still allocate: CUDA's free memory, or Linux's MemAvailable (None elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def save(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed), as one unit.

    The pair is written complete, fsync'ed, into a new sibling directory that then replaces ``directory``
    in one atomic exchange (see :mod:`scaleformer.durable`), so a kill or a full disk at any moment leaves
    either the previous pair or the new one — never a new config beside old weights. Other files already
    in ``directory`` (a tokenizer, notes) are carried over.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, ConfigBase):
        raise TypeError("save() expects a scaleformer model (with a .config)")
    directory = durable.check_output_dir(directory, "save")  # "ckpt/." and links: the directory they name
    if directory == Path.cwd() or directory in Path.cwd().parents:
        raise ValueError(f"{directory} is (or holds) the current directory, which a save replaces whole; save "
                         "into a subdirectory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    durable.remove_leftovers(directory.parent, prefix=f".{directory.name}.", only_dead=True)
    new = durable.temporary_name(directory)
    try:
        if directory.is_dir():  # keep the directory's other files: hard links, so nothing is copied
            shutil.copytree(directory, new, symlinks=True, copy_function=_link_or_copy,
                            ignore=lambda folder, names: (CONFIG_FILE, WEIGHTS_FILE) if Path(folder) == directory else ())
        else:
            new.mkdir()
        write_model_files(model, new)
        durable.fsync_tree(new)
    except Exception:
        shutil.rmtree(new, ignore_errors=True)
        raise
    durable.install_dir(new, directory)
    return directory


def write_model_files(model: nn.Module, directory: Path) -> None:
    """config.json and model.safetensors into a directory being built (not yet visible to readers)."""
    durable.fault_point("write", directory / CONFIG_FILE)
    (directory / CONFIG_FILE).write_text(model.config.to_json())
    # Each tensor once, under its first name in the model's own order (a tied embedding has several names):
    # the same bytes for the same weights, whichever save wrote them.
    weights = {names[0]: model.state_dict()[names[0]].detach().contiguous() for names in tensor_names(model).values()}
    durable.write_safetensors(save_file, directory / WEIGHTS_FILE, weights, {FORMAT_KEY: str(FORMAT)})


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def load(directory: str | os.PathLike, *, map_location: str | torch.device = "cpu", **overrides: Any) -> nn.Module:
    """Rebuild a saved model, in the floating dtype its weights were saved in. ``overrides`` change
    inference-time options: paths into its model config (LeX's blockwise causal attention:
    ``sf.load(path, **{"layers[*].mixer.block": 512})``), or for an older flat config its own fields too
    (``blockwise_causal_block=512``); see :func:`~scaleformer.models.families.with_options`.

    Everything is checked before anything large is allocated: the config must be a JSON object of a known
    config; the weights' header must list exactly the tensors that config builds, with the same shapes and
    one floating dtype. Then the weights are read and must be finite. Each failure is a ``ValueError``
    (``FileNotFoundError`` for missing files) naming the file and what is wrong. A sharded training checkpoint
    (``scaleformer train --checkpoint sharded``) loads too, its shards checked the same way first.
    """
    directory = Path(directory)
    sharded = not (directory / WEIGHTS_FILE).exists() and (directory / "shards").is_dir()
    for name in (CONFIG_FILE,) if sharded else (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found: not a scaleformer checkpoint directory")
    config = read_config(directory / CONFIG_FILE)
    if overrides:
        config = with_options(config, overrides)
    if sharded:  # a training checkpoint written by every rank (see scaleformer.train.sharded)
        model = _load_sharded(directory, config, map_location)
        model.eos_token_id = _eos_token_id(directory)
        return check_finite(model, directory / "shards")
    dtype = check_weights(directory / WEIGHTS_FILE, config)
    model = build(config).to(dtype)
    try:
        stored = load_file(directory / WEIGHTS_FILE, device=str(map_location))
        written = _format_of(directory / WEIGHTS_FILE)
    except Exception as error:  # noqa: BLE001 - safetensors' own error type, or I/O
        raise ValueError(f"{directory / WEIGHTS_FILE}: unreadable weights ({one_line(error)})") from None
    load_weights(model, stored, written)
    model.eos_token_id = _eos_token_id(directory)
    return check_finite(model, directory / WEIGHTS_FILE)


def _eos_token_id(directory: Path) -> int | None:
    """The end-of-sequence id of a checkpoint's byte or BPE tokenizer (where ``generate`` stops by default);
    None without one, or for pre-tokenized ids, whose last id is an ordinary token as often as not."""
    from scaleformer.data.tokenizer import IdTokenizer, load_tokenizer

    if not (directory / "tokenizer.json").is_file():
        return None
    try:
        tokenizer = load_tokenizer(directory)
    except (OSError, ValueError, ImportError):  # a damaged tokenizer is reported where it is used
        return None
    return None if isinstance(tokenizer, IdTokenizer) else tokenizer.eos_id


def check_finite(model: nn.Module, source: Path) -> nn.Module:
    for name, tensor in model.state_dict().items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{source}: tensor {name} holds NaN or infinite values; the checkpoint is damaged "
                             "(resume from an earlier one)")
    return model


MAX_CONFIG_BYTES = 1 << 20  # a config is a few kB; anything larger is not one


def require_language_model(config: ConfigBase, command: str) -> None:
    """One clear line when ``command`` (text generation, perplexity, Hugging Face export) meets a model that
    is not a language model (BEiT-3, LongViT)."""
    if not isinstance(config, (TransformerConfig, RetNetConfig, YOCOConfig, ModelConfig, EncoderDecoderConfig)):
        raise ValueError(f"{command} works on language models; this checkpoint holds a {type(config).__name__} "
                         f"(family `{config.family}`): load it with scaleformer.load")


def read_config(path: Path, saved: bool = True) -> ConfigBase:
    """The config of a ``config.json``, or a one-line ``ValueError`` saying what is wrong with the file.
    ``saved``: a saved model's (read as :func:`config_from_dict` reads saved configs); False for a config a
    user wrote, which is held to every rule."""
    data = read_json_object(path, "a config", MAX_CONFIG_BYTES)
    try:
        return config_from_dict(data, saved=saved)
    except (ValueError, TypeError, RecursionError) as error:
        raise ValueError(f"{path}: {one_line(error)}") from None


def migrate_names(names: list[str], written: int, config: ConfigBase) -> dict[str, str]:
    """Each parameter name of a format-``written`` file -> its name in the current format."""
    rules = [(pattern, replacement) for version in range(written, FORMAT)
             for pattern, replacement, applies in MIGRATIONS[version] if applies is None or applies(config)]
    renamed = {}
    for name in names:
        new = f".{name}"  # patterns match whole components, the first one included
        for pattern, replacement in rules:
            new = re.sub(pattern, replacement, new)
        renamed[name] = new[1:]
    return renamed


def load_weights(model: nn.Module, stored: dict[str, torch.Tensor], written: int = FORMAT) -> None:
    """Load tensors named in format ``written`` into ``model`` (strict): names are migrated, and a tensor
    registered under several names (a tied embedding) may be stored under any one of them."""
    renamed = migrate_names(list(stored), written, model.config)
    state = {renamed[name]: tensor for name, tensor in stored.items()}
    for names in tensor_names(model).values():
        present = next((name for name in names if name in state), None)
        if present is not None:  # none present: load_state_dict names it as missing
            state.update({name: state[present] for name in names})
    model.load_state_dict(state, strict=True)


def _format_of(path: Path) -> int:
    try:
        with safe_open(str(path), framework="pt") as weights:
            metadata = weights.metadata()
    except Exception as error:  # noqa: BLE001 - safetensors' own error type (truncated, pickled, garbage)
        raise ValueError(f"{path}: not a readable safetensors file ({one_line(error)}); the checkpoint is "
                         "damaged or incomplete") from None
    return _format_in(metadata, path)


def _format_in(metadata: dict[str, str] | None, path: Path) -> int:
    written = (metadata or {}).get(FORMAT_KEY, "1")
    if not (written.isdigit() and 1 <= int(written) <= FORMAT):
        raise ValueError(f"{path}: checkpoint format {one_line(written, 20)!r}, but this scaleformer reads formats "
                         f"1 to {FORMAT}; it was written by {'a newer' if written.isdigit() and int(written) > FORMAT else 'another'} "
                         "scaleformer: upgrade scaleformer to load it")
    return int(written)


def meta_model(config: ConfigBase) -> nn.Module:
    """The model ``config`` builds, on the meta device: its tensors' names and shapes, no memory."""
    with torch.device("meta"):
        return build(config)


def _load_sharded(directory: Path, config: ConfigBase, map_location: str | torch.device) -> nn.Module:
    """The model of a sharded training checkpoint, whole, in this process (what ``load`` and ``scaleformer
    export`` use): the shards are checked against config.json, then read into a fresh model."""
    dtype = check_sharded_model(directory, meta_model(config), trainer_state(directory))
    model = build(config).to(dtype)
    _, _, flat = local_state(model)
    read_shards(directory / SHARDS, flat, collective=False)  # this process alone, even under torchrun
    return model.to(map_location)


def check_weights(path: Path, config: ConfigBase) -> torch.dtype:
    """Compare a safetensors file's header (names, shapes, dtypes; no tensor data is read) with the model
    ``config`` builds, built on the meta device (no memory). Names of an older format are compared after
    migration. Returns the weights' floating dtype."""
    header, metadata = read_header(path)
    return check_header(header, _format_in(metadata, path), config, path)


def read_header(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str] | None]:
    """A safetensors file's tensors (name -> (dtype, shape)) and metadata, without reading tensor data."""
    try:
        with safe_open(str(path), framework="pt") as weights:  # one open: a writer may prune the file after it
            header = {name: (weights.get_slice(name).get_dtype(), tuple(weights.get_slice(name).get_shape()))
                      for name in weights.keys()}
            return header, weights.metadata()
    except Exception as error:  # noqa: BLE001 - safetensors' own error type (truncated, pickled, garbage)
        raise ValueError(f"{path}: not a readable safetensors file ({one_line(error)}); the checkpoint is "
                         "damaged or incomplete") from None


def check_header(header: dict[str, tuple[str, tuple[int, ...]]], written: int, config: ConfigBase,
                 where: Path) -> torch.dtype:
    """The tensors a header lists (names in format ``written``) are exactly those ``config`` builds, in its
    shapes and one floating dtype: checked on the meta device, before anything large is allocated. A tensor
    registered under several names (a tied embedding) must be stored under one of them only."""
    renamed = migrate_names(list(header), written, config)
    counts = collections.Counter(renamed.values())
    collided = sorted(new for new, count in counts.items() if count > 1)
    if collided:  # e.g. under its old name and its new one
        raise ValueError(f"{where}: the weights hold {_names(collided)} twice, under several names")
    header = {renamed[name]: value for name, value in header.items()}
    for name, value in declared_depths(config).items():  # every layer has weights: bound the build by the header
        if value > len(header):
            raise ValueError(f"{where}: config.json asks for {name}={value}, but the weights hold only "
                             f"{len(header)} tensors")
    with torch.device("meta"):
        model = build(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    aliases = tensor_names(model)  # a tensor registered under several names is saved under one of them
    missing = sorted(names[0] for names in aliases.values() if not any(name in header for name in names))
    unexpected = sorted(set(header) - set(expected))
    twice = sorted(names[0] for names in aliases.values() if sum(name in header for name in names) > 1)
    if missing or unexpected or twice:
        raise ValueError(f"{where}: the weights do not match config.json ("
                         + "; ".join(filter(None, [missing and f"missing {_names(missing)}",
                                                   unexpected and f"unexpected {_names(unexpected)}",
                                                   twice and f"stored under several names: {_names(twice)}"])) + ")")
    for name, shape in expected.items():
        if name in header and header[name][1] != shape:
            raise ValueError(f"{where}: tensor {name} has shape {list(header[name][1])} but config.json builds "
                             f"{list(shape)}")
    dtypes = {dtype for dtype, _ in header.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in FLOAT_DTYPES:
        raise ValueError(f"{where}: weights must all have one floating dtype (F32, F64, BF16 or F16), got "
                         f"{sorted(dtypes)}")
    return FLOAT_DTYPES[next(iter(dtypes))]


FLOAT_DTYPES = {"F32": torch.float32, "F64": torch.float64, "BF16": torch.bfloat16, "F16": torch.float16}


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
