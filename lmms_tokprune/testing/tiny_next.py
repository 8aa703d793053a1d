"""Tiny, offline, LLaVA-NeXT-shaped checkpoints (llava-hf/llava-v1.6-vicuna-7b-hf / -mistral-7b-hf in miniature).

``build_tiny_llava_next(d, decoder="llama" | "mistral")`` writes a folder that loads through the path a real NeXT
checkpoint takes (``LlavaNextForConditionalGeneration.from_pretrained`` + ``AutoProcessor``): CLIP 336/14 (CLS + 576
patches per crop), the released anyres pinpoints (1x2, 2x1, 2x2, 1x3, 3x1 crops), an ``image_newline`` vector, a
2-layer MLP projector and a small Llama or Mistral decoder (Mistral with grouped-query attention), random weights
scaled like ``tiny.build_tiny_llava``'s so greedy answers depend on the image, the tiny local Llama tokenizer.

As in the llava-hf releases, the chat template lives with the processor (structured content); the Mistral tokenizer
also carries Mistral's own string template ([INST] ... [/INST]), the vicuna one none (lmms-eval's llava_hf then uses
its built-in vicuna template).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..offline_processors import GRID_PINPOINTS, NEXT_CHAT_TEMPLATE, next_image_processor  # re-exported (production needs them)
from .tiny import (
    PATCH_SIZE,
    TINY_HIDDEN,
    TINY_VERSION,
    _prepare_out,
    _rescale_for_variety,
    _vision_config_dict,
    llama_text_config,
    llama_tokenizer,
)

__all__ = ["GRID_PINPOINTS", "NEXT_CHAT_TEMPLATE", "MISTRAL_NEXT_CHAT_TEMPLATE", "build_tiny_llava_next", "next_image_processor"]

# llava-hf/llava-v1.6-mistral-7b-hf's processor template ([INST] <image>\n{text} [/INST])
MISTRAL_NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{' [/INST]'}}{% elif message['role'] == 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ ' ' + content['text'] + eos_token }}{% endfor %}"
    "{% endif %}{% endfor %}"
)
# Mistral-7B-Instruct's own tokenizer template (string content)
MISTRAL_TOKENIZER_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def _text_config(tok, decoder: str, text_layers: int, sliding_window: Optional[int]) -> dict:
    config = llama_text_config(tok, TINY_HIDDEN, 2 * TINY_HIDDEN, text_layers, 4)
    config["max_position_embeddings"] = 4096  # the NeXT context
    if decoder == "mistral":
        config.update(model_type="mistral", num_key_value_heads=2, sliding_window=sliding_window, rope_theta=1_000_000.0)
    elif decoder != "llama":
        raise ValueError(f"decoder must be 'llama' or 'mistral', got {decoder!r}")
    return config


def build_tiny_llava_next(out_dir: str | Path, *, decoder: str = "llama", seed: int = 0, text_layers: int = 2, vision_layers: int = 4,
                          sliding_window: Optional[int] = None, overwrite: bool = False) -> Path:
    """Write a tiny random LLaVA-NeXT checkpoint (model + LlavaNextProcessor) to ``out_dir``; return it."""
    import torch
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

    out = _prepare_out(out_dir, overwrite)
    tok = llama_tokenizer()
    tok.chat_template = MISTRAL_TOKENIZER_TEMPLATE if decoder == "mistral" else None
    image_token_id = tok.convert_tokens_to_ids("<image>")
    config = LlavaNextConfig(
        vision_config=_vision_config_dict(vision_layers),
        text_config=_text_config(tok, decoder, text_layers, sliding_window),
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_grid_pinpoints=GRID_PINPOINTS,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    config.pad_token_id, config.bos_token_id, config.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).float().eval()
    quiet = {i for t, i in tok.get_vocab().items() if t.startswith("<0x") and t.endswith(">") and len(t) == 6}
    quiet |= {tok.unk_token_id, tok.bos_token_id, tok.pad_token_id, image_token_id}
    _rescale_for_variety(model, seed, quiet)
    with torch.no_grad():  # the newline vector at the scale of the projected patches
        model.model.image_newline.copy_(torch.randn(TINY_HIDDEN, generator=torch.Generator().manual_seed(20_000 + seed)))
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    template = MISTRAL_NEXT_CHAT_TEMPLATE if decoder == "mistral" else NEXT_CHAT_TEMPLATE
    LlavaNextProcessor(image_processor=next_image_processor("torchvision"), tokenizer=tok, patch_size=PATCH_SIZE,
                       vision_feature_select_strategy="default", image_token="<image>", num_additional_image_tokens=1,
                       chat_template=template).save_pretrained(out)
    (out / "TINY_README.txt").write_text(f"lmms_tokprune tiny LLaVA-NeXT ({TINY_VERSION}), decoder={decoder}, seed={seed}, "
                                         f"text_layers={text_layers}, vision_layers={vision_layers}; random weights, for tests only.\n")
    return out
