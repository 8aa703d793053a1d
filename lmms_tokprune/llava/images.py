"""Image preparation exactly as LLaVA-1.5's own evaluation does it, pinned to one CPU code path.

LLaVA's eval pads every image to a square canvas filled with the processor's mean colour
(`int(255 * mean)` per channel), centred, before CLIP's processor resizes it to 336. The pixel
pipeline always runs on the CPU with a fixed backend, so a GPU run sees the same pixels.
"""

from __future__ import annotations

import io
import os
from typing import Any, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

MIN_SIDE = 1  # PIL refuses 0-sized images; anything >= 1 px is upsampled by the processor
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # more than 8 bits per pixel: PIL's convert("RGB") clips them


def to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit / 32-bit / float single-channel image -> mode L, stretched over its own value range.

    PIL's convert("RGB") clips such images at 255, so a 16-bit scan becomes all white; LLaVA's CLIP
    expects 8-bit intensities, and the value range is what a viewer shows. A constant image becomes black.
    """
    arr = np.asarray(image, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{image.mode} image contains NaN or inf")
    lo, hi = float(arr.min()), float(arr.max())
    scaled = np.zeros(arr.shape, dtype=np.uint8) if hi <= lo else np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    return Image.fromarray(scaled)  # uint8 2-D -> mode L


def check_complete(image: Any) -> None:
    """Decode the image's source again with truncated images refused; a truncated file is a ValueError.

    lmms-eval sets PIL's LOAD_TRUNCATED_IMAGES globally, so a truncated file decodes without an error and the
    missing part is filled in: the model would be scored on a partly grey image. The source is the file the
    image was opened from, or its stream while it is not decoded yet. An image decoded from memory (PIL drops
    the stream after decoding, e.g. datasets' images) or made in memory (a convert() / copy() result) carries
    no source and cannot be checked.
    """
    if not isinstance(image, Image.Image):
        return
    name = getattr(image, "filename", "") or ""
    stream = getattr(image, "fp", None)
    if name and os.path.isfile(name):
        source: Any = name
    elif stream is not None and not getattr(stream, "closed", False) and hasattr(stream, "seek"):
        position = stream.tell()
        stream.seek(0)
        source = io.BytesIO(stream.read())
        stream.seek(position)
        name = "<in-memory image>"
    else:
        return
    allowed = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(source) as again:
            again.load()
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise ValueError(f"image {name} cannot be decoded completely ({err})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = allowed


def to_rgb(image: Any) -> Image.Image:
    """Accept PIL images (any mode), numpy HxW / HxWxC arrays; return an RGB PIL image.

    Grayscale and palette images are expanded and RGBA drops its alpha channel, as
    `Image.open(...).convert("RGB")` does in LLaVA's own scripts; 16-bit and float images are first
    stretched to 8 bits over their value range (`to_8bit`).
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
    if image.mode in WIDE_MODES:
        image = to_8bit(image)
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
