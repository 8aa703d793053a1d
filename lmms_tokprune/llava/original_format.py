"""Checkpoints in the original LLaVA repository's format (haotian-liu/LLaVA), converted in memory into transformers'
LLaVA-1.5 (`LlavaForConditionalGeneration`), without the original `llava` package (it pins old torch / transformers).

The seed papers evaluated such folders: `liuhaotian/llava-v1.5-7b` (full fine-tune), `liuhaotian/llava-v1.5-7b-lora` on
`lmsys/vicuna-7b-v1.5` (Recoverable Compression's baseline and training-free rows), and PruMerge's LoRA releases. A
folder is original-format when its config names `LlavaLlamaForCausalLM` or carries `mm_vision_tower`; a LoRA folder
also has `adapter_config.json` + `non_lora_trainables.bin`. What the conversion reproduces of the original
`load_pretrained_model` (llava/model/builder.py):
- the LLM from the folder (LoRA: from `model_base`, default the adapter config's `base_model_name_or_path`), renamed
  `model.{embed_tokens,layers,norm}` -> the language model, `model.mm_projector.{0,2}` -> the projector;
- LoRA: `non_lora_trainables.bin` loaded first (the projector), then every adapted linear merged, W += (B @ A) * alpha / r
  (alpha / sqrt(r) with rslora), in float32 as peft's merge does for a float32 model;
- the CLIP tower and its image processor from `mm_vision_tower` (a hub id or a folder), as the original loads them
  (tower weights inside the LLaVA folder are ignored there too), features from `mm_vision_select_layer`;
- the tokenizer of the folder (LoRA: of the base), plus the `<image>` placeholder our assembly needs; the rows added for
  it are never generated (`generation_config.suppress_tokens`), so greedy answers equal the original's.
Everything is checked before any weight is read: an unsupported projector or feature selection, a missing tower, a LoRA
folder without a reachable base are one-line errors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from .checkpoint_files import first_line, looks_like_path, quiet_transformers, read_json

ORIGINAL_ARCHITECTURE = "LlavaLlamaForCausalLM"
SUPPORTED_PROJECTOR = "mlp2x_gelu"  # Linear -> GELU -> Linear: transformers' LLaVA projector
LORA_FILES = ("adapter_config.json", "non_lora_trainables.bin")
IMAGE_PLACEHOLDER = "<image>"
# The Llama fields of the flat original config that make the transformers text config.
LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "attention_bias",
              "attention_dropout", "mlp_bias", "initializer_range", "pretraining_tp", "bos_token_id", "eos_token_id", "pad_token_id")
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
SNAPSHOT_PATTERNS = ("*.json", "*.model", "*.safetensors", "*.bin", "*.txt", "*.jinja")


def is_original_config(raw: Optional[Mapping[str, Any]]) -> bool:
    """The original repository's flat config (not transformers' LlavaConfig, which nests text_config / vision_config)."""
    if not raw:
        return False
    return ORIGINAL_ARCHITECTURE in (raw.get("architectures") or []) or "mm_vision_tower" in raw


def local_folder(name: str, what: str) -> Path:
    """A local folder, or the local snapshot of a hub id (downloaded unless offline); ValueError when unreachable."""
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        return path
    if looks_like_path(name):
        raise ValueError(f"{what} {name!r}: the folder does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=list(SNAPSHOT_PATTERNS)))
    except Exception as err:  # offline without a cached copy, unknown repo, no network
        raise ValueError(f"{what} {name!r} cannot be found locally or on the hub ({first_line(err)})") from None


def raw_config(pretrained: str) -> Optional[Dict[str, Any]]:
    """config.json of a local folder, or of a hub id (cached / downloaded); None when it cannot be read here (the
    caller's AutoConfig then reports the problem)."""
    path = Path(os.path.expanduser(pretrained))
    if path.is_dir():
        return read_json(path, "config.json")
    try:
        from transformers.utils import cached_file

        file = cached_file(pretrained, "config.json", _raise_exceptions_for_missing_entries=False)
    except Exception:
        return None
    if not file:
        return None
    with open(file) as fh:
        return json.load(fh)


@dataclass(frozen=True)
class OriginalCheckpoint:
    """An original-format folder, checked: where its LLM, tower and (LoRA) adapter come from."""

    folder: Path  # the LLaVA folder (full fine-tune or LoRA adapter)
    config: Mapping[str, Any]  # its flat config.json
    tower: Path  # the CLIP vision tower folder (mm_vision_tower)
    base: Optional[Path] = None  # LoRA: the base LLM folder the adapter merges onto
    adapter: Optional[Mapping[str, Any]] = None  # LoRA: adapter_config.json

    @property
    def is_lora(self) -> bool:
        return self.adapter is not None

    @property
    def llm_folder(self) -> Path:
        """Where the LLM weights and the tokenizer come from (LoRA: the base, as the original loads them)."""
        return self.base if self.base is not None else self.folder


def weight_files(folder: Path, names: Tuple[str, ...] = WEIGHT_FILES) -> list:
    """The weight files of a checkpoint folder (the shards of an index, or the single file); [] when there are none."""
    for name in names:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            with open(path) as fh:
                shards = sorted(set(json.load(fh)["weight_map"].values()))
            return [folder / s for s in shards]
        return [path]
    return []


def inspect_original(pretrained: str, model_base: Optional[str] = None, raw: Optional[Mapping[str, Any]] = None) -> OriginalCheckpoint:
    """Check an original-format checkpoint without reading weights; ValueError naming the first problem."""
    what = f"pretrained={pretrained!r}"
    folder = local_folder(pretrained, "pretrained")
    raw = dict(raw if raw is not None else read_json(folder, "config.json") or {})
    if not is_original_config(raw):
        raise ValueError(f"{what} is not an original LLaVA-repository checkpoint (no {ORIGINAL_ARCHITECTURE} / mm_vision_tower in config.json)")
    projector = raw.get("mm_projector_type", "linear")
    if projector != SUPPORTED_PROJECTOR:
        raise ValueError(f"{what}: mm_projector_type={projector!r} is not supported; only {SUPPORTED_PROJECTOR!r} (LLaVA-1.5's "
                         "two-layer MLP) maps onto transformers' LLaVA projector")
    feature = raw.get("mm_vision_select_feature", "patch")
    if feature != "patch":
        raise ValueError(f"{what}: mm_vision_select_feature={feature!r} is not supported; only 'patch' (CLS dropped, LLaVA-1.5)")
    if not isinstance(raw.get("mm_vision_select_layer", -2), int):
        raise ValueError(f"{what}: mm_vision_select_layer={raw.get('mm_vision_select_layer')!r} must be one integer layer")
    if raw.get("mm_use_im_start_end", False):
        raise ValueError(f"{what}: mm_use_im_start_end=true (image start/end tokens) is not supported; LLaVA-1.5 does not use them")
    tower_name = raw.get("mm_vision_tower") or raw.get("vision_tower")
    if not tower_name:
        raise ValueError(f"{what}: config.json names no vision tower (mm_vision_tower)")
    tower = local_folder(str(tower_name), f"{what}: vision tower mm_vision_tower=")
    if read_json(tower, "config.json") is None:
        raise ValueError(f"{what}: vision tower {str(tower_name)!r} ({tower}) has no config.json")
    lora = [name for name in LORA_FILES if (folder / name).is_file()]
    if not lora:
        if model_base is not None:
            raise ValueError(f"model_base={model_base!r} is given, but {what} is a full checkpoint, not a LoRA folder "
                             f"(no {' / '.join(LORA_FILES)}); leave model_base out")
        if not weight_files(folder):
            raise ValueError(f"{what}: the folder {folder} has no weights (none of {', '.join(WEIGHT_FILES)})")
        return OriginalCheckpoint(folder, raw, tower)
    if len(lora) != len(LORA_FILES):
        missing = sorted(set(LORA_FILES) - set(lora))
        raise ValueError(f"{what} is a LoRA folder without {', '.join(missing)}; it needs both {' and '.join(LORA_FILES)}")
    adapter = read_json(folder, "adapter_config.json") or {}
    if not weight_files(folder, ADAPTER_FILES):
        raise ValueError(f"{what}: the LoRA folder has no adapter weights (none of {', '.join(ADAPTER_FILES)})")
    check_adapter(adapter, what)
    base_name = model_base or adapter.get("base_model_name_or_path")
    if not base_name:
        raise ValueError(f"{what} is a LoRA folder whose adapter_config.json names no base model; give model_base=<base LLM>")
    base = local_folder(str(base_name), f"{what}: LoRA base model_base=")
    if read_json(base, "config.json") is None or not weight_files(base):
        raise ValueError(f"{what}: LoRA base {str(base_name)!r} ({base}) lacks config.json or weights")
    return OriginalCheckpoint(folder, raw, tower, base, adapter)


def check_adapter(adapter: Mapping[str, Any], what: str) -> None:
    """The adapter features the merge implements (plain LoRA, as LLaVA trains it); anything else is refused."""
    if adapter.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{what}: adapter peft_type={adapter.get('peft_type')!r} is not LoRA")
    for key in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save"):
        if adapter.get(key):
            raise ValueError(f"{what}: adapter_config.json sets {key}={adapter[key]!r}, which the LoRA merge does not support")
    if not isinstance(adapter.get("r"), int) or adapter["r"] < 1 or not isinstance(adapter.get("lora_alpha"), (int, float)):
        raise ValueError(f"{what}: adapter_config.json needs an integer r >= 1 and a number lora_alpha")


# --------------------------------------------------------------------------------------------- weights
def read_weights(files) -> Dict[str, torch.Tensor]:
    """Every tensor of safetensors / PyTorch pickle files (read-only tensors, no code executed)."""
    from safetensors.torch import load_file

    out: Dict[str, torch.Tensor] = {}
    for file in files:
        file = str(file)
        if file.endswith(".safetensors"):
            out.update(load_file(file))
        else:
            out.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
    return out


def strip_peft_prefix(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """non_lora_trainables.bin names as the original loader rewrites them before load_state_dict(strict=False)."""
    out = {(k[len("base_model."):] if k.startswith("base_model.") else k): v for k, v in state.items()}
    if any(k.startswith("model.model.") for k in out):
        out = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in out.items()}
    return out


def lora_scaling(adapter: Mapping[str, Any]) -> float:
    r, alpha = int(adapter["r"]), float(adapter["lora_alpha"])
    return alpha / r**0.5 if adapter.get("use_rslora") else alpha / r


def merge_lora(state: Dict[str, torch.Tensor], adapter_state: Mapping[str, torch.Tensor], adapter: Mapping[str, Any], what: str,
               dtype: torch.dtype = torch.float32) -> int:
    """W += (B @ A) * scaling for every adapted linear of `state` (original names); returns how many.

    As peft merges into a model loaded in `dtype` (the original loads the base in fp16): the weight is first cast to
    `dtype`, the update computed in float32 and added with one rounding to `dtype`."""
    pairs: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in adapter_state.items():
        name = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in name:
                target = name.split(marker)[0] + ".weight"
                pairs.setdefault(target, {})[part] = value
                break
        else:
            raise ValueError(f"{what}: adapter tensor {key!r} is not a LoRA A/B matrix (embedding LoRA and extra modules are not supported)")
    scaling = lora_scaling(adapter)
    for target, ab in sorted(pairs.items()):
        if target not in state:
            raise ValueError(f"{what}: the adapter adapts {target!r}, which the base model does not have")
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{what}: the adapter lacks {'lora_B' if 'lora_A' in ab else 'lora_A'} for {target!r}")
        delta = ab["lora_B"].float() @ ab["lora_A"].float()
        if adapter.get("fan_in_fan_out"):
            delta = delta.T
        weight = state[target].to(dtype)
        if tuple(delta.shape) != tuple(weight.shape):
            raise ValueError(f"{what}: LoRA update for {target!r} is {tuple(delta.shape)}, the weight is {tuple(weight.shape)}")
        state[target] = (weight.float() + delta * scaling).to(dtype)
    return len(pairs)


def llm_state(checkpoint: OriginalCheckpoint, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """The LLM + projector tensors under their original names, LoRA merged in `dtype` (the original's order: base
    weights, non_lora_trainables, then the merge)."""
    what = f"pretrained={str(checkpoint.folder)!r}"
    state = read_weights(weight_files(checkpoint.llm_folder))
    if checkpoint.is_lora:
        state.update(strip_peft_prefix(read_weights([checkpoint.folder / "non_lora_trainables.bin"])))
        merge_lora(state, read_weights(weight_files(checkpoint.folder, ADAPTER_FILES)), checkpoint.adapter, what, dtype)
    return state


def hf_name(key: str) -> Optional[str]:
    """An original weight name -> transformers' LLaVA name (None: not part of the converted model: tower copies, which
    the original ignores too, and rotary buffers that old checkpoints saved)."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    if key.startswith(("model.embed_tokens.", "model.layers.", "model.norm.")):
        return "model.language_model." + key[len("model."):]
    if key.startswith("lm_head."):
        return key
    for index, linear in (("0", "linear_1"), ("2", "linear_2")):
        prefix = f"model.mm_projector.{index}."
        if key.startswith(prefix):
            return f"model.multi_modal_projector.{linear}." + key[len(prefix):]
    return None


# --------------------------------------------------------------------------------------------- assembling
def llava_config(checkpoint: OriginalCheckpoint, vocab_size: int, image_token_id: int, pad_token_id: int) -> Any:
    """transformers' LlavaConfig from the flat original config and the tower's CLIP config."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    raw = checkpoint.config
    if checkpoint.is_lora:  # the original builds the LLM from the base's weights with the LoRA folder's config
        raw = {**(read_json(checkpoint.llm_folder, "config.json") or {}), **raw}
    text = LlamaConfig(**{k: raw[k] for k in LLAMA_KEYS if k in raw and raw[k] is not None})
    text.vocab_size = vocab_size
    text.pad_token_id = pad_token_id
    vision = CLIPVisionConfig.from_pretrained(str(checkpoint.tower))
    mm_hidden = raw.get("mm_hidden_size", vision.hidden_size)
    if mm_hidden != vision.hidden_size:
        raise ValueError(f"pretrained={str(checkpoint.folder)!r}: mm_hidden_size={mm_hidden} but the tower {checkpoint.tower} is {vision.hidden_size} wide")
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=image_token_id,
                         image_seq_length=(vision.image_size // vision.patch_size) ** 2, projector_hidden_act="gelu",
                         vision_feature_select_strategy="default", vision_feature_layer=int(raw.get("mm_vision_select_layer", -2)),
                         multimodal_projector_bias=True, tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)))
    config.pad_token_id = pad_token_id
    return config


def original_tokenizer(checkpoint: OriginalCheckpoint) -> Tuple[Any, int]:
    """The checkpoint's tokenizer (LoRA: the base's) with the `<image>` placeholder added; and the size of its own
    vocabulary (ids from there on were added here and must never be generated). No pad token: unk pads, as LLaVA's
    training does for vicuna."""
    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    folder = checkpoint.llm_folder
    # The class tokenizer_config.json names, as the original's AutoTokenizer picked it: transformers 5 would otherwise go
    # by config.json's model_type 'llava' to a generic tokenizer without Llama's dummy-prefix piece.
    named = (read_json(folder, "tokenizer_config.json") or {}).get("tokenizer_class")
    tokenizer_class = (tokenizer_class_from_name(named) if named else None) or AutoTokenizer
    try:
        tokenizer = tokenizer_class.from_pretrained(str(folder))
    except Exception as err:
        raise ValueError(f"cannot load the tokenizer of {folder}: {first_line(err)}") from None
    sentencepiece_exact(tokenizer, folder / "tokenizer.model")
    if checkpoint.config.get("mm_use_im_patch_token", True):  # the original adds it (LLaVA-1.5 configs say false)
        tokenizer.add_tokens(["<im_patch>"], special_tokens=True)
    own = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    tokenizer.padding_side = "left"
    return tokenizer, own


def sentencepiece_exact(tokenizer: Any, model_file: Path) -> None:
    """Make a converted Llama tokenizer encode text exactly as its SentencePiece model (what the original's slow
    tokenizer runs): SentencePiece puts its dummy prefix `▁` before every text, also one that starts with a space, while
    transformers' Metaspace pre-tokenizer skips it there (' x' -> '▁▁x' vs '▁x'). The normalizer transformers used
    for Llama before its Metaspace rewrite -- prepend `▁`, spaces to `▁`, no pre-tokenizer -- restores it. Only for a
    model with the Llama settings (dummy prefix on, whitespace kept)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not model_file.is_file() or type(tokenizer).__name__ != "LlamaTokenizer":
        return
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import normalizers

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    spec = proto.normalizer_spec
    if not spec.add_dummy_prefix or spec.remove_extra_whitespaces:
        return
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None


def pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """An embedding / lm_head matrix grown to `rows` with zero rows (the placeholder's input embedding is replaced by
    image features, its output row is suppressed)."""
    if weight.shape[0] >= rows:
        return weight
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], weight.shape[1])], dim=0)


def load_original(checkpoint: OriginalCheckpoint, dtype: torch.dtype, tower_dtype: torch.dtype, attn_implementation: Optional[str],
                  image_backend: str) -> Tuple[Any, Any]:
    """(model on the CPU in `dtype` with its CLIP tower in `tower_dtype`, processor) for a checked original-format
    checkpoint. The tower's weights go from the CLIP checkpoint (fp32) straight to `tower_dtype`, never through the model
    dtype, as the original loads it."""
    from transformers import AutoImageProcessor, CLIPVisionModel, GenerationConfig, LlavaForConditionalGeneration, LlavaProcessor

    what = f"pretrained={str(checkpoint.folder)!r}"
    tokenizer, own_vocab = original_tokenizer(checkpoint)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    state = llm_state(checkpoint, dtype)
    rows = max(len(tokenizer), state["model.embed_tokens.weight"].shape[0] if "model.embed_tokens.weight" in state else 0)
    converted: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = hf_name(key)
        if name is not None:
            converted[name] = pad_rows(value, rows) if name.endswith(("embed_tokens.weight", "lm_head.weight")) else value
    config = llava_config(checkpoint, rows, image_token_id, tokenizer.pad_token_id)
    with quiet_transformers():  # a CLIPModel checkpoint's text weights are unused on purpose
        tower, info = CLIPVisionModel.from_pretrained(str(checkpoint.tower), dtype=torch.float32, output_loading_info=True)
    if info.get("missing_keys"):
        raise ValueError(f"{what}: the vision tower {checkpoint.tower} lacks {len(info['missing_keys'])} weights (e.g. {sorted(info['missing_keys'])[0]})")
    tower_state = tower.state_dict()
    converted.update({f"model.vision_tower.{k}": v for k, v in tower_state.items()})
    del tower
    try:
        model, info = LlavaForConditionalGeneration.from_pretrained(None, config=config, state_dict=converted, dtype=dtype,
                                                                    attn_implementation=attn_implementation, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{what}: cannot build the converted model: {first_line(err)}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"{what}: the converted checkpoint lacks {len(missing)} weight tensors (e.g. {missing[0]}); the checkpoint is incomplete")
    model.model.vision_tower.to(tower_dtype).load_state_dict(tower_state)  # from the fp32 CLIP weights, not the model-dtype copy
    try:
        model.generation_config = GenerationConfig.from_pretrained(str(checkpoint.llm_folder))
    except OSError:
        model.generation_config = GenerationConfig.from_model_config(config.text_config)
    model.generation_config.suppress_tokens = list(range(own_vocab, rows)) or None
    image_processor = AutoImageProcessor.from_pretrained(str(checkpoint.tower), backend=image_backend)
    vision = config.vision_config
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
                               vision_feature_select_strategy="default", image_token=IMAGE_PLACEHOLDER, num_additional_image_tokens=1)
    return model, processor
