"""Load a LLaVA-1.5 checkpoint (hub id or local folder) the way a user's transformers would."""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
IMAGE_BACKENDS = ("pil", "torchvision")
# float32: the CLIP tower stays in fp32 whatever the model dtype, as LLaVA-1.5's released evaluation runs it (its
# loader never casts the tower); "model": the tower in the model's dtype (transformers' / lmms-eval's llava_hf way).
VISION_DTYPES = ("float32", "model")


def resolve_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    """'auto' = float16 on a GPU (LLaVA's own eval), float32 on a CPU (fp16 matmuls are slow or missing there)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if str(dtype) not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(DTYPES)}")
    return DTYPES[str(dtype)]


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1] or os.path.exists(name)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def check_weight_files(folder: str, what: str) -> None:
    """Every safetensors file of a local checkpoint folder has a readable header covering the file: a truncated
    or garbage file is a ValueError naming the folder and the file (transformers' own error names neither)."""
    from safetensors import safe_open

    root = os.path.expanduser(folder)
    if not os.path.isdir(root):
        return  # a hub id: transformers resolves and reports it
    for name in sorted(os.listdir(root)):
        if not name.endswith(".safetensors"):
            continue
        try:
            with safe_open(os.path.join(root, name), framework="pt") as fh:
                fh.keys()
        except Exception as err:  # SafetensorError, OSError
            raise ValueError(f"{what}: {os.path.join(root, name)} is not a readable safetensors file ({first_line(err)}); "
                             "the checkpoint folder is damaged (re-download or re-save it)") from None


def check_tokenizer_files(folder: str, what: str) -> None:
    root = os.path.expanduser(folder)
    if os.path.isdir(root) and not any(os.path.isfile(os.path.join(root, n)) for n in TOKENIZER_FILES):
        raise ValueError(f"{what}: the folder {root} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")


def check_checkpoint(pretrained: str) -> Any:
    """Load and check the config first, so a wrong path or a non-LLaVA model is one clear error."""
    from transformers import AutoConfig

    from ..assets import resolve_checkpoint

    pretrained = resolve_checkpoint(pretrained)

    path = os.path.expanduser(pretrained)
    if looks_like_path(pretrained) and not os.path.isdir(path):
        raise ValueError(f"pretrained folder {pretrained!r} does not exist")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as err:  # transformers raises OSError / ValueError / HF errors here
        raise ValueError(f"cannot load a model config from pretrained={pretrained!r}: {str(err).splitlines()[0]}") from None
    if getattr(config, "model_type", None) != "llava":
        raise ValueError(
            f"pretrained={pretrained!r} is a {getattr(config, 'model_type', 'unknown')!r} checkpoint; "
            "lmms_tokprune needs a LLaVA-1.5 checkpoint (model_type 'llava', e.g. llava-hf/llava-1.5-7b-hf)"
        )
    vision_type = getattr(config.vision_config, "model_type", None)
    if vision_type not in ("clip_vision_model", "clip"):
        raise ValueError(f"pretrained={pretrained!r} has a {vision_type!r} vision tower; LLaVA-1.5 uses CLIP")
    return config


def load_llava(
    pretrained: str,
    device: torch.device,
    dtype: Any = "auto",
    attn_implementation: Optional[str] = "sdpa",
    image_backend: str = "pil",
    vision_dtype: str = "float32",
) -> Tuple[torch.nn.Module, Any]:
    """Model (eval mode, on `device`) and processor with the pinned image backend."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from ..assets import resolve_checkpoint

    pretrained = resolve_checkpoint(pretrained)

    if attn_implementation is not None and attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"unknown attn_implementation {attn_implementation!r}; valid: {', '.join(ATTN_IMPLEMENTATIONS)}")
    if image_backend not in IMAGE_BACKENDS:
        raise ValueError(f"unknown image_backend {image_backend!r}; valid: {', '.join(IMAGE_BACKENDS)}")
    check_checkpoint(pretrained)
    path = os.path.expanduser(pretrained)
    what = f"pretrained={pretrained!r}"
    check_weight_files(path, what)
    check_tokenizer_files(path, what)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        model, info = LlavaForConditionalGeneration.from_pretrained(
            path, dtype=torch_dtype, attn_implementation=attn_implementation, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{what}: cannot load the model weights from {path}: {first_line(err)}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would silently initialise them at random
        raise ValueError(f"pretrained={pretrained!r} lacks {len(missing)} weight tensors (e.g. {missing[0]}); the checkpoint is incomplete")
    if vision_dtype not in VISION_DTYPES:
        raise ValueError(f"unknown vision_dtype {vision_dtype!r}; valid: {', '.join(VISION_DTYPES)}")
    if vision_dtype == "float32":
        model.model.vision_tower.to(torch.float32)
    model.to(device).eval()
    try:
        processor = AutoProcessor.from_pretrained(path, backend=image_backend)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"{what}: cannot load the processor (tokenizer + image processor) from {path}: {first_line(err)}") from None
    processor.tokenizer.padding_side = "left"
    return model, processor
