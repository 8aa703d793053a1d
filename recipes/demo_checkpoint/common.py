"""Shared pieces of the demo-checkpoint recipe: sizes, tokenizers, pixels, logging."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import List

import numpy as np
import torch

from lmms_tokprune.testing import tiny
from lmms_tokprune.testing.tiny import CLIP_MEAN, CLIP_STD, clip_vision_config

from ..shapes_vqa import FAMILIES, corpus_sentences, render


@dataclass
class Sizes:
    """Model sizes of the demo checkpoint (LLaVA-1.5 geometry: 336 px, patch 14, CLS + 576 tokens)."""

    vit_width: int = 128
    vit_layers: int = 4
    vit_heads: int = 4
    text_width: int = 128
    text_layers: int = 2
    projection_dim: int = 64
    llm_width: int = 160
    llm_layers: int = 3
    llm_heads: int = 5
    llm_intermediate: int = 432

    def as_dict(self) -> dict:
        return asdict(self)


def vision_config(s: Sizes) -> dict:
    """CLIPVisionConfig kwargs of the demo ViT (``model_type`` dropped: CLIPConfig nests it itself)."""
    cfg = clip_vision_config(s.vit_width, 4 * s.vit_width, s.vit_layers, s.vit_heads, s.projection_dim)
    cfg.pop("model_type")
    return cfg


def clip_tokenizer():
    return tiny.clip_tokenizer(vocab_size=900, extra_corpus=tuple(corpus_sentences()))


def llama_tokenizer():
    return tiny.llama_tokenizer(vocab_size=640, extra_corpus=tuple(corpus_sentences()))


def image_processor():
    return tiny.image_processor()


_MEAN = np.asarray(CLIP_MEAN, dtype=np.float32)[:, None, None]
_STD = np.asarray(CLIP_STD, dtype=np.float32)[:, None, None]


def pixels(images) -> torch.Tensor:
    """[B, 3, 336, 336] CLIP-normalised pixels of 336x336 RGB images (== the CLIP image processor's output)."""
    arrs = [(np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0 - _MEAN) / _STD for im in images]
    return torch.from_numpy(np.stack(arrs))


def scene_pixels(scenes) -> torch.Tensor:
    return pixels([render(s) for s in scenes])


def vit_blocks(layers, h: torch.Tensor) -> torch.Tensor:
    """Run CLIP encoder blocks in order (no attention mask): training needs block outputs HF does not return."""
    for layer in layers:
        h = layer(h, None)
        h = h[0] if isinstance(h, tuple) else h
    return h


def penultimate_tokens(vision_model, pix: torch.Tensor) -> torch.Tensor:
    """[B, 1 + 576, D]: the output of the second-to-last ViT block (LLaVA's ``vision_feature_layer=-2``), CLS first."""
    return vit_blocks(vision_model.encoder.layers[:-1], vision_model.pre_layrnorm(vision_model.embeddings(pix)))


class Log:
    def __init__(self, path=None):
        self.t0 = time.time()
        self.path = path

    def __call__(self, msg: str) -> None:
        line = f"[{time.time() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as fh:
                fh.write(line + "\n")


def family_list() -> List[str]:
    return list(FAMILIES)
