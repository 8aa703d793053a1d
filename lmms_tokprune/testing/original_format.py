"""Tiny checkpoints in the original LLaVA repository's format (haotian-liu/LLaVA), offline, for tests.

What the seed papers evaluated, in miniature: a full fine-tune folder like ``liuhaotian/llava-v1.5-7b`` and a LoRA folder
like ``liuhaotian/llava-v1.5-7b-lora`` with its base LLM like ``lmsys/vicuna-7b-v1.5``::

    tower = build_tiny_clip_tower(d / "clip")                        # CLIPModel + CLIP processor (mm_vision_tower)
    full = build_original_llava(d / "llava", tower)                 # config.json (LlavaLlamaForCausalLM, flat mm_* fields),
                                                                    # pytorch_model.bin (model.layers.* / model.mm_projector.*),
                                                                    # tokenizer.model only (SentencePiece, as Vicuna ships it)
    base = build_base_llm(d / "vicuna")                             # LlamaForCausalLM + tokenizer.model
    lora = build_original_lora(d / "llava-lora", base, tower)       # adapter_config.json + adapter_model.bin +
                                                                    # non_lora_trainables.bin (the projector)

Random weights, scaled like ``tiny.build_tiny_llava``'s so greedy answers depend on the image. The tokenizer is a
SentencePiece BPE model with Llama's settings (byte fallback, dummy prefix, whitespace kept, ids unk 0 / bos 1 / eos 2)
trained on the tiny corpus: a folder that ships only ``tokenizer.model``, which transformers converts on load.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Dict, Optional

from ..offline_processors import _corpus
from .tiny import TINY_HIDDEN, _prepare_out, _rescale_for_variety, _vision_config_dict, build_tiny_clip_text_encoder

__all__ = ["build_base_llm", "build_original_llava", "build_original_lora", "build_tiny_clip_tower", "sentencepiece_llama_tokenizer",
           "SP_VOCAB_SIZE"]

SP_VOCAB_SIZE = 640
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def sentencepiece_llama_tokenizer(out_dir: Path, vocab_size: int = SP_VOCAB_SIZE) -> Path:
    """Write ``tokenizer.model`` (+ tokenizer_config.json, special_tokens_map.json, as Vicuna / LLaVA-1.5 ship them)."""
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(_corpus()))
        spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(Path(tmp) / "tok"), vocab_size=vocab_size, model_type="bpe",
                                       byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True,
                                       normalization_rule_name="identity", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
                                       pad_id=-1, num_threads=1, minloglevel=2)
        (out / "tokenizer.model").write_bytes((Path(tmp) / "tok.model").read_bytes())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None, "model_max_length": 2048,
        "padding_side": "right", "clean_up_tokenization_spaces": False}, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                                             "pad_token": "<unk>"}, indent=1))
    return out


def build_tiny_clip_tower(out_dir: Path, seed: int = 1, overwrite: bool = False) -> Path:
    """The vision tower an original-format config points at (``mm_vision_tower``): a CLIPModel checkpoint with its
    CLIP image processor, as ``openai/clip-vit-large-patch14-336`` is (336 px, patch 14; also a text encoder)."""
    return build_tiny_clip_text_encoder(out_dir, seed=seed, overwrite=overwrite)


def _llama_fields(vocab_size: int, text_layers: int) -> Dict[str, object]:
    return {"vocab_size": vocab_size, "hidden_size": TINY_HIDDEN, "intermediate_size": 2 * TINY_HIDDEN, "num_hidden_layers": text_layers,
            "num_attention_heads": 4, "num_key_value_heads": 4, "hidden_act": "silu", "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "initializer_range": 0.02, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "pretraining_tp": 1, "use_cache": True}


def _random_llava_state(vocab_size: int, seed: int, text_layers: int, tower: Path) -> Dict[str, "object"]:
    """LLM + projector tensors of a random tiny LLaVA-1.5, under the ORIGINAL repository's names."""
    import torch
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig.from_pretrained(str(tower)).to_dict()
    fields = _llama_fields(vocab_size, text_layers)
    config = LlavaConfig(vision_config=vision, text_config={"model_type": "llama", **fields}, image_token_index=vocab_size - 1,
                         projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-2,
                         multimodal_projector_bias=True, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).float().eval()
    _rescale_for_variety(model, seed, {0, 1, *range(3, 259)})  # unk, bos and the byte pieces: readable greedy answers
    out = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.language_model."):
            out["model." + name[len("model.language_model."):]] = tensor.clone()
        elif name == "lm_head.weight":
            out[name] = tensor.clone()
        elif name.startswith("model.multi_modal_projector.linear_"):
            index = {"1": "0", "2": "2"}[name[len("model.multi_modal_projector.linear_")]]
            out[f"model.mm_projector.{index}." + name.rsplit(".", 1)[1]] = tensor.clone()
    return out


def _llava_config(vocab_size: int, text_layers: int, tower: Path, projector: str = "mlp2x_gelu", name_or_path: str = "") -> Dict[str, object]:
    """The flat config.json LLaVA's training writes (LlavaConfig = LlamaConfig + mm_* fields)."""
    return {"_name_or_path": name_or_path, "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
            **_llama_fields(vocab_size, text_layers), "torch_dtype": "float32", "transformers_version": "4.31.0",
            "freeze_mm_mlp_adapter": False, "image_aspect_ratio": "pad", "mm_hidden_size": TINY_HIDDEN, "mm_patch_merge_type": "flat",
            "mm_projector_lr": None, "mm_projector_type": projector, "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
            "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2, "mm_vision_tower": str(tower),
            "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", "tune_mm_mlp_adapter": False, "use_mm_proj": True}


def build_original_llava(out_dir: Path, tower: Path, *, seed: int = 0, text_layers: int = 2, projector: str = "mlp2x_gelu",
                         overwrite: bool = False) -> Path:
    """A full fine-tune folder (``liuhaotian/llava-v1.5-7b``-shaped): flat config, pytorch_model.bin, tokenizer.model."""
    import torch

    out = _prepare_out(out_dir, overwrite)
    sentencepiece_llama_tokenizer(out)
    state = _random_llava_state(SP_VOCAB_SIZE, seed, text_layers, Path(tower))
    torch.save(state, out / "pytorch_model.bin")
    (out / "config.json").write_text(json.dumps(_llava_config(SP_VOCAB_SIZE, text_layers, Path(tower), projector), indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))
    return out


def build_base_llm(out_dir: Path, *, seed: int = 0, text_layers: int = 2, overwrite: bool = False) -> Path:
    """A base LLM folder (``lmsys/vicuna-7b-v1.5``-shaped): LlamaForCausalLM config, model.safetensors, tokenizer.model.
    Its weights are the LLM of ``build_original_llava(seed=seed)`` (the projector comes from the LoRA folder)."""
    from safetensors.torch import save_file

    out = _prepare_out(out_dir, overwrite)
    sentencepiece_llama_tokenizer(out)
    tower_config = _vision_config_dict(4)
    with tempfile.TemporaryDirectory() as tmp:  # only the vision geometry is needed to draw the same LLM weights
        from transformers import CLIPVisionConfig

        CLIPVisionConfig(**{k: v for k, v in tower_config.items() if k != "model_type"}).save_pretrained(tmp)
        state = _random_llava_state(SP_VOCAB_SIZE, seed, text_layers, Path(tmp))
    llm = {k: v.contiguous() for k, v in state.items() if not k.startswith("model.mm_projector.")}
    save_file(llm, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                 **_llama_fields(SP_VOCAB_SIZE, text_layers), "torch_dtype": "float32"}, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))
    return out


def build_original_lora(out_dir: Path, base: Path, tower: Path, *, seed: int = 5, rank: int = 4, alpha: float = 8.0,
                        base_name: Optional[str] = None, overwrite: bool = False) -> Path:
    """A LoRA folder (``liuhaotian/llava-v1.5-7b-lora``-shaped) over `base`: LLaVA config, adapter_config.json naming
    the base (``base_name``, default the base folder), adapter_model.bin (random A and non-zero B for every q/k/v/o and
    MLP projection, peft's key names) and non_lora_trainables.bin (the projector, with peft's prefix)."""
    import torch

    out = _prepare_out(out_dir, overwrite)
    base_config = json.loads((Path(base) / "config.json").read_text())
    layers = int(base_config["num_hidden_layers"])
    g = torch.Generator().manual_seed(seed)
    shapes = {"q_proj": (TINY_HIDDEN, TINY_HIDDEN), "k_proj": (TINY_HIDDEN, TINY_HIDDEN), "v_proj": (TINY_HIDDEN, TINY_HIDDEN),
              "o_proj": (TINY_HIDDEN, TINY_HIDDEN), "gate_proj": (2 * TINY_HIDDEN, TINY_HIDDEN), "up_proj": (2 * TINY_HIDDEN, TINY_HIDDEN),
              "down_proj": (TINY_HIDDEN, 2 * TINY_HIDDEN)}
    adapter = {}
    for layer in range(layers):
        for module, (rows, cols) in shapes.items():
            part = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{module}"
            adapter[f"{key}.lora_A.weight"] = torch.randn(rank, cols, generator=g) / cols**0.5
            adapter[f"{key}.lora_B.weight"] = torch.randn(rows, rank, generator=g) * 0.2
    torch.save(adapter, out / "adapter_model.bin")
    projector = {k: v for k, v in _random_llava_state(SP_VOCAB_SIZE, seed, layers, Path(tower)).items() if k.startswith("model.mm_projector.")}
    torch.save({f"base_model.model.{k}": v for k, v in projector.items()}, out / "non_lora_trainables.bin")
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.05, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "target_modules": list(LORA_TARGETS), "modules_to_save": None,
        "base_model_name_or_path": str(base_name if base_name is not None else base)}, indent=1))
    (out / "config.json").write_text(json.dumps(_llava_config(SP_VOCAB_SIZE, layers, Path(tower), name_or_path=str(base)), indent=1))
    return out
