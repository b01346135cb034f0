"""Synthetic images of coloured shapes with captions, drawn offline (PIL), deterministic for a seed: the data
of ``scaleformer train --task shapes``, BEiT-3's CPU demo.

Each example is one shape on a noisy grey background: a shape (circle, square, triangle, cross), a colour
(red, green, blue, yellow), a size (small, large) and a side (left, right), so 64 distinct scenes. The
caption says all four, in a fixed 8-word template over a 17-word vocabulary:

    [cls] a large red circle on the left

The class label is (shape, colour): 16 classes, chance 1/16. Retrieval matches images and captions, so it
also has to read size and side: among N pairs a caption is right for about N/64 images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["SHAPES", "COLOURS", "SIZES", "SIDES", "WORDS", "Shapes", "make_shapes", "encode_caption"]

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (215, 45, 40), "green": (45, 170, 65), "blue": (50, 85, 215), "yellow": (225, 205, 45)}
SIZES = ("small", "large")
SIDES = ("left", "right")
WORDS = ("[pad]", "[cls]", "a", *SIZES, *COLOURS, *SHAPES, "on", "the", *SIDES)
_INDEX = {word: i for i, word in enumerate(WORDS)}


@dataclass(frozen=True)
class Shapes:
    images: Tensor  # (N, 3, S, S) float32, normalised as BEiT-3 expects: (pixel / 255 - 0.5) / 0.5
    labels: Tensor  # (N,) long: shape × 4 + colour, 16 classes
    text_ids: Tensor  # (N, 8) long caption ids over WORDS
    captions: tuple[str, ...]
    scenes: Tensor  # (N,) long: which of the 64 scenes (label × 4 + size × 2 + side); equal scenes, equal captions

    @property
    def classes(self) -> int:
        return len(SHAPES) * len(COLOURS)


def encode_caption(caption: str) -> list[int]:
    try:
        return [_INDEX[word] for word in caption.split()]
    except KeyError as error:
        raise ValueError(f"caption {caption!r}: word {error} is not in the shapes vocabulary {WORDS}") from None


def make_shapes(count: int, *, img_size: int = 32, seed: int = 0) -> Shapes:
    """``count`` examples drawn with a generator seeded by ``seed``."""
    from PIL import Image, ImageDraw

    if count < 1 or img_size < 16:
        raise ValueError(f"make_shapes needs count >= 1 and img_size >= 16, got {count} and {img_size}")
    rng = np.random.default_rng(seed)
    scale = 4  # drawn at 4x and downsampled: smooth edges
    big = img_size * scale
    images, labels, ids, captions, scenes = [], [], [], [], []
    colour_names = list(COLOURS)
    for _ in range(count):
        shape, colour, size, side = (int(rng.integers(n)) for n in (len(SHAPES), len(COLOURS), len(SIZES), len(SIDES)))
        radius = big * (rng.uniform(0.09, 0.13) if size == 0 else rng.uniform(0.19, 0.24))
        cx = big * (0.25 if side == 0 else 0.75) + rng.uniform(-0.05, 0.05) * big
        cy = big * rng.uniform(0.3, 0.7)
        canvas = Image.new("RGB", (big, big), tuple(int(v) for v in rng.integers(100, 156, 3)))
        draw = ImageDraw.Draw(canvas)
        fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[colour_names[colour]])
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if SHAPES[shape] == "circle":
            draw.ellipse(box, fill=fill)
        elif SHAPES[shape] == "square":
            draw.rectangle((cx - radius * 0.85, cy - radius * 0.85, cx + radius * 0.85, cy + radius * 0.85), fill=fill)
        elif SHAPES[shape] == "triangle":
            draw.polygon([(cx, cy - radius), (cx - radius, cy + radius * 0.8), (cx + radius, cy + radius * 0.8)], fill=fill)
        else:  # cross
            arm = radius * 0.3
            draw.rectangle((cx - radius, cy - arm, cx + radius, cy + arm), fill=fill)
            draw.rectangle((cx - arm, cy - radius, cx + arm, cy + radius), fill=fill)
        pixels = np.asarray(canvas.resize((img_size, img_size), Image.Resampling.BOX), dtype=np.float32)
        pixels = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255) / 255.0
        images.append((pixels.transpose(2, 0, 1) - 0.5) / 0.5)
        caption = f"[cls] a {SIZES[size]} {colour_names[colour]} {SHAPES[shape]} on the {SIDES[side]}"
        label = shape * len(COLOURS) + colour
        labels.append(label)
        captions.append(caption)
        ids.append(encode_caption(caption))
        scenes.append(label * 4 + size * 2 + side)
    return Shapes(images=torch.from_numpy(np.stack(images).astype(np.float32)), labels=torch.tensor(labels),
                  text_ids=torch.tensor(ids), captions=tuple(captions), scenes=torch.tensor(scenes))
