"""Images to model inputs without torchvision (which does not install beside the pinned CPU torch): PIL for
decoding and resampling, numpy for the rest.

BEiT-3's evaluation transform, which :func:`image_tensor` reproduces: resize with bicubic resampling (the
shorter side to ``size / crop_fraction``, then a centred ``size`` × ``size`` crop; or, with
``crop_fraction=1``, straight to ``size`` × ``size``), scale pixels to [0, 1], then normalise each channel
by ``(x − mean) / std`` with BEiT-3's mean = std = 0.5 (so pixels land in [−1, 1]).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["BEIT3_MEAN", "BEIT3_STD", "load_image", "image_tensor", "image_batch"]

BEIT3_MEAN = (0.5, 0.5, 0.5)
BEIT3_STD = (0.5, 0.5, 0.5)


def _pil():
    try:
        from PIL import Image
    except ImportError as error:  # pragma: no cover - Pillow comes with the vision extra
        raise ImportError("images need Pillow: pip install 'scaleformer[vision]' (or pip install pillow)") from error
    return Image


def load_image(path: str | os.PathLike):
    """An RGB PIL image from a file; one clear error for a file that is not an image."""
    image_module = _pil()
    try:
        with image_module.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable image ({type(error).__name__}: {error})") from None


def image_tensor(image, size: int, *, crop_fraction: float = 1.0, mean: Sequence[float] = BEIT3_MEAN,
                 std: Sequence[float] = BEIT3_STD) -> Tensor:
    """A PIL image (or a path) -> float32 (3, size, size), resized, cropped and normalised (module docstring)."""
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    image = image.convert("RGB")
    bicubic = _pil().Resampling.BICUBIC
    if crop_fraction == 1.0:
        image = image.resize((size, size), bicubic)
    else:
        shorter = round(size / crop_fraction)
        width, height = image.size
        scale = shorter / min(width, height)
        image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), bicubic)
        left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
    pixels = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    pixels = (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def image_batch(images: Sequence, size: int, **options) -> Tensor:
    """(B, 3, size, size) from PIL images or paths."""
    return torch.stack([image_tensor(image, size, **options) for image in images])
