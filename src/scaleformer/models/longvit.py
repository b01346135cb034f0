"""LongViT (arXiv 2312.03558): a vision Transformer over very long patch sequences, its attention LongNet's
dilated attention, for gigapixel images.

An image of H × W pixels becomes (H/p)·(W/p) patch tokens (a conv of kernel = stride = p), in row-major
order, plus a learned position table of the configured grid (bicubically resized for other image sizes,
as TorchScale's example does); no CLS token. The encoder is a Sub-LN stack of dilated attention layers
with no final norm; the head averages every patch token, normalises (LayerNorm) and classifies.

Segment lengths grow with the image: by default those of TorchScale's LongViT example for the patch counts
it names (1,024 patches: 64…1,024; 16,384: 1,024…16,384; 65,536, 262,144 and 1,048,576 as listed in
:data:`TORCHSCALE_SEGMENTS`), otherwise N/16, N/8, N/4, N/2, N for N patches; dilation rates 1, 2, 4, 8, 16.

Images that do not fit one device: ``model(strip, sequence_group=group)`` with each rank holding one
horizontal strip of the image (rank r: pixel rows [r·H/W, (r+1)·H/W) of W ranks), so its patches are a
contiguous shard of the sequence; dilated attention runs sequence-parallel (:mod:`scaleformer.ops.dilated_parallel`),
the mean over patches is summed across ranks, and every rank gets the same logits and loss. Averaging the
ranks' gradients, as data parallelism does, gives the exact gradient of that loss (tested in float64
against one process on the whole image).

Not tested here against TorchScale: its LongNet encoder is in neither torchscale 0.3.0 nor any release on
PyPI, and it runs only with flash-attn or xformers on a GPU. TorchScale assigns dilation offsets to heads in
groups (head h keeps offset ⌊h / ⌈H/r⌉⌋) where we use h mod r; ``head_offsets="grouped"`` follows it. An
independent audit ran TorchScale's LongNet and LongViT sources in float64 (flash-attn replaced by an exact
stand-in): the converted encoder matched to 3e-16. Two differences it found are fixed: a converted model's
classifier norm takes TorchScale's epsilon (``fc_norm_eps``, nn.LayerNorm's 1e-5; ours stays 1e-6), and a
model converted for another image size keeps its source's segment lengths, as TorchScale's model does. Where
TorchScale's dilated attention departs from LongNet's definition (we keep the definition) is listed in
``tests/ops/test_dilated.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from scaleformer.config import ConfigBase, ConfigError, config
from scaleformer.models.architecture import ModelConfig
from scaleformer.models.families import transformer
from scaleformer.models.transformer import TransformerStack
from scaleformer.ops.dilated import check_patterns

__all__ = ["LongViTConfig", "LongViT", "LongViTOutput", "TORCHSCALE_SEGMENTS", "default_segments"]


class _SumAcrossRanks(torch.autograd.Function):
    """A sum over the ranks of a group whose gradient is the same sum of the ranks' gradients. Our own rather
    than ``torch.distributed.nn.functional.all_reduce``: importing that package (it brings in RPC) made about
    one gloo worker in fifteen abort with "terminate called without an active exception" at interpreter exit
    (torch 2.13), after its work had finished."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        total = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=ctx.group)
        return total, None

#: patches -> segment lengths, from TorchScale's LongViT example (examples/longvit/longvit.py)
TORCHSCALE_SEGMENTS = {1024: (64, 128, 256, 512, 1024), 16384: (1024, 2048, 4096, 8192, 16384),
                       65536: (1024, 4096, 8192, 16384, 65536), 262144: (1024, 4096, 16384, 65536, 262144),
                       1048576: (1024, 4096, 32768, 262144, 1048576)}


def default_segments(patches: int) -> tuple[int, ...]:
    """Segment lengths for an image of ``patches`` patches (see the module docstring)."""
    if patches in TORCHSCALE_SEGMENTS:
        return TORCHSCALE_SEGMENTS[patches]
    return tuple(max(1, patches // 2**k) for k in (4, 3, 2, 1, 0))


@config
class LongViTConfig(ConfigBase):
    """A LongViT classifier (LongViT-small by default: 12 layers of width 384, 16 heads, 32-pixel patches)."""

    family: ClassVar[str] = "longvit"

    img_size: int = 1024
    patch_size: int = 32
    in_chans: int = 3
    embed_dim: int = 384
    layers: int = 12
    heads: int = 16
    ffn_dim: int = 1536
    #: dilated attention's segment lengths; () = the default for this image size (default_segments)
    segment_lengths: tuple[int, ...] = ()
    dilation_rates: tuple[int, ...] = (1, 2, 4, 8, 16)
    norm: Literal["pre", "subln"] = "subln"
    norm_eps: float = 1e-5
    dropout: float = 0.0
    #: stochastic depth, growing linearly to this rate at the last layer
    drop_path: float = 0.0
    #: classes of the head; 0 = no head (the pooled, normalised features are the output)
    num_classes: int = 2
    #: "sdpa", "reference" or "triton" (see DilatedAttention.impl)
    attention_impl: Literal["sdpa", "reference", "triton"] = "sdpa"
    #: recompute each block in the backward pass (what LongViT trains with at 8k and 32k pixels)
    checkpoint_activations: bool = False
    #: which dilation offset each head keeps: "modulo" (h mod r) or TorchScale's "grouped" (⌊h / ⌈H/r⌉⌋)
    head_offsets: Literal["modulo", "grouped"] = "modulo"
    #: epsilon of the classifier's LayerNorm over the pooled features: ours has been 1e-6; TorchScale's LongViT
    #: example builds nn.LayerNorm's default, 1e-5, which models converted from it take
    fc_norm_eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def segments(self) -> tuple[int, ...]:
        return self.segment_lengths or default_segments(self.num_patches)

    def _validate(self) -> None:
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "layers", "heads", "ffn_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 0:
            raise ConfigError(f"num_classes must be >= 0, got {self.num_classes}")
        if not self.fc_norm_eps > 0:
            raise ConfigError(f"fc_norm_eps must be > 0, got {self.fc_norm_eps}")
        if self.img_size % self.patch_size:
            raise ConfigError(f"patch_size ({self.patch_size}) must divide img_size ({self.img_size})")
        if self.embed_dim % self.heads:
            raise ConfigError(f"heads ({self.heads}) must divide embed_dim ({self.embed_dim})")
        if len(self.dilation_rates) != len(self.segments):
            raise ConfigError(f"segment_lengths {self.segments} and dilation_rates {self.dilation_rates} differ in "
                              "length")
        try:
            check_patterns(self.segments, self.dilation_rates)
        except ValueError as error:
            raise ConfigError(f"segment_lengths/dilation_rates: {error}") from None

    def encoder_config(self) -> ModelConfig:
        """The dilated encoder stack (the patches carry their positions)."""
        return transformer(
            causal=False, vocab_size=1, embed_dim=self.embed_dim, layers=self.layers, heads=self.heads,
            ffn_dim=self.ffn_dim, norm=self.norm, norm_eps=self.norm_eps, position="none", dropout=self.dropout,
            drop_path=self.drop_path, attention="dilated", segment_lengths=self.segments,
            dilation_rates=self.dilation_rates, checkpoint_activations=self.checkpoint_activations)


@dataclass
class LongViTOutput:
    logits: Tensor  # (B, classes), or the pooled features (B, D) without a head
    hidden: Tensor  # (B, N_local, D): this rank's patch tokens after the encoder
    loss: Tensor | None = None


class LongViT(nn.Module):
    def __init__(self, config: LongViTConfig) -> None:
        super().__init__()
        self.config = config
        d = config.embed_dim
        self.patch_embed = nn.Conv2d(config.in_chans, d, kernel_size=config.patch_size, stride=config.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches, d))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        stack = config.encoder_config().replace(final_norm=False)
        stack = stack.replace(layers=tuple(layer.replace(mixer=layer.mixer.replace(
            impl=config.attention_impl, head_offsets=config.head_offsets)) for layer in stack.layers))
        self._embedding = nn.Embedding(1, d).requires_grad_(False)  # the stack's token table; never read
        self.encoder = TransformerStack(stack, self._embedding)
        self.fc_norm = nn.LayerNorm(d, eps=config.fc_norm_eps)
        self.head = nn.Linear(d, config.num_classes) if config.num_classes else None
        if self.head is not None:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def positions(self, rows: int, columns: int) -> Tensor:
        """(1, rows·columns, D): the table for a grid of rows × columns patches (bicubic resize if it differs)."""
        grid = self.config.grid
        if (rows, columns) == (grid, grid):
            return self.pos_embed
        table = self.pos_embed.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(table, size=(rows, columns), mode="bicubic", align_corners=False)
        return resized.permute(0, 2, 3, 1).reshape(1, rows * columns, -1)

    def forward(self, images: Tensor, labels: Tensor | None = None, *,
                sequence_group: dist.ProcessGroup | None = None) -> LongViTOutput:
        """images (B, C, H, W), H and W multiples of the patch size; with ``sequence_group``, this rank's
        horizontal strip of an image of the configured size (all ranks' strips equal in height)."""
        p = self.config.patch_size
        if images.dim() != 4 or images.shape[1] != self.config.in_chans:
            raise ValueError(f"images must be (batch, {self.config.in_chans}, height, width), got {tuple(images.shape)}")
        if images.shape[-2] % p or images.shape[-1] % p:
            raise ValueError(f"image sides must be multiples of the patch size {p}, got {images.shape[-2]}×{images.shape[-1]}")
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype))  # (B, D, rows, columns)
        rows, columns = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        world = 1
        if sequence_group is None:
            x = x + self.positions(rows, columns).to(x.dtype)
        else:
            world, rank = dist.get_world_size(sequence_group), dist.get_rank(sequence_group)
            if (rows * world, columns) != (self.config.grid, self.config.grid):
                raise ValueError(f"with {world} ranks each holds a strip of {self.config.grid // world if world else 0} "
                                 f"patch rows of the {self.config.img_size}-pixel image; got {rows} rows of {columns}")
            x = x + self.pos_embed[:, rank * rows * columns:(rank + 1) * rows * columns].to(x.dtype)
        hidden = self.encoder(None, embeddings=x, sequence_group=sequence_group)
        pooled = hidden.sum(1)
        if sequence_group is not None:  # the mean over every rank's patches; gradients flow back to each
            pooled = _SumAcrossRanks.apply(pooled, sequence_group)
        features = self.fc_norm(pooled / (hidden.shape[1] * world))
        logits = self.head(features) if self.head is not None else features
        loss = F.cross_entropy(logits.float(), labels) if labels is not None and self.head is not None else None
        return LongViTOutput(logits=logits, hidden=hidden, loss=loss)
