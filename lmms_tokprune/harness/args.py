"""model_args for the lmms-eval wrappers: coercion, validation and `config=` YAML files.

lmms-eval type-guesses values (`1` -> int, `-1` -> float, `true` -> bool, the rest str), so every
value is coerced to its declared type here; a typo in a key is an error listing the valid keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional

import yaml

from ..llava.loading import ATTN_IMPLEMENTATIONS, IMAGE_BACKENDS
from ..llava.prompts import PROMPT_STYLES
from ..methods import get_method, method_names, resolve_params
from ..methods.registry import VARIANTS

DEFAULT_PRETRAINED = "llava-hf/llava-1.5-7b-hf"
DEFAULT_TEXT_ENCODER = "openai/clip-vit-large-patch14-336"
TEXT_SOURCES = ("question", "reference")

# model id -> preset method (None: generic, method= required or 'none')
MODEL_IDS: Dict[str, Optional[str]] = {
    "llava_tokprune": None,
    "llava_recover": "recover",
    "llava_prumerge": "prumerge",
    "llava_prumerge_plus": "prumerge_plus",
    "llava_longtail": "longtail",
}


@dataclass
class ModelArgs:
    """Common options of every wrapper (method hyper-parameters are kept apart in `method_params`)."""

    pretrained: str = DEFAULT_PRETRAINED
    method: str = "none"
    variant: str = "fixed"
    prompt_style: str = "llava_v1"
    pad_to_square: bool = True
    text_encoder: str = DEFAULT_TEXT_ENCODER
    text_source: str = "question"
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    image_backend: str = "pil"
    device: Optional[str] = None
    batch_size: int = 1
    max_new_tokens: Optional[int] = None
    measure_latency: bool = False
    config: Optional[str] = None
    method_params: Dict[str, Any] = field(default_factory=dict)


_BOOL_KEYS = {"pad_to_square", "measure_latency"}
_INT_KEYS = {"batch_size", "max_new_tokens"}
_CHOICES = {
    "variant": VARIANTS,
    "prompt_style": PROMPT_STYLES,
    "attn_implementation": ATTN_IMPLEMENTATIONS,
    "image_backend": IMAGE_BACKENDS,
    "text_source": TEXT_SOURCES,
}
# lmms-eval passes these from its own CLI; accepted and ignored where meaningless for us.
_HARNESS_KEYS = {"max_batch_size", "device_map"}


def _coerce_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ValueError(f"model_args {key}={value!r} must be true or false")


def _coerce_int(key: str, value: Any) -> int:
    if isinstance(value, str) and value.strip().lower() == "auto" and key == "batch_size":
        raise ValueError("batch_size=auto is not supported; give an integer batch size")
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"model_args {key}={value!r} must be an integer") from None
    if not as_float.is_integer() or as_float < 1:
        raise ValueError(f"model_args {key}={value!r} must be an integer >= 1")
    return int(as_float)


def load_config_model_args(path: str) -> Dict[str, Any]:
    """The `model` and `model_args` of a model_configs YAML (an lmms-eval --config file)."""
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    with open(path) as fh:
        data = yaml.safe_load(fh)
    if isinstance(data, list):
        if len(data) != 1:
            raise ValueError(f"config file {path!r} holds {len(data)} runs; pass a file with one run")
        data = data[0]
    if not isinstance(data, dict):
        raise ValueError(f"config file {path!r} is not a mapping")
    from lmms_eval.utils import simple_parse_args_string

    raw = data.get("model_args", "")
    args = dict(raw) if isinstance(raw, dict) else simple_parse_args_string(str(raw))
    if "model" in data:
        args["__model__"] = data["model"]
    return args


def parse_model_args(model_id: str, raw: Mapping[str, Any]) -> ModelArgs:
    """Validate and coerce lmms-eval model_args for the wrapper `model_id`."""
    raw = {k: v for k, v in raw.items() if k not in _HARNESS_KEYS}
    preset = MODEL_IDS.get(model_id)
    if "config" in raw and raw["config"] is not None:
        from_file = load_config_model_args(str(raw["config"]))
        file_model = from_file.pop("__model__", None)
        if file_model is not None and file_model != model_id and MODEL_IDS.get(file_model) != preset:
            raise ValueError(f"config {raw['config']!r} is for model {file_model!r}, not {model_id!r}")
        raw = {**from_file, **raw}  # explicit model_args win over the file
    args = ModelArgs()
    common = {f.name for f in fields(ModelArgs)} - {"method_params"}
    method = raw.get("method", preset or "none")
    if preset is not None and method != preset:
        raise ValueError(f"{model_id} runs method {preset!r}; use --model llava_tokprune with method={method} instead")
    if method not in method_names():
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(method_names())}")
    spec = get_method(method)
    method_params: Dict[str, Any] = {}
    for key, value in raw.items():
        if key in common:
            if key in _BOOL_KEYS:
                value = _coerce_bool(key, value)
            elif key in _INT_KEYS:
                value = None if value is None else _coerce_int(key, value)
            elif value is not None:
                value = str(value)
            if key in _CHOICES and value not in _CHOICES[key]:
                raise ValueError(f"model_args {key}={value!r} is not valid; choose one of {', '.join(_CHOICES[key])}")
            setattr(args, key, value)
        elif key in spec.params:
            method_params[key] = value
        else:
            valid = sorted(common) + sorted(spec.params)
            raise ValueError(f"unknown model_args key {key!r} for {model_id} (method {method}); valid keys: {', '.join(valid)}")
    args.method = method
    # Validate now (at load time, not mid-run): types, ranges, budget vs ratio.
    args.method_params = {k: v for k, v in resolve_params(method, args.variant, **method_params).items() if k in method_params}
    return args
