"""Efficiency: analytic FLOPs of LLaVA-1.5 / LLaVA-NeXT inference (prefill, decode, vision tower per unit, projector)."""

from .flops import (
    PRESETS,
    LlavaFlopsConfig,
    ProjectorConfig,
    TextConfig,
    VisionConfig,
    clip_units,
    flops_report,
    from_llava_config,
    llava_config_for,
    llm_decode_flops,
    llm_prefill_flops,
    prefill_tflops_for,
    preset,
    projector_flops,
    vision_blocks_for,
    vision_flops,
)

__all__ = [
    "PRESETS",
    "LlavaFlopsConfig",
    "ProjectorConfig",
    "TextConfig",
    "VisionConfig",
    "clip_units",
    "flops_report",
    "from_llava_config",
    "llava_config_for",
    "llm_decode_flops",
    "llm_prefill_flops",
    "prefill_tflops_for",
    "preset",
    "projector_flops",
    "vision_blocks_for",
    "vision_flops",
]
