"""LLaVA-1.5 (transformers `model_type` 'llava', and original LLaVA-repository folders converted into it): one unit per
image (CLIP ViT-L/14-336: CLS + 24 x 24 patches), the image padded to a square with the mean colour first
(`pad_to_square`, LLaVA's eval), the compressed tokens of an image go to the LLM as they come, no layout tokens."""

from __future__ import annotations

from typing import Any, List, Sequence

import torch

from ...methods import CompressedImage
from ..batch import ImageTokens
from ..images import ImagePreparer
from .base import Family, ImageUnits, UnitBatch


class Llava15(Family):
    name = "llava15"
    own_options = frozenset({"pad_to_square"})
    per_image_llm_counts = False

    def __init__(self, model: torch.nn.Module, processor: Any, options: Any = None) -> None:
        super().__init__(model, processor, options)
        self.images = ImagePreparer(processor.image_processor, self.options.pad_to_square)

    def units(self, images: Sequence[Any]) -> UnitBatch:
        images = list(images)
        pixel_values = self.images.prepare(images) if images else torch.zeros(0)
        n = self.num_patches
        return UnitBatch(pixel_values, [ImageUnits(1, n, size=getattr(im, "size", None)) for im in images], self.layout)

    def plan_image(self, image: Any) -> ImageUnits:
        return ImageUnits(1, self.num_patches, size=getattr(image, "size", None))

    def assemble(self, batch: UnitBatch, compressed: Sequence[CompressedImage], projected: Sequence[torch.Tensor]) -> List[ImageTokens]:
        n = self.num_patches
        return [ImageTokens(p, None, c.num_tokens, image_tokens_in=n) for c, p in zip(compressed, projected)]
