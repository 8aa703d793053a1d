"""Test helpers: tiny offline LLaVA-1.5-shaped checkpoints (see :mod:`lmms_tokprune.testing.tiny`)."""

from .tiny import (
    CLIP_MEAN,
    CLIP_STD,
    LLAVA_CHAT_TEMPLATE,
    LLAVA_SYSTEM_PROMPT,
    TINY_VERSION,
    build_tiny_clip_text_encoder,
    build_tiny_llava,
    cache_root,
    tiny_clip_dir,
    tiny_llava_dir,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "LLAVA_CHAT_TEMPLATE",
    "LLAVA_SYSTEM_PROMPT",
    "TINY_VERSION",
    "build_tiny_clip_text_encoder",
    "build_tiny_llava",
    "cache_root",
    "tiny_clip_dir",
    "tiny_llava_dir",
]
