"""The one way to open a configured engine: validated options -> model, processor, text guide, engine.

The harness, `visualize` and `bench` all call `open_engine`, so what they run (and measure) is the same
path. The engine class follows the method's stage (the catalog): pre-projector methods use
`CompressedLlava` as is; methods that prune inside the LLM run `PrunedLLMLlava` (the one decoder loop), and the
long-tail method, which also prunes inside CLIP, its subclass.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..catalog import STAGE_IN_CLIP_AND_LLM, STAGE_IN_LLM
from .engine import CompressedLlava
from .families import FamilyOptions, open_family
from .llm_engine import PrunedLLMLlava
from .loading import load_llava, resolve_dtype, resolve_image_backend, resolve_vision_dtype
from .longtail_engine import LongtailLlava
from .options import EngineOptions

ENGINES = {STAGE_IN_CLIP_AND_LLM: LongtailLlava, STAGE_IN_LLM: PrunedLLMLlava}


def default_device(options: EngineOptions) -> torch.device:
    if options.device is not None:
        return torch.device(options.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def open_engine(options: EngineOptions, device: Optional[torch.device] = None, model: Optional[torch.nn.Module] = None,
                processor: Optional[Any] = None, text_guide: Optional[Any] = None) -> CompressedLlava:
    """An engine for `options`. Pass `model` + `processor` (already on `device`) to reuse a loaded model, and
    `text_guide` to reuse a CLIP text encoder; what is not given is loaded from the options."""
    device = device or default_device(options)
    if model is None or processor is None:
        model_dtype = resolve_dtype(options.dtype, device)
        tower_dtype = resolve_vision_dtype(options.vision_dtype, model_dtype, options.method.release_half_tower)
        model, processor = load_llava(options.pretrained, device, model_dtype, options.attn_implementation,
                                      resolve_image_backend(options.image_backend, options.prompt_style), tower_dtype, options.model_base)
    family = open_family(model, processor, FamilyOptions(options.prompt_style, options.pad_to_square, options.budget_scope,
                                                         options.budget_split, options.given))
    family.check_loadable(options.method)  # what the family cannot serve fails before anything else loads
    if text_guide is None and options.method.spec.needs_text_encoder:
        from .text_guide import load_text_guide  # only text-guided methods need the CLIP text tower

        text_guide = load_text_guide(options.text_encoder, model, device, options.text_source)
    engine_class = ENGINES.get(options.method.stage, CompressedLlava)
    return engine_class(model, processor, options.method, text_guide=text_guide, measure_latency=options.measure_latency, family=family)
