"""BEiT-3 (arXiv 2208.10442): a Multiway Transformer over image patches, text, or both.

The model is an encoder in which every token-wise module has one copy for image tokens and one for text
tokens (``multiway_scope="all"``: attention projections, Sub-LN norms, FFNs, block and final norms), run
on the concatenation [CLS, patches…, text…]. What this module adds to our encoder stack is the input side,
as TorchScale's ``BEiT3`` builds it:

* patches: a conv of kernel = stride = ``patch_size`` turns (B, C, H, W) images into (B, N, D) tokens; masked
  patches (BEiT's masked image modelling) are replaced by a learned mask token; a learned CLS token is
  prepended;
* text: a token embedding;
* positions: one learned table per modality (image: N + 1 rows; text: ``max_text_positions`` rows), each
  counted from 0 within its modality. (TorchScale's tables start at row 2, fairseq's padding offset; the
  converter drops those two rows.) Text positions count real tokens, so right padding — BEiT-3's — gives
  the same positions as TorchScale and left padding does not shift them;
* the Multiway split: the first N + 1 tokens (the image's) take copy 0, the text copy 1; image-only input
  is all copy 0 and text-only all copy 1.

Heads (``task`` in :class:`BEiT3Config`): "classification" (mean of the patch tokens, a LayerNorm, a linear
layer: BEiT-3's ImageNet head), "retrieval" (image and text CLS embeddings through their own linear maps,
L2-normalised, with a learned temperature and the symmetric contrastive loss), "masked" (masked data
modelling, BEiT-3's pretraining objective: masked text tokens predicted over the text vocabulary, masked
patches over a visual vocabulary such as a VQ tokenizer's codes), or "backbone" (hidden states only).

Shapes: B batch, N patches, L text length, T = N + 1 + L tokens, D width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaleformer.config import ConfigBase, ConfigError, config
from scaleformer.models.architecture import ModelConfig
from scaleformer.models.families import transformer
from scaleformer.models.inputs import check_attention_mask, check_token_ids
from scaleformer.models.transformer import TransformerStack

__all__ = ["BEiT3Config", "BEiT3", "BEiT3Output", "PatchEmbedding", "build_beit3"]

Task = Literal["backbone", "classification", "retrieval", "masked"]


@config
class BEiT3Config(ConfigBase):
    """A BEiT-3 model: the Multiway encoder, its image and text inputs, and one task head."""

    family: ClassVar[str] = "beit3"

    #: text token ids (BEiT-3's XLM-R sentencepiece vocabulary: 64010)
    vocab_size: int = 64010
    embed_dim: int = 768
    layers: int = 12
    heads: int = 12
    ffn_dim: int = 3072
    #: square images of img_size × img_size pixels, cut into patches of patch_size × patch_size
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    #: rows of the text position table (TorchScale's max_source_positions)
    max_text_positions: int = 1024
    #: residual scheme; BEiT-3 (TorchScale's encoder default) uses Sub-LN
    norm: Literal["pre", "post", "deepnorm", "subln"] = "subln"
    norm_eps: float = 1e-5
    activation: Literal["gelu", "relu", "swish"] = "gelu"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    #: stochastic depth, growing linearly to this rate at the last layer
    drop_path: float = 0.0
    #: which head the model carries (see the module docstring)
    task: Task = "backbone"
    #: classes of the "classification" head
    num_classes: int = 1000
    #: visual vocabulary of the "masked" head's image side (BEiT v2's VQ-KD tokenizer: 8192 codes)
    visual_vocab_size: int = 8192

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    def _validate(self) -> None:
        for name in ("vocab_size", "embed_dim", "layers", "heads", "ffn_dim", "img_size", "patch_size", "in_chans",
                     "max_text_positions", "num_classes", "visual_vocab_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.embed_dim % self.heads:
            raise ConfigError(f"heads ({self.heads}) must divide embed_dim ({self.embed_dim})")
        if self.img_size % self.patch_size:
            raise ConfigError(f"patch_size ({self.patch_size}) must divide img_size ({self.img_size})")

    def encoder_config(self) -> ModelConfig:
        """The Multiway encoder stack (no positions of its own: the inputs carry theirs)."""
        return transformer(
            causal=False, vocab_size=self.vocab_size, embed_dim=self.embed_dim, layers=self.layers,
            heads=self.heads, ffn_dim=self.ffn_dim, activation=self.activation, norm=self.norm,
            norm_eps=self.norm_eps, position="none", dropout=self.dropout, attention_dropout=self.attention_dropout,
            drop_path=self.drop_path, multiway=2, multiway_scope="all")


class PatchEmbedding(nn.Module):
    """Images (B, C, H, W) -> patch tokens (B, N, D), masked patches replaced by a learned mask token, a
    learned CLS token prepended: (B, N + 1, D)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, images: Tensor, masked: Tensor | None = None) -> Tensor:
        """``masked`` (B, N) bool: patches to hide (True = replaced by the mask token)."""
        if images.dim() != 4 or images.shape[1] != self.proj.in_channels:
            raise ValueError(f"images must be (batch, {self.proj.in_channels}, height, width), got {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"images must be {self.img_size}×{self.img_size} pixels for this model, got "
                             f"{images.shape[-2]}×{images.shape[-1]} (resize them: scaleformer.data.images)")
        if not images.dtype.is_floating_point:
            raise ValueError(f"images must be float pixels (normalised), got {images.dtype}")
        x = self.proj(images.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)  # (B, N, D)
        if masked is not None:
            if masked.shape != x.shape[:2] or masked.dtype != torch.bool:
                raise ValueError(f"masked patches must be bool (batch, patches) = {tuple(x.shape[:2])}, got "
                                 f"{masked.dtype} {tuple(masked.shape)}")
            x = torch.where(masked[..., None], self.mask_token.to(x.dtype), x)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)


@dataclass
class BEiT3Output:
    hidden: Tensor  # (B, T, D) after the final norm: image tokens [CLS, patches] first, then text
    image_tokens: int  # N + 1 with an image, else 0: where the text starts
    mask: Tensor | None  # (B, T) bool, True = real token; None when nothing is padding
    logits: Tensor | None = None  # the task head's output (classification; retrieval; masked: text tokens)
    image_logits: Tensor | None = None  # masked data modelling: the masked patches' visual-token logits
    loss: Tensor | None = None
    image_embedding: Tensor | None = None  # retrieval: (B, D) L2-normalised
    text_embedding: Tensor | None = None


class BEiT3(nn.Module):
    """The BEiT-3 backbone: ``forward(text_ids=..., images=...)`` with either or both."""

    def __init__(self, config: BEiT3Config) -> None:
        super().__init__()
        self.config = config
        d = config.embed_dim
        self.text_embed = nn.Embedding(config.vocab_size, d)
        nn.init.normal_(self.text_embed.weight, std=d**-0.5)
        self.vision_embed = PatchEmbedding(config.img_size, config.patch_size, config.in_chans, d)
        self.image_positions = nn.Embedding(config.num_patches + 1, d)
        self.text_positions = nn.Embedding(config.max_text_positions, d)
        for table in (self.image_positions, self.text_positions):
            nn.init.trunc_normal_(table.weight, std=0.02)
        self.encoder = TransformerStack(config.encoder_config(), self.text_embed)

    def forward(self, text_ids: Tensor | None = None, images: Tensor | None = None, *,
                text_mask: Tensor | None = None, masked_patches: Tensor | None = None) -> BEiT3Output:
        """text_ids (B, L); images (B, C, H, W); text_mask (B, L), 1 = token, 0 = padding; masked_patches
        (B, N) bool: patches replaced by the mask token."""
        if text_ids is None and images is None:
            raise ValueError("BEiT-3 needs text_ids, images or both")
        parts, masks = [], []
        if images is not None:
            patches = self.vision_embed(images, masked_patches)
            positions = torch.arange(patches.shape[1], device=patches.device)
            parts.append(patches + self.image_positions(positions).to(patches.dtype))
            masks.append(torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device))
        elif masked_patches is not None:
            raise ValueError("masked_patches were given without images")
        if text_ids is not None:
            check_token_ids(text_ids, self.config.vocab_size, "text_ids")
            check_attention_mask(text_mask, "text_mask")
            if images is not None and text_ids.shape[0] != images.shape[0]:
                raise ValueError(f"text_ids and images differ in batch size ({text_ids.shape[0]} vs {images.shape[0]})")
            if text_mask is not None and text_mask.shape != text_ids.shape:
                raise ValueError(f"text_mask must have the shape of text_ids {tuple(text_ids.shape)}, got "
                                 f"{tuple(text_mask.shape)}")
            real = text_mask.bool() if text_mask is not None else torch.ones_like(text_ids, dtype=torch.bool)
            positions = (real.long().cumsum(1) - 1).clamp(min=0)
            if int(positions.max()) >= self.config.max_text_positions:
                raise ValueError(f"text of {int(positions.max()) + 1} tokens is longer than the text position table "
                                 f"(max_text_positions={self.config.max_text_positions})")
            words = self.text_embed(text_ids)
            parts.append(words + self.text_positions(positions).to(words.dtype))
            masks.append(real)
        elif text_mask is not None:
            raise ValueError("text_mask was given without text_ids")
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        mask = torch.cat(masks, dim=1) if len(masks) > 1 else masks[0]
        image_tokens = parts[0].shape[1] if images is not None else 0
        padded = not bool(mask.all())
        hidden = self.encoder(None, attention_mask=mask if padded else None, multiway_split=image_tokens, embeddings=x)
        return BEiT3Output(hidden=hidden, image_tokens=image_tokens, mask=mask if padded else None)


class BEiT3ForClassification(nn.Module):
    """Image classification: mean of the patch tokens (CLS excluded), LayerNorm, linear."""

    def __init__(self, config: BEiT3Config) -> None:
        super().__init__()
        self.config = config
        self.beit3 = BEiT3(config)
        self.fc_norm = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.head = nn.Linear(config.embed_dim, config.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> BEiT3Output:
        out = self.beit3(images=images)
        out.logits = self.head(self.fc_norm(out.hidden[:, 1:].mean(1)))
        if labels is not None:
            out.loss = F.cross_entropy(out.logits.float(), labels)
        return out


class BEiT3ForRetrieval(nn.Module):
    """Image-text retrieval: each modality's CLS through its own linear map, L2-normalised; similarity
    = e^{logit_scale} · cosine; loss = the symmetric contrastive (CLIP) loss over the batch."""

    def __init__(self, config: BEiT3Config) -> None:
        super().__init__()
        self.config = config
        self.beit3 = BEiT3(config)
        self.vision_head = nn.Linear(config.embed_dim, config.embed_dim, bias=False)
        self.language_head = nn.Linear(config.embed_dim, config.embed_dim, bias=False)
        for head in (self.vision_head, self.language_head):
            nn.init.trunc_normal_(head.weight, std=0.02)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed_images(self, images: Tensor) -> Tensor:
        return F.normalize(self.vision_head(self.beit3(images=images).hidden[:, 0]), dim=-1)

    def embed_texts(self, text_ids: Tensor, text_mask: Tensor | None = None) -> Tensor:
        return F.normalize(self.language_head(self.beit3(text_ids, text_mask=text_mask).hidden[:, 0]), dim=-1)

    def forward(self, images: Tensor, text_ids: Tensor, text_mask: Tensor | None = None) -> BEiT3Output:
        """Pairs (images[i], text_ids[i]); logits (B, B) image × text similarities, loss the contrastive loss."""
        image, text = self.embed_images(images), self.embed_texts(text_ids, text_mask)
        logits = self.logit_scale.exp() * image @ text.t()
        targets = torch.arange(logits.shape[0], device=logits.device)
        loss = (F.cross_entropy(logits.float(), targets) + F.cross_entropy(logits.float().t(), targets)) / 2
        return BEiT3Output(hidden=logits.new_zeros(0), image_tokens=0, mask=None, logits=logits, loss=loss,
                           image_embedding=image, text_embedding=text)


class BEiT3ForMaskedDataModeling(nn.Module):
    """BEiT-3's pretraining objective on image, text or image-text input: masked text tokens predicted over
    the text vocabulary, masked patches over the visual vocabulary (targets from a visual tokenizer)."""

    def __init__(self, config: BEiT3Config) -> None:
        super().__init__()
        self.config = config
        self.beit3 = BEiT3(config)
        self.text_head = nn.Linear(config.embed_dim, config.vocab_size)
        self.image_head = nn.Linear(config.embed_dim, config.visual_vocab_size)
        for head in (self.text_head, self.image_head):
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)

    def forward(self, text_ids: Tensor | None = None, images: Tensor | None = None, *,
                text_mask: Tensor | None = None, masked_text: Tensor | None = None,
                masked_patches: Tensor | None = None, text_targets: Tensor | None = None,
                image_targets: Tensor | None = None) -> BEiT3Output:
        """masked_text (B, L) bool: text positions to predict (their ids in text_ids are replaced by the
        caller, e.g. with a mask id; ``text_targets`` (B, L) holds the originals); masked_patches (B, N) bool
        with ``image_targets`` (B, N) visual token ids. loss = mean CE over masked text tokens + mean CE over
        masked patches (each term present when its masks and targets are given). ``logits``: (M_text, V) at
        the masked text positions, ``image_logits``: (M_patches, visual V) at the masked patches, each in the
        order of ``nonzero`` (row by row)."""
        out = self.beit3(text_ids, images, text_mask=text_mask, masked_patches=masked_patches)
        losses = []
        if masked_text is not None:
            out.logits = self.text_head(out.hidden[:, out.image_tokens:][masked_text])
            if text_targets is not None:
                losses.append(F.cross_entropy(out.logits.float(), text_targets[masked_text]))
        if masked_patches is not None:
            out.image_logits = self.image_head(out.hidden[:, 1:out.image_tokens][masked_patches])
            if image_targets is not None:
                losses.append(F.cross_entropy(out.image_logits.float(), image_targets[masked_patches]))
        out.loss = sum(losses) if losses else None
        return out


def build_beit3(config: BEiT3Config) -> nn.Module:
    """The model for ``config.task``."""
    return {"backbone": BEiT3, "classification": BEiT3ForClassification, "retrieval": BEiT3ForRetrieval,
            "masked": BEiT3ForMaskedDataModeling}[config.task](config)
