"""BitNet b1.58 models for inference at 2 bits per weight: pack, save, load.

A trained ``linear="bitlinear"`` model keeps full-precision latent weights; only their ternary codes and
one scale per matrix matter for inference. :func:`pack` swaps every BitLinear for a
:class:`PackedBitLinear` holding its codes at 2 bits each (4 per byte) and its scale, and every MoE layer's
experts for :class:`PackedExperts` (one scale per expert matrix) — the forward pass computes exactly what
the latent layers compute, so the logits are equal. :func:`save_packed` writes such a
model (``config.json`` + ``packed.safetensors``) and :func:`load_packed` rebuilds it from those files;
``scaleformer pack-bitnet CHECKPOINT OUT`` does both from a checkpoint and reports the memory saved.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from scaleformer import durable
from scaleformer.files import one_line
from scaleformer.layers.bitlinear import BitLinear, int8_activations, ternary_weights
from scaleformer.layers.moe import Experts
from scaleformer.layers.norms import RMSNorm

__all__ = ["pack_ternary", "unpack_ternary", "PackedBitLinear", "PackedExperts", "pack", "save_packed", "load_packed",
           "linear_bytes"]

PACKED_FILE = "packed.safetensors"
CONFIG_FILE = "config.json"


def pack_ternary(codes: Tensor) -> Tensor:
    """Codes in {−1, 0, 1} (any shape) -> uint8 (ceil(n / 4),): code + 1 in 2 bits, 4 per byte, first in the low bits."""
    flat = (codes.reshape(-1).round().to(torch.int64) + 1).to(torch.uint8)
    if not torch.all(flat <= 2):
        raise ValueError("pack_ternary takes codes in {-1, 0, 1}")
    flat = F.pad(flat, (0, (-flat.numel()) % 4)).view(-1, 4)
    return flat[:, 0] | (flat[:, 1] << 2) | (flat[:, 2] << 4) | (flat[:, 3] << 6)


def unpack_ternary(packed: Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """The inverse of :func:`pack_ternary`: codes of ``shape`` in ``dtype``."""
    count = 1
    for size in shape:
        count *= size
    fields = torch.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], dim=1).reshape(-1)[:count]
    return (fields.to(dtype) - 1).view(shape)


class PackedBitLinear(nn.Module):
    """BitLinear's inference forward from packed codes: the same norm, activation quantiser and product."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("packed", torch.zeros((in_features * out_features + 3) // 4, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.input_norm = RMSNorm(in_features, eps=norm_eps, affine=False)

    @classmethod
    def of(cls, layer: BitLinear) -> PackedBitLinear:
        packed = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, norm_eps=layer.input_norm.eps)
        with torch.no_grad():
            codes, scale = ternary_weights(layer.weight)
            packed.packed = pack_ternary(codes).to(layer.weight.device)
            packed.scale = scale.detach().clone()
            if layer.bias is not None:
                packed.bias = nn.Parameter(layer.bias.detach().clone())
        return packed

    def weight(self, dtype: torch.dtype) -> Tensor:
        return unpack_ternary(self.packed, (self.out_features, self.in_features), dtype) * self.scale.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        x = self.input_norm(x)
        codes, scale = int8_activations(x)
        return F.linear(codes * scale, self.weight(x.dtype), self.bias)


class PackedExperts(Experts):
    """BitNet MoE experts from packed codes: each expert matrix (fc1, gate, fc2) stored at 2 bits per weight
    with its own scale, unpacked on every call; the rest (biases, Sub-LN norms, the forward) is Experts'."""

    MATRICES = ("fc1", "gate", "fc2")

    def __init__(self, like: Experts) -> None:
        experts, embed_dim, ffn_dim = like.fc1.shape
        super().__init__(experts, embed_dim, ffn_dim, **like.options)
        self.shapes = {}
        for name in self.MATRICES:
            latent = getattr(self, name)
            if latent is None:
                continue
            delattr(self, name)  # the latent weight is not kept: codes and scales take its place
            self.shapes[name] = tuple(latent.shape)
            self.register_buffer(f"{name}_codes", torch.zeros((latent.numel() + 3) // 4, dtype=torch.uint8))
            self.register_buffer(f"{name}_scale", torch.ones(latent.shape[0], 1, 1))
            setattr(self, name, None)

    @classmethod
    def of(cls, experts: Experts) -> PackedExperts:
        packed = cls(experts)
        with torch.no_grad():
            for name in packed.shapes:
                codes, scale = ternary_weights(getattr(experts, name), per_matrix=True)
                setattr(packed, f"{name}_codes", pack_ternary(codes))
                setattr(packed, f"{name}_scale", scale.detach().clone())
            for name, tensor in experts.named_parameters(recurse=False):
                if name not in packed.shapes:
                    getattr(packed, name).copy_(tensor)
        return packed.to(experts.fc1.device)

    def matrices(self) -> tuple[Tensor, Tensor | None, Tensor]:
        unpacked = {name: unpack_ternary(getattr(self, f"{name}_codes"), shape, getattr(self, f"{name}_scale").dtype)
                    * getattr(self, f"{name}_scale") for name, shape in self.shapes.items()}
        return unpacked["fc1"], unpacked.get("gate"), unpacked["fc2"]

    def packed_bytes(self) -> int:
        return sum(getattr(self, f"{name}_codes").numel() + getattr(self, f"{name}_scale").numel() * 4
                   for name in self.shapes)


def _swap(module: nn.Module, make_linear, make_experts) -> None:
    for name, child in module.named_children():
        if isinstance(child, BitLinear):
            setattr(module, name, make_linear(child))
        elif isinstance(child, Experts) and child.bitlinear and not isinstance(child, PackedExperts):
            setattr(module, name, make_experts(child))
        else:
            _swap(child, make_linear, make_experts)


def pack(model: nn.Module) -> nn.Module:
    """``model`` with every BitLinear and BitNet MoE expert stack replaced by its packed form (in place;
    returned for chaining)."""
    if not any(isinstance(m, BitLinear) for m in model.modules()):
        raise ValueError("this model has no BitLinear layers: build it with linear='bitlinear' to pack it")
    _swap(model, PackedBitLinear.of, PackedExperts.of)
    return model


def linear_bytes(model: nn.Module) -> int:
    """Bytes held by the blocks' linear weights: latent weights of (Bit)Linears and of MoE experts, packed
    codes and scales."""
    total = 0
    for module in model.modules():
        if isinstance(module, PackedBitLinear):
            total += module.packed.numel() + module.scale.numel() * module.scale.element_size()
        elif isinstance(module, PackedExperts):
            total += module.packed_bytes()
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif isinstance(module, Experts):
            total += sum(w.numel() * w.element_size() for w in (module.fc1, module.gate, module.fc2) if w is not None)
    return total


def save_packed(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write a packed model as ``config.json`` and ``packed.safetensors`` into ``directory``: built complete
    beside it and put in place in one step (see :mod:`scaleformer.durable`), never onto training state. The
    floating tensors keep the model's dtype; :func:`load_packed` returns it in that dtype."""
    if not any(isinstance(m, PackedBitLinear) for m in model.modules()):
        raise ValueError("save_packed expects a packed model: call scaleformer.bitnet.pack(model) first")
    directory = durable.check_output_dir(directory, "save_packed")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / PACKED_FILE).is_file():
        raise ValueError(f"{directory} holds other files; pack into a new or empty directory (an earlier packed "
                         "model is replaced)")
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    unique, seen = {}, set()
    for name, tensor in state.items():  # a tied embedding is stored once
        if tensor.data_ptr() not in seen or tensor.numel() == 0:
            seen.add(tensor.data_ptr())
            unique[name] = tensor
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = durable.temporary_name(directory)
    try:
        tmp.mkdir()
        durable.write_safetensors(save_file, tmp / PACKED_FILE, unique)
        (tmp / CONFIG_FILE).write_text(model.config.to_json())
        durable.fsync_tree(tmp)
    except Exception:
        durable.remove_tree(tmp)
        raise
    durable.install_dir(tmp, directory)
    return directory


def _packed_model(config) -> nn.Module:
    """The model ``config`` builds with every BitLinear and BitNet expert stack in its packed form."""
    from scaleformer.build import build

    model = build(config)
    _swap(model, lambda layer: PackedBitLinear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                               norm_eps=layer.input_norm.eps), PackedExperts)
    return model


def _is_codes(name: str) -> bool:
    return name.endswith(".packed") or name == "packed" or name.endswith("_codes")


def _is_scale(name: str) -> bool:
    return name.endswith(".scale") or name.endswith("_scale")


def _check_packed_header(path: Path, config) -> torch.dtype:
    """The header of ``packed.safetensors`` lists exactly the tensors of the packed model ``config`` builds
    (checked on the meta device, before anything is allocated): its shapes, uint8 codes, and one floating
    dtype for the rest, which is returned."""
    from scaleformer.build import FLOAT_DTYPES, declared_depths, read_header, tensor_names

    header, _ = read_header(path)
    for name, value in declared_depths(config).items():  # every layer has tensors: bound the build by the header
        if value > len(header):
            raise ValueError(f"{path}: the config asks for {name}={value}, but the file holds only {len(header)} tensors")
    with torch.device("meta"):
        model = _packed_model(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    groups = tensor_names(model).values()
    missing = sorted(names[0] for names in groups if not any(name in header for name in names))
    unexpected = sorted(set(header) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: the tensors do not match config.json ("
                         + "; ".join(filter(None, [missing and f"missing {missing[0]}" + (f" and {len(missing) - 1} more"
                                                                                           if len(missing) > 1 else ""),
                                                   unexpected and f"unexpected {one_line(unexpected[0], 80)}"])) + ")")
    for name, (dtype, shape) in header.items():
        if shape != expected[name]:
            raise ValueError(f"{path}: tensor {name} has shape {list(shape)} but config.json builds {list(expected[name])}")
        if _is_codes(name) and dtype != "U8":
            raise ValueError(f"{path}: {name} holds packed codes, which are uint8 (U8), not {dtype}")
    floating = {dtype for name, (dtype, _) in header.items() if not _is_codes(name)}
    if len(floating) != 1 or next(iter(floating)) not in FLOAT_DTYPES:
        raise ValueError(f"{path}: the scales and other weights must have one floating dtype, got {sorted(floating)}")
    return FLOAT_DTYPES[next(iter(floating))]


def _check_packed_values(path: Path, stored: dict[str, Tensor]) -> None:
    """Codes are 2-bit fields holding code + 1 in {0, 1, 2} (3 is no code); scales finite and positive (a
    mean |W| clamped away from 0); everything else finite."""
    for name, tensor in stored.items():
        if _is_codes(name):
            if any(bool(((tensor >> shift) & 3).eq(3).any()) for shift in (0, 2, 4, 6)):
                raise ValueError(f"{path}: {name} holds codes outside {{-1, 0, 1}}; the file is damaged")
        elif not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: tensor {name} holds NaN or infinite values; the file is damaged")
        elif _is_scale(name) and not (tensor > 0).all():
            raise ValueError(f"{path}: the scale {name} is not positive; the file is damaged")


def load_packed(directory: str | os.PathLike) -> nn.Module:
    """Rebuild a model written by :func:`save_packed`, in the dtype it was saved in. Checked as
    ``scaleformer.load`` checks a model directory: the config (a bounded JSON object of a known BitNet
    config), the header against the packed model the config builds (names, shapes, uint8 codes, one
    floating dtype; before anything is allocated), then the values. Each failure is one ``ValueError``
    (``FileNotFoundError`` for a missing file) naming the file."""
    from scaleformer.build import read_config, tensor_names

    directory = Path(directory)
    for name in (CONFIG_FILE, PACKED_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found: not a packed BitNet directory")
    config = read_config(directory / CONFIG_FILE)
    if getattr(config, "linear", "standard") != "bitlinear":
        raise ValueError(f"{directory / CONFIG_FILE}: not a BitNet config (linear={getattr(config, 'linear', None)!r})")
    path = directory / PACKED_FILE
    dtype = _check_packed_header(path, config)
    model = _packed_model(config).to(dtype)  # latent weights are built and then dropped: packing replaces them
    try:
        stored = load_file(str(path))
    except Exception as error:  # noqa: BLE001 - safetensors' own error type, or I/O
        raise ValueError(f"{path}: unreadable ({one_line(error)})") from None
    _check_packed_values(path, stored)
    for group in tensor_names(model).values():  # tied names share the one stored copy
        present = next((name for name in group if name in stored), None)
        if present is not None:
            stored.update({name: stored[present] for name in group})
    model.load_state_dict(stored, strict=True)
    return model.eval()
