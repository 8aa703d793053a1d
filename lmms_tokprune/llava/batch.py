"""The data that flows through an engine call: requests in, prepared LLM inputs, per-sample results out.

Kept apart from the engines so that every engine (and the harness) imports the same types and nothing is
passed around by the side: what a call measured or decided comes back in its result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional

import torch

from ..methods import CompressedImage


class DocumentError(ValueError):
    """One document cannot be prepared (undecodable image, prompt longer than the LLM's context, ...): the
    harness answers it with an empty string and goes on with the others."""


@dataclass
class Sample:
    """One request: the lmms-eval context (question), its images, and stable per-image keys."""

    context: str
    images: List[Any]
    image_keys: List[int] = field(default_factory=list)


@dataclass
class SampleStats:
    """What one sample cost: token counts, FLOPs, latency and the method's own details."""

    visual_tokens_in: int
    visual_tokens_kept: int  # visual tokens entering the last decoder layer
    llm_prefill_tokens: float  # layer-averaged when the LLM prunes inside
    visual_tokens_equivalent: Optional[float] = None  # visual tokens per decoder layer, averaged over the layers (input counting)
    output_tokens: int = 0
    layer_lengths: Optional[List[int]] = None  # per decoder layer (None: llm_prefill_tokens at every layer)
    layout_tokens: int = 0  # tokens the LLM receives that are not patches (NeXT newlines); never pruned by fixed
    units: int = 0  # CLIP passes (LLaVA-1.5: the images; NeXT: base images + crops)
    prefill_tflops: Optional[float] = None
    latency: Dict[str, float] = field(default_factory=dict)  # filled when measuring (per batch)
    details: Optional[Any] = None  # what an in-CLIP / in-LLM stage did to this sample (e.g. LongtailDetails)


@dataclass
class ImageTokens:
    """One image's tokens for the LLM (what a family's re-assembly gives), in sequence order: projected features, which
    of them are layout tokens, and how many are patch-derived (kept, merged, extra)."""

    features: torch.Tensor  # [M, H] in the LLM's dtype
    layout: Optional[torch.Tensor] = None  # [M] bool (NeXT newlines), None = none
    visual: int = 0
    layout_count: int = 0
    image_tokens_in: int = 0  # patch tokens the uncompressed model gives this image (what in-LLM budgets are per)


@dataclass
class LLMInputs:
    """Left-padded LLM inputs of a batch with a different number of visual tokens per sample."""

    inputs_embeds: torch.Tensor  # [B, T, H]
    attention_mask: torch.Tensor  # [B, T] long, 0 on the left padding
    image_mask: torch.Tensor  # [B, T] bool, the visual (patch-derived) slots
    lengths: List[int]  # real (unpadded) length per sample
    layout_mask: Optional[torch.Tensor] = None  # [B, T] bool, layout slots (NeXT newlines); None when the batch has none
    image_tokens: Optional[List[List[int]]] = None  # per sample, the patch tokens each of its images has entering the LLM


class CompressResult(NamedTuple):
    """The compressed images of one CLIP + method call and the method's own time (ms, 0 when not measured)."""

    images: List[CompressedImage]
    compress_ms: float = 0.0


@dataclass
class PreparedBatch:
    llm: LLMInputs
    stats: List[SampleStats]
    compressed: List[List[CompressedImage]]  # per sample, per image
    compress_ms: float = 0.0  # the method's time before the LLM (when measured)
    cut_ms: float = 0.0  # the method's time inside the LLM prefill (its cuts; when measured)


class BatchOutput(NamedTuple):
    """New token ids per sample (EOS and padding cut) and each sample's stats."""

    tokens: List[List[int]]
    stats: List[SampleStats]
