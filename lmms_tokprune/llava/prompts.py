"""Prompts: LLaVA-1.5's own evaluation format (vicuna_v1) or the checkpoint's chat template."""

from __future__ import annotations

import re
from typing import Any, List, Sequence

IMAGE_PLACEHOLDER = "<image>"
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# lmms_eval = the prompt of lmms-eval's own model for the family, side by side: for the image families its llava_hf, which
# lmms-eval 0.7.3 resolves to the chat implementation (models/chat/llava_hf.py): the processor's chat template over the
# task's messages, images first (= chat_template).
PROMPT_STYLES = ("llava_v1", "chat_template", "lmms_eval")
# The original LLaVA repository's conversations its eval scripts feed (llava/conversation.py): vicuna_v1 for the vicuna
# checkpoints (LLaVA-1.5, NeXT vicuna), mistral_instruct for NeXT Mistral.
CONVERSATIONS = ("vicuna_v1", "mistral_instruct")

# Answer-format instructions that lmms-eval tasks append to a question (LLaVA-1.5 eval prompts).
ANSWER_FORMAT_PATTERNS = [
    r"Answer the question using a single word or phrase\.?",
    r"Answer with the option'?s letter from the given choices directly\.?",
    r"Answer the question with Yes or No\.?",
    r"Please answer yes or no\.?",
    r"Reference OCR token:.*$",
]


def with_image_placeholders(context: str, num_images: int) -> str:
    """Put one `<image>` per image in front of the question, as LLaVA's eval does ("<image>\\n{q}").

    A context that already holds placeholders must hold exactly one per image.
    """
    found = context.count(IMAGE_PLACEHOLDER)
    if found:
        if found != num_images:
            raise ValueError(f"prompt holds {found} '<image>' placeholders for {num_images} images")
        return context
    if num_images == 0:
        return context
    return " ".join([IMAGE_PLACEHOLDER] * num_images) + "\n" + context


def llava_v1_prompt(context: str, num_images: int, conversation: str = "vicuna_v1") -> str:
    """The original repository's conversation for the checkpoint: vicuna_v1 (LLaVA-1.5, NeXT vicuna), ending in
    'ASSISTANT:'; mistral_instruct (NeXT Mistral: LLAMA_2 separators, empty system) '[INST] ... [/INST]'."""
    body = with_image_placeholders(context, num_images)
    if conversation == "vicuna_v1":
        return f"{VICUNA_SYSTEM} USER: {body} ASSISTANT:"
    if conversation == "mistral_instruct":
        return f"[INST] {body} [/INST]"
    raise ValueError(f"unknown conversation {conversation!r}; valid: {', '.join(CONVERSATIONS)}")


def chat_template_prompt(processor: Any, context: str, num_images: int) -> str:
    """The checkpoint's own chat template: images first, then the lmms-eval context."""
    if getattr(processor, "chat_template", None) is None:
        raise ValueError("prompt_style=chat_template, but the checkpoint's processor has no chat_template")
    text = context.replace(IMAGE_PLACEHOLDER, "").strip() if IMAGE_PLACEHOLDER in context else context
    content: List[dict] = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def llava_prompt_ids(tokenizer: Any, prompt: str, image_token_id: int) -> List[int]:
    """Token ids exactly as LLaVA's own `tokenizer_image_token` makes them (llava/mm_utils.py): the text on each side of
    every `<image>` is tokenized on its own (BOS added, then dropped from every chunk after the first) and one image id
    goes between the chunks.

    Why not the whole prompt with `<image>` as an added token: a Llama (SentencePiece) tokenizer starts every chunk with
    its dummy-prefix piece, so the original keeps a lone `▁` (29871 in Vicuna) before the `\n` that follows the image,
    which whole-prompt tokenization drops; a model trained on the original ids answers differently without it.
    """
    chunks: List[Sequence[int]] = [tokenizer(chunk, add_special_tokens=True)["input_ids"] for chunk in prompt.split(IMAGE_PLACEHOLDER)]
    offset = 1 if chunks[0] and chunks[0][0] == tokenizer.bos_token_id else 0
    ids: List[int] = list(chunks[0][:offset])
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(image_token_id)
        ids.extend(chunk[offset:])
    return ids


def build_prompt(style: str, processor: Any, context: str, num_images: int, conversation: str = "vicuna_v1") -> str:
    if style == "llava_v1":
        return llava_v1_prompt(context, num_images, conversation)
    if style == "chat_template":
        return chat_template_prompt(processor, context, num_images)
    if style == "lmms_eval":  # lmms-eval 0.7.3 resolves llava_hf to its chat model: the processor's chat template
        return chat_template_prompt(processor, context, num_images)
    raise ValueError(f"unknown prompt_style {style!r}; valid: {', '.join(PROMPT_STYLES)}")


def question_text(context: str) -> str:
    """The bare question for CLIP text guidance: no image placeholder, no answer-format instruction."""
    text = context.replace(IMAGE_PLACEHOLDER, " ")
    for pattern in ANSWER_FORMAT_PATTERNS:
        text = re.sub(pattern, " ", text, flags=re.IGNORECASE | re.MULTILINE)
    return re.sub(r"\s+", " ", text).strip()
