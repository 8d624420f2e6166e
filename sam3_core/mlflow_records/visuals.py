"""Predicted masks drawn on a frame, the picture a reviewer looks at first in MLflow."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

# Distinct, colour-blind friendly (Okabe-Ito); instances cycle through it.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
)


def draw_masks(
    image: Image.Image, masks: Sequence[np.ndarray], labels: Sequence[str] = (), alpha: float = 0.5
) -> Image.Image:
    """A copy of `image` with each HxW boolean mask tinted in its own colour and labelled.

    A label is written at the top-left corner of its mask's bounding box; empty masks are skipped.
    """
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    boolean = [np.asarray(mask, dtype=bool) for mask in masks]
    for index, mask in enumerate(boolean):
        if mask.shape != base.shape[:2]:
            raise ValueError(f"mask {index} has shape {mask.shape}, the image is {base.shape[:2]}")
        colour = np.array(PALETTE[index % len(PALETTE)], dtype=np.float32)
        base[mask] = (1 - alpha) * base[mask] + alpha * colour
    out = Image.fromarray(base.round().astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for mask, label in zip(boolean, labels, strict=False):
        ys, xs = np.nonzero(mask)
        if len(xs):
            draw.text(
                (int(xs.min()), int(ys.min())), label, fill=(255, 255, 255), stroke_width=1, stroke_fill=(0, 0, 0)
            )
    return out
