"""model_args for the lmms-eval wrappers -> one frozen `EvalConfig`, validated once at load time.

lmms-eval type-guesses values (`1` -> int, `-1` -> float, `true` -> bool, the rest str); `config=` names a
model_configs YAML whose model_args fill in what is not given. Engine options and method parameters are
resolved by `llava.options.engine_options` (the one validation step); the harness adds its own options.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import yaml

from ..catalog import model_ids
from ..coerce import format_value
from ..llava.options import DEFAULT_PRETRAINED, DEFAULT_TEXT_ENCODER, TEXT_SOURCES, EngineOptions, Option, engine_options, resolve_options

__all__ = ["DEFAULT_PRETRAINED", "DEFAULT_TEXT_ENCODER", "TEXT_SOURCES", "MODEL_IDS", "EvalConfig", "parse_model_args", "load_config_model_args"]

# model id -> preset method (None: generic, method= required or 'none'); derived from the catalog
MODEL_IDS: Dict[str, Optional[str]] = model_ids()


def _batch_size_check(value: Any) -> Optional[str]:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "batch_size=auto is not supported; give an integer batch size"
    return None


HARNESS_OPTIONS = (
    Option("batch_size", int, 1, check=_batch_size_check),
    Option("max_new_tokens", int, None),
    Option("config", str, None),
)
# lmms-eval passes these from its own CLI; accepted and ignored where meaningless for us.
_HARNESS_KEYS = {"max_batch_size", "device_map"}


@dataclass(frozen=True)
class EvalConfig:
    """One wrapper's resolved configuration: the engine's options plus what the harness itself uses."""

    model_id: str
    engine: EngineOptions
    batch_size: int = 1
    max_new_tokens: Optional[int] = None
    config: Optional[str] = None

    def identity(self) -> Dict[str, Any]:
        """What decides the answers and counts: the resolved method (all parameters, defaults included) and the
        engine options that change outputs; not the model id, the batch size, the device or latency measurement
        (outputs are identical across them), not the name of a config file (its contents are in here)."""
        e = self.engine
        guided = "text" in e.method.needs
        return {
            "method": e.method.name, "variant": e.method.variant, "params": dict(e.method.params),
            "pretrained": e.pretrained, "prompt_style": e.prompt_style, "pad_to_square": e.pad_to_square,
            "text_encoder": e.text_encoder if guided else None, "text_source": e.text_source if guided else None,
            "dtype": e.dtype, "vision_dtype": e.vision_dtype, "attn_implementation": e.attn_implementation, "image_backend": e.image_backend,
            "budget_scope": e.budget_scope, "budget_split": e.budget_split,
            "max_new_tokens": self.max_new_tokens,
            **({"model_base": e.model_base} if e.model_base is not None else {}),  # an original-format LoRA folder's base
        }

    @property
    def digest(self) -> str:
        """A short stable hash of `identity()` (cache identity, provenance in samples and leaderboards)."""
        text = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def method_args(self) -> str:
        """'method=prumerge,variant=fixed,budget=64': the resolved method and the parameters that were set."""
        given = ",".join(f"{k}={format_value(v)}" for k, v in self.method_params.items())
        return f"method={self.method},variant={self.variant}" + (f",{given}" if given else "")

    @property
    def method(self) -> str:
        return self.engine.method.name

    @property
    def variant(self) -> str:
        return self.engine.method.variant

    @property
    def method_params(self) -> Dict[str, Any]:
        """The method parameters the user set (coerced); defaults are in `engine.method.params`."""
        return self.engine.method.given_params

    @property
    def pretrained(self) -> str:
        return self.engine.pretrained

    @property
    def pad_to_square(self) -> bool:
        return self.engine.pad_to_square


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


def parse_model_args(model_id: str, raw: Mapping[str, Any]) -> EvalConfig:
    """Validate and coerce lmms-eval model_args for the wrapper `model_id` (every error at load time)."""
    raw = {k: v for k, v in raw.items() if k not in _HARNESS_KEYS}
    preset = MODEL_IDS.get(model_id)
    if "config" in raw and raw["config"] is not None:
        from_file = load_config_model_args(str(raw["config"]))
        file_model = from_file.pop("__model__", None)
        if file_model is not None and file_model != model_id and MODEL_IDS.get(file_model) != preset:
            raise ValueError(f"config {raw['config']!r} is for model {file_model!r}, not {model_id!r}")
        raw = {**from_file, **raw}  # explicit model_args win over the file
    harness_keys = {opt.name for opt in HARNESS_OPTIONS}
    engine = engine_options({k: v for k, v in raw.items() if k not in harness_keys}, preset, model_id, other_keys=harness_keys)
    own = resolve_options(HARNESS_OPTIONS, {k: v for k, v in raw.items() if k in harness_keys})
    bound = engine.method
    if bound.variant == "reference" and bound.spec.reference_batch_one and own["batch_size"] > 1:
        raise ValueError(f"{bound.name} (reference): the released code runs one image per call, so reference runs only "
                         f"with batch_size=1 (got {own['batch_size']}); use batch_size=1, or variant=fixed (equal to batch 1 at any batch size)")
    return EvalConfig(model_id=model_id, engine=engine, **own)
