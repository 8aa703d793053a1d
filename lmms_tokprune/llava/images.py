"""Image preparation exactly as LLaVA-1.5's own evaluation does it, pinned to one CPU code path.

LLaVA's eval pads every image to a square canvas filled with the processor's mean colour
(`int(255 * mean)` per channel), centred, before CLIP's processor resizes it to 336. The pixel
pipeline always runs on the CPU with a fixed backend, so a GPU run sees the same pixels.
"""

from __future__ import annotations

from typing import Any, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

MIN_SIDE = 1  # PIL refuses 0-sized images; anything >= 1 px is upsampled by the processor


def to_rgb(image: Any) -> Image.Image:
    """Accept PIL images (any mode), numpy HxW / HxWxC arrays; return an RGB PIL image.

    Grayscale and palette images are expanded and RGBA drops its alpha channel, as
    `Image.open(...).convert("RGB")` does in LLaVA's own scripts.
    """
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            if not np.isfinite(arr).all():
                raise ValueError("image array contains NaN or inf")
            arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(arr)
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image or numpy array as visual input, got {type(image).__name__}")
    if image.width < MIN_SIDE or image.height < MIN_SIDE:
        raise ValueError(f"image of size {image.width}x{image.height} is empty")
    return image if image.mode == "RGB" else image.convert("RGB")


def background_colour(mean: Sequence[float]) -> Tuple[int, int, int]:
    """LLaVA's padding colour: tuple(int(x * 255) for x in image_processor.image_mean)."""
    return tuple(int(x * 255) for x in mean)  # type: ignore[return-value]


def expand_to_square(image: Image.Image, colour: Tuple[int, int, int]) -> Image.Image:
    """LLaVA's expand2square: paste the image centred on a square canvas of its longer side."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), colour)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class ImagePreparer:
    """Turns a list of raw visuals into pixel_values [n, 3, H, W] with the pinned processor."""

    def __init__(self, image_processor: Any, pad_to_square: bool) -> None:
        self.image_processor = image_processor
        self.pad_to_square = pad_to_square
        self.colour = background_colour(image_processor.image_mean)

    def prepare(self, images: List[Any]) -> torch.Tensor:
        rgb = [to_rgb(im) for im in images]
        if self.pad_to_square:
            rgb = [expand_to_square(im, self.colour) for im in rgb]
        out = self.image_processor(images=rgb, return_tensors="pt")
        return out["pixel_values"]
