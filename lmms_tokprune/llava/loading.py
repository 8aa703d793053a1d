"""Load a LLaVA-1.5 checkpoint (hub id or local folder) the way a user's transformers would; a folder in the original
LLaVA repository's format (full or LoRA + base) is converted in memory (`original_format`)."""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple, Union

import torch

from ..catalog import MODEL_FAMILIES
from .checkpoint_files import check_tokenizer_files, check_weight_files, first_line, looks_like_path
from .original_format import OriginalCheckpoint, inspect_original, is_original_config, load_original, raw_config

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
# auto: the pipeline the prompt style reproduces (`resolve_image_backend`)
IMAGE_BACKENDS = ("auto", "pil", "torchvision")
# The CLIP tower's dtype. auto: what the method's released evaluation ran (`resolve_vision_dtype`); float32: fp32 whatever
# the model dtype (LLaVA >= 1.2's loader never casts the tower); model: the model's dtype (transformers' / llava_hf's way).
VISION_DTYPES = ("auto", "float32", "model")


def resolve_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    """'auto' = float16 on a GPU (LLaVA's own eval), float32 on a CPU (fp16 matmuls are slow or missing there)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if str(dtype) not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(DTYPES)}")
    return DTYPES[str(dtype)]


def resolve_image_backend(choice: str, prompt_style: str) -> str:
    """`auto`: llava_v1 reproduces the original LLaVA code, whose CLIP processor is PIL's; chat_template / lmms_eval
    reproduce transformers' / lmms-eval's llava_hf, which get what AutoProcessor loads (torchvision when installed).
    The two resize slightly differently, enough to change an answer of a sensitive model."""
    if choice != "auto":
        return choice
    return "pil" if prompt_style == "llava_v1" else "torchvision"


def resolve_vision_dtype(choice: Union[str, torch.dtype], model_dtype: torch.dtype, half_tower_release: bool = False) -> torch.dtype:
    """The tower's dtype. `auto`: the dtype the method's released evaluation ran it in -- the LLaVA 1.1.x forks
    (PruMerge, Recoverable Compression, FastV: `half_tower_release`) cast it to fp16 unconditionally, so fp16 when the
    model runs in fp16; LLaVA >= 1.2 forks never cast it, so fp32 otherwise."""
    if isinstance(choice, torch.dtype):
        return choice
    if choice == "model":
        return model_dtype
    if choice == "float32" or (choice == "auto" and not (half_tower_release and model_dtype == torch.float16)):
        return torch.float32
    if choice == "auto":
        return torch.float16
    raise ValueError(f"unknown vision_dtype {choice!r}; valid: {', '.join(VISION_DTYPES)}")


def check_checkpoint(pretrained: str, model_base: Optional[str] = None) -> Any:
    """Load and check the config first, so a wrong path or a non-LLaVA model is one clear error. Returns the
    transformers config, or for an original LLaVA-repository folder its checked `OriginalCheckpoint`."""
    from transformers import AutoConfig

    from ..assets import resolve_checkpoint

    pretrained = resolve_checkpoint(pretrained)

    path = os.path.expanduser(pretrained)
    if looks_like_path(pretrained) and not os.path.isdir(path):
        raise ValueError(f"pretrained folder {pretrained!r} does not exist")
    raw = raw_config(pretrained)
    if is_original_config(raw):
        return inspect_original(pretrained, model_base, raw)
    if model_base is not None:
        raise ValueError(f"model_base={model_base!r} is only for LoRA folders in the original LLaVA-repository format; "
                         f"pretrained={pretrained!r} is a transformers checkpoint (leave model_base out)")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as err:  # transformers raises OSError / ValueError / HF errors here
        raise ValueError(f"cannot load a model config from pretrained={pretrained!r}: {str(err).splitlines()[0]}") from None
    model_type = getattr(config, "model_type", None)
    if model_type not in {f.model_type for f in MODEL_FAMILIES}:
        others = ", ".join(f"{f.model_type!r} ({f.title})" for f in MODEL_FAMILIES if f.model_type != "llava")
        raise ValueError(
            f"pretrained={pretrained!r} is a {model_type or 'unknown'!r} checkpoint; "
            f"lmms_tokprune needs a LLaVA-1.5 checkpoint (model_type 'llava', e.g. llava-hf/llava-1.5-7b-hf) or another LLaVA family: {others}"
        )
    vision_type = getattr(config.vision_config, "model_type", None)
    if vision_type not in ("clip_vision_model", "clip"):
        raise ValueError(f"pretrained={pretrained!r} has a {vision_type!r} vision tower; the LLaVA families here use CLIP")
    return config


def load_llava(
    pretrained: str,
    device: torch.device,
    dtype: Any = "auto",
    attn_implementation: Optional[str] = "sdpa",
    image_backend: str = "pil",
    vision_dtype: Union[str, torch.dtype] = "float32",
    model_base: Optional[str] = None,
) -> Tuple[torch.nn.Module, Any]:
    """Model (eval mode, on `device`) and processor with the pinned image backend; the CLIP tower in `vision_dtype`
    (a dtype, or a VISION_DTYPES name: 'auto' here means fp32, the method-specific choice is `resolve_vision_dtype`'s)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..assets import resolve_checkpoint

    pretrained = resolve_checkpoint(pretrained)

    if attn_implementation is not None and attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"unknown attn_implementation {attn_implementation!r}; valid: {', '.join(ATTN_IMPLEMENTATIONS)}")
    if image_backend not in IMAGE_BACKENDS:
        raise ValueError(f"unknown image_backend {image_backend!r}; valid: {', '.join(IMAGE_BACKENDS)}")
    image_backend = resolve_image_backend(image_backend, "llava_v1")  # a bare call: the default prompt style's
    found = check_checkpoint(pretrained, model_base)
    torch_dtype = resolve_dtype(dtype, device)
    tower_dtype = resolve_vision_dtype(vision_dtype, torch_dtype)
    if isinstance(found, OriginalCheckpoint):
        model, processor = load_original(found, torch_dtype, tower_dtype, attn_implementation, image_backend)
        return model.to(device).eval(), processor
    path = os.path.expanduser(pretrained)
    what = f"pretrained={pretrained!r}"
    check_weight_files(path, what)
    check_tokenizer_files(path, what)
    try:
        model, info = AutoModelForImageTextToText.from_pretrained(  # the family's class (Llava..., LlavaNext...)
            path, dtype=torch_dtype, attn_implementation=attn_implementation, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{what}: cannot load the model weights from {path}: {first_line(err)}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would silently initialise them at random
        raise ValueError(f"pretrained={pretrained!r} lacks {len(missing)} weight tensors (e.g. {missing[0]}); the checkpoint is incomplete")
    video = getattr(model.config, "model_type", "") == "video_llava"
    for tower in (model.model.image_tower, model.model.video_tower) if video else (model.model.vision_tower,):
        tower.to(tower_dtype)
    model.to(device).eval()
    try:
        # Video-LLaVA: the processor lmms-eval's video_llava loads (its video processor exists for torchvision only)
        processor = AutoProcessor.from_pretrained(path) if video else AutoProcessor.from_pretrained(path, backend=image_backend)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"{what}: cannot load the processor (tokenizer + image processor) from {path}: {first_line(err)}") from None
    processor.tokenizer.padding_side = "left"
    return model, processor
