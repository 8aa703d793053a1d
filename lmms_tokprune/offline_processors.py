"""Processors that need no download: small local tokenizers and the released checkpoints' image-processor settings.

Production code builds models from a config with random weights where no checkpoint can be fetched (`lmms-tokprune
bench`: a full-width LLaVA-1.5 / LLaVA-NeXT) and needs the processor such a checkpoint would ship; the tiny test
checkpoints (:mod:`lmms_tokprune.testing`, which imports everything here) use the same parts. Nothing here touches
the network.

- ``llama_tokenizer()`` / ``clip_tokenizer()``: small Llama-style (SentencePiece-BPE, byte fallback, ``<image>`` and
  ``<pad>`` added) and OpenAI-CLIP-style tokenizers trained on a built-in corpus (optionally with more sentences);
- ``image_processor()`` == llava-hf/llava-1.5-7b-hf's CLIP preprocessing, ``llava_processor(tokenizer)`` its
  processor (one ``<image>`` -> 576 tokens, its chat template);
- ``next_image_processor(backend)`` == llava-hf/llava-v1.6-vicuna-7b-hf's anyres preprocessing (``GRID_PINPOINTS``),
  ``llava_next_processor(tokenizer, backend)`` its processor.
"""

from __future__ import annotations

import json

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "GRID_PINPOINTS",
    "IMAGE_SIZE",
    "LLAVA_CHAT_TEMPLATE",
    "LLAVA_SYSTEM_PROMPT",
    "NEXT_CHAT_TEMPLATE",
    "NUM_PATCHES",
    "PATCH_SIZE",
    "clip_tokenizer",
    "image_processor",
    "llama_tokenizer",
    "llava_next_processor",
    "llava_processor",
    "next_image_processor",
]

IMAGE_SIZE = 336
PATCH_SIZE = 14
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 576

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

LLAVA_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# llava-hf/llava-1.5-7b-hf's chat template (images first as "<image>\n", then text + " ", "ASSISTANT:" prompt).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Built-in English corpus for the tokenizers (no downloads).
_WORDS_TEXT = """
what which who where when why how is are does do can there the a an of in on to this that these those it its
colour color shape shapes object objects image picture photo shown show see seen visible many much number count
left right top bottom middle center centre above below next beside behind front large small big tiny biggest
smallest background foreground bright dark light
red green blue yellow orange purple pink brown black white gray grey cyan magenta
circle circles square squares triangle triangles rectangle rectangles ellipse ellipses star stars line lines
dot dots oval diamond
yes no true false none zero one two three four five six seven eight nine ten
0 1 2 3 4 5 6 7 8 9 10 11 12 A B C D E F Option Options option answer Answer letter
Question question Context Hint hint choose select correct best following from given
USER: ASSISTANT: USER ASSISTANT user assistant system
cat dog car bus person people man woman child tree house sky water road sign text written word words say says
"""
_WORDS = _WORDS_TEXT.split()

_SENTENCES = [
    LLAVA_SYSTEM_PROMPT,
    "USER: <image>\nWhat colour is the circle? ASSISTANT: Red",
    "USER: <image>\nWhat shape is shown in the image? ASSISTANT: Triangle",
    "USER: <image>\nHow many squares are there? ASSISTANT: Three",
    "USER: <image>\nIs there a blue star in the picture? ASSISTANT: Yes",
    "USER: <image>\nIs the background white? ASSISTANT: No",
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "Answer the question with a short answer. Please answer yes or no.",
    "A. red B. green C. blue D. yellow",
    "What is the colour of the largest shape?",
    "What is written on the sign? What does the text say?",
    "Describe the image in detail. Provide a short description of the picture.",
    "The image shows a red circle, a green square and a blue triangle on a white background.",
    "There are two circles and one rectangle. The answer is 2.",
    "Which object is on the left? Which one is on the right?",
    "Hello, world! I'm fine, thanks. It's a test: (1) 2, 3; 4 - 5 + 6 = 21 / 7 * 3 % 100.",
]


def _corpus(extra: tuple[str, ...] = ()) -> list[str]:
    return _SENTENCES * 8 + [" ".join(_WORDS)] * 4 + [w for w in _WORDS for _ in range(3)] + list(extra)


# --------------------------------------------------------------------------------------------- tokenizers
def llama_tokenizer(vocab_size: int = 640, extra_corpus: tuple[str, ...] = ()):
    """A Llama-style (SentencePiece-BPE, byte fallback, '▁' metaspace, BOS prepended) tokenizer.

    ``extra_corpus``: more training sentences (the trained demo checkpoint adds its benchmark's vocabulary).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]  # ids 3..258, as in Llama
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + byte_tokens, min_frequency=2, show_progress=False)
    trainer_tok.train_from_iterator(_corpus(tuple(extra_corpus)), trainer)
    model = json.loads(trainer_tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = LlamaTokenizer(
        vocab=model["vocab"],
        merges=merges,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=4096,
        padding_side="left",
    )
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = LLAVA_CHAT_TEMPLATE
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clip_tokenizer(vocab_size: int = 900, extra_corpus: tuple[str, ...] = ()):
    """An OpenAI-CLIP-style tokenizer (byte-level BPE, '</w>' suffix, lowercase), max length 77."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    alphabet = list(_bytes_to_unicode().values())
    trainer_tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    trainer_tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    trainer_tok.train_from_iterator(_corpus(tuple(extra_corpus)), trainer)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(trainer_tok.to_str())["model"]["merges"]]
    # Vocab in OpenAI CLIP's order: bytes, bytes + '</w>', merges, then the two specials.
    vocab: dict[str, int] = {}
    for piece in alphabet + [a + "</w>" for a in alphabet] + [a + b for a, b in merges] + [bos, eos]:
        vocab.setdefault(piece, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, bos_token=bos, eos_token=eos, pad_token=eos, unk_token=eos, model_max_length=77)


def image_processor():
    from transformers import CLIPImageProcessor

    # == llava-hf/llava-1.5-7b-hf preprocessor_config.json
    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": IMAGE_SIZE},
        resample=3,  # PIL bicubic
        do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )


def llava_processor(tokenizer):
    """llava-hf/llava-1.5-7b-hf's processor setup (CLIP 336 preprocessing, one <image> -> 576 tokens, chat template)."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=image_processor(),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


# --------------------------------------------------------------------------------------------- LLaVA-NeXT
GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6's anyres resolutions

# llava-hf/llava-v1.6-vicuna-7b-hf's processor template (images first as "<image>\n", then the text, "ASSISTANT:")
NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }}"
    "{% else %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
def next_image_processor(backend: str = "pil"):
    """== llava-hf/llava-v1.6-vicuna-7b-hf's preprocessor_config (anyres, CLIP mean/std, 336 crops, padding)."""
    from transformers import AutoImageProcessor  # noqa: F401  (resolves the backend classes)

    if backend == "pil":
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil as cls
    else:
        from transformers import LlavaNextImageProcessor as cls
    return cls(
        do_resize=True, size={"shortest_edge": IMAGE_SIZE}, resample=3, do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True, do_pad=True, image_grid_pinpoints=GRID_PINPOINTS,
    )


def llava_next_processor(tokenizer, backend: str = "pil"):
    """llava-hf/llava-v1.6-vicuna-7b-hf's processor setup (anyres preprocessing, one <image> -> base + grid tokens,
    its chat template) around `tokenizer`."""
    from transformers import LlavaNextProcessor

    return LlavaNextProcessor(image_processor=next_image_processor(backend), tokenizer=tokenizer, patch_size=PATCH_SIZE,
                              vision_feature_select_strategy="default", image_token="<image>", num_additional_image_tokens=1,
                              chat_template=NEXT_CHAT_TEMPLATE)


# --------------------------------------------------------------------------------------------- Video-LLaVA
VIDEO_IMAGE_SIZE = 224  # LanguageBind's towers: 224 px, patch 14 -> 16 x 16 patches (+ CLS)

# LanguageBind/Video-LLaVA-7B-hf's processor template in the llava-hf style: USER: <video>/<image> first, then the text, ASSISTANT:
VIDEO_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def video_tokenizer():
    """The small local Llama tokenizer with Video-LLaVA's two placeholders (``<image>``, ``<video>``) as special tokens."""
    tok = llama_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    return tok


def video_llava_processor(tokenizer):
    """LanguageBind/Video-LLaVA-7B-hf's processor setup around `tokenizer` (its image and video preprocessing: shortest
    edge 224, bicubic, centre crop 224, CLIP mean / std; one <video> -> 8 x 257 tokens, one <image> -> 256)."""
    from transformers import VideoLlavaImageProcessor, VideoLlavaProcessor
    from transformers.models.video_llava.video_processing_video_llava import VideoLlavaVideoProcessor

    image_processor = VideoLlavaImageProcessor(size={"shortest_edge": VIDEO_IMAGE_SIZE}, crop_size={"height": VIDEO_IMAGE_SIZE, "width": VIDEO_IMAGE_SIZE})
    return VideoLlavaProcessor(image_processor=image_processor, video_processor=VideoLlavaVideoProcessor(), tokenizer=tokenizer,
                               patch_size=PATCH_SIZE, vision_feature_select_strategy="default", image_token="<image>", video_token="<video>",
                               num_additional_image_tokens=1, chat_template=VIDEO_CHAT_TEMPLATE)
