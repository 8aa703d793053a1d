"""The one validation step for engine options: raw values (lmms-eval model_args, YAML, CLI) -> a frozen,
fully typed `EngineOptions` holding a bound method. Nothing downstream re-validates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

from ..catalog import BOTH_VARIANTS
from ..coerce import is_none_word, to_bool, to_int
from ..methods import BoundMethod, bind, get_method, method_names
from ..methods.registry import did_you_mean
from .families import BUDGET_SCOPES, BUDGET_SPLITS
from .loading import ATTN_IMPLEMENTATIONS, DTYPES, IMAGE_BACKENDS, VISION_DTYPES
from .prompts import PROMPT_STYLES

DEFAULT_PRETRAINED = "llava-hf/llava-1.5-7b-hf"
DEFAULT_TEXT_ENCODER = "openai/clip-vit-large-patch14-336"
TEXT_SOURCES = ("question", "reference")


@dataclass(frozen=True)
class Option:
    """One option: its type (bool, int or str), default, allowed values and an extra check of the raw value
    (returns the whole error message, or None)."""

    name: str
    kind: type
    default: Any
    choices: Optional[Tuple[str, ...]] = None
    check: Optional[Callable[[Any], Optional[str]]] = None


def coerce_option(opt: Option, value: Any) -> Any:
    """A raw value -> the option's type; ValueError("model_args key=value ...") naming the problem."""
    if value is None:
        return None
    if isinstance(value, str) and not value.strip():
        raise ValueError(f"model_args {opt.name}= is empty; give a value or leave the key out (default {opt.default!r})")
    if opt.default is None and is_none_word(value):
        return None
    if opt.kind is bool:
        try:
            value = to_bool(value)
        except ValueError:
            raise ValueError(f"model_args {opt.name}={value!r} must be true or false") from None
    elif opt.kind is int:
        if opt.check is not None:
            problem = opt.check(value)
            if problem:
                raise ValueError(problem)
        try:
            value = to_int(value)
        except ValueError:
            raise ValueError(f"model_args {opt.name}={value!r} must be an integer") from None
        if value < 1:
            raise ValueError(f"model_args {opt.name}={value!r} must be an integer >= 1")
    else:
        value = str(value)
    if opt.choices is not None and value not in opt.choices:
        raise ValueError(f"model_args {opt.name}={value!r} is not valid; choose one of {', '.join(opt.choices)}")
    return value


ENGINE_OPTIONS: Tuple[Option, ...] = (
    Option("pretrained", str, DEFAULT_PRETRAINED),
    Option("model_base", str, None),
    Option("method", str, "none"),
    Option("variant", str, "fixed", BOTH_VARIANTS),
    Option("prompt_style", str, "llava_v1", PROMPT_STYLES),
    Option("pad_to_square", bool, True),
    Option("text_encoder", str, DEFAULT_TEXT_ENCODER),
    Option("text_source", str, "question", TEXT_SOURCES),
    Option("dtype", str, "auto", ("auto",) + tuple(DTYPES)),
    Option("vision_dtype", str, "auto", VISION_DTYPES),
    Option("attn_implementation", str, "sdpa", ATTN_IMPLEMENTATIONS),
    Option("image_backend", str, "auto", IMAGE_BACKENDS),
    Option("budget_scope", str, "image", BUDGET_SCOPES),
    Option("budget_split", str, "even", BUDGET_SPLITS),
    Option("device", str, None),
    Option("measure_latency", bool, False),
)


@dataclass(frozen=True)
class EngineOptions:
    """Everything that decides what an engine computes, resolved and typed."""

    method: BoundMethod
    pretrained: str = DEFAULT_PRETRAINED
    model_base: Optional[str] = None  # the base LLM an original-format LoRA folder merges onto
    prompt_style: str = "llava_v1"
    pad_to_square: bool = True
    text_encoder: str = DEFAULT_TEXT_ENCODER
    text_source: str = "question"
    dtype: str = "auto"
    vision_dtype: str = "auto"
    attn_implementation: str = "sdpa"
    image_backend: str = "auto"
    budget_scope: str = "image"  # LLaVA-NeXT: budget=N per image ('image', split over its units) or per unit ('unit')
    budget_split: str = "even"  # how a per-image budget is split over the units
    device: Optional[str] = None
    measure_latency: bool = False
    given: frozenset = frozenset()  # the engine options set explicitly (a family refuses those that are not its own)


def resolve_options(options: Iterable[Option], raw: Mapping[str, Any]) -> Dict[str, Any]:
    """Coerce the given keys of `raw` that `options` declare and fill the defaults of the others."""
    return {opt.name: coerce_option(opt, raw[opt.name]) if opt.name in raw else opt.default for opt in options}


def engine_options(raw: Mapping[str, Any], preset: Optional[str] = None, owner: str = "llava_tokprune",
                   other_keys: Iterable[str] = ()) -> EngineOptions:
    """Validate raw engine options and method parameters once.

    `preset`: the method a model id fixes (another `method=` is an error). `other_keys`: keys the caller
    handles itself (they are listed among the valid keys of an unknown-key error but not read here).
    """
    method = raw.get("method", preset or "none")
    if preset is not None and method != preset:
        raise ValueError(f"{owner} runs method {preset!r}; use --model llava_tokprune with method={method} instead")
    if method not in method_names():
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(method_names())}")
    spec = get_method(method)
    common = {opt.name for opt in ENGINE_OPTIONS}
    extra = set(other_keys)
    for key in raw:
        if key not in common and key not in spec.params and key not in extra:
            valid = sorted(common | extra) + sorted(spec.params)
            raise ValueError(f"unknown model_args key {key!r} for {owner} (method {method}); valid keys: {', '.join(valid)}"
                             f"{did_you_mean(key, valid)}")
    values = resolve_options(ENGINE_OPTIONS, {k: v for k, v in raw.items() if k in common})
    values.pop("method")
    variant = values.pop("variant")
    bound = bind(method, variant, **{k: v for k, v in raw.items() if k in spec.params and k not in common})
    return EngineOptions(method=bound, given=frozenset(k for k in raw if k in common), **values)
