"""Tiny, offline, LLaVA-1.5-shaped checkpoints and their parts (public: tests, the bench, sweeps' ``@tiny``
and the demo recipe build on them).

Nothing here touches the network.  ``build_tiny_llava`` writes a folder that loads through exactly the path a
real checkpoint takes::

    LlavaForConditionalGeneration.from_pretrained(d)    # CLIP 336px/14 (577 tokens) -> 2-layer MLP -> Llama
    AutoProcessor.from_pretrained(d)                    # LlavaProcessor: CLIPImageProcessor + Llama tokenizer

The geometry matches llava-hf/llava-1.5-7b-hf (image_size 336, patch 14, 1 CLS + 576 patches,
vision_feature_layer -2, 'default' select strategy, one ``<image>`` expanded to 576 tokens, the same image
preprocessing and chat template); only the widths, depths and vocabulary are small and the weights random.

``build_tiny_clip_text_encoder`` writes a matching tiny ``CLIPModel`` (+ CLIP tokenizer / processor) whose vision
tower has the tiny LLaVA's geometry (and, given ``llava_dir``, its weights), for Recoverable Compression's
text-guided step.

``tiny_llava_dir()`` / ``tiny_clip_dir()`` build once into a cache folder ($LMMS_TOKPRUNE_CACHE or
~/.cache/lmms_tokprune) and return it.

The parts are public too: ``llama_tokenizer()`` / ``clip_tokenizer()`` (small local tokenizers trained on a
built-in corpus, optionally with more sentences), ``image_processor()`` (== llava-hf/llava-1.5-7b-hf's CLIP
preprocessing), ``llava_processor(tokenizer)`` -- these live in :mod:`lmms_tokprune.offline_processors` (production
code such as `lmms-tokprune bench` needs them; it never imports this test package) and are re-exported here -- and the
config builders ``clip_vision_config`` / ``llama_text_config``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .. import offline_processors
from ..offline_processors import (  # the processors production code needs too live there; re-exported here
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_SIZE,
    LLAVA_CHAT_TEMPLATE,
    LLAVA_SYSTEM_PROMPT,
    NUM_PATCHES,
    PATCH_SIZE,
    clip_tokenizer,
    image_processor,
    llama_tokenizer,
    llava_processor,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGE_SIZE",
    "LLAVA_CHAT_TEMPLATE",
    "LLAVA_SYSTEM_PROMPT",
    "NUM_PATCHES",
    "PATCH_SIZE",
    "TINY_HIDDEN",
    "TINY_VERSION",
    "build_tiny_clip_text_encoder",
    "build_tiny_llava",
    "cache_root",
    "clip_tokenizer",
    "clip_vision_config",
    "image_processor",
    "llama_text_config",
    "llama_tokenizer",
    "llava_processor",
    "tiny_clip_dir",
    "tiny_llava_dir",
]

# Bump when the artefacts change, so cached copies are rebuilt.
TINY_VERSION = "v1"

TINY_HIDDEN = 64
def cache_root() -> Path:
    env = os.environ.get("LMMS_TOKPRUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lmms_tokprune"


# --------------------------------------------------------------------------------------------- configs
def clip_vision_config(hidden: int, intermediate: int, layers: int, heads: int, projection_dim: int) -> dict:
    """A LLaVA-1.5-geometry CLIP vision config (336 px, patch 14); tiny test checkpoints and the demo recipe share it."""
    return {
        "model_type": "clip_vision_model",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_channels": 3,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "projection_dim": projection_dim,
    }


def llama_text_config(tok, hidden: int, intermediate: int, layers: int, heads: int) -> dict:
    """A small Llama config with the tokenizer's special ids; tiny test checkpoints and the demo recipe share it."""
    return {
        "model_type": "llama",
        "vocab_size": len(tok),
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def _vision_config_dict(vision_layers: int) -> dict:
    return clip_vision_config(TINY_HIDDEN, 2 * TINY_HIDDEN, vision_layers, 4, 32)


# --------------------------------------------------------------------------------------------- builders
def _prepare_out(out_dir: str | Path, overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def build_tiny_llava(
    out_dir: str | Path,
    *,
    seed: int = 0,
    text_layers: int = 2,
    vision_layers: int = 4,
    overwrite: bool = False,
) -> Path:
    """Write a tiny random LLaVA-1.5-shaped checkpoint (model + LlavaProcessor) to ``out_dir``; return it."""
    if vision_layers < 2:
        raise ValueError(f"vision_layers must be >= 2 (vision_feature_layer=-2), got {vision_layers}")
    if text_layers < 1:
        raise ValueError(f"text_layers must be >= 1, got {text_layers}")
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    out = _prepare_out(out_dir, overwrite)
    tok = llama_tokenizer()
    image_token_id = tok.convert_tokens_to_ids("<image>")
    text_config = llama_text_config(tok, TINY_HIDDEN, 2 * TINY_HIDDEN, text_layers, 4)
    config = LlavaConfig(
        vision_config=_vision_config_dict(vision_layers),
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=NUM_PATCHES,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    config.pad_token_id = tok.pad_token_id
    config.bos_token_id = tok.bos_token_id
    config.eos_token_id = tok.eos_token_id

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).float().eval()
    quiet = {i for t, i in tok.get_vocab().items() if t.startswith("<0x") and t.endswith(">") and len(t) == 6}
    quiet |= {tok.unk_token_id, tok.bos_token_id, tok.pad_token_id, image_token_id}
    _rescale_for_variety(model, seed, quiet)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)

    llava_processor(tok).save_pretrained(out)
    (out / "TINY_README.txt").write_text(
        f"lmms_tokprune tiny LLaVA-1.5 ({TINY_VERSION}), seed={seed}, text_layers={text_layers}, "
        f"vision_layers={vision_layers}; random weights, for tests only.\n"
    )
    return out


def _rescale_for_variety(model, seed: int, quiet_ids: set[int] | None = None) -> None:
    """Re-draw weights at a larger scale so greedy decoding is input-dependent and not one repeated id.

    With the default 0.02 init a 64-wide model is nearly input-independent (the image barely moves the
    logits).  Larger, deterministic weights make the tiny model sensitive to the image tokens, which is what
    compression tests need (keeping fewer tokens should be able to change the answer).
    """
    import torch

    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim < 2:
                continue  # norms / biases keep their init
            if name.startswith("model.vision_tower"):
                continue  # CLIP init is already O(1)-scaled per layer
            fan_in = p.shape[-1] if "embed" not in name else 1
            std = 1.0 / (fan_in**0.5) if "embed" not in name else 1.0
            if "q_proj" in name or "k_proj" in name:
                std *= 2.0  # sharper LLM attention: greedy answers depend on the image tokens
            p.copy_(torch.randn(p.shape, generator=g) * std)
        # Sharpen CLIP attention (q, k x4 => logits x16) so CLS attention over patches is peaked with a few
        # outliers, like a trained CLIP's, instead of near-uniform (what PruMerge-style selection keys on).
        for name, p in model.named_parameters():
            if name.startswith("model.vision_tower") and ("q_proj" in name or "k_proj" in name):
                p.mul_(4.0)
        # Make byte-fallback pieces and specials other than </s> (<unk>, <s>, <pad>, <image>) near-zero-logit, so
        # greedy answers are readable vocabulary pieces rather than raw bytes / control characters.
        if quiet_ids:
            head = model.get_output_embeddings().weight
            head[torch.as_tensor(sorted(quiet_ids))] *= 0.05


def build_tiny_clip_text_encoder(
    out_dir: str | Path,
    *,
    llava_dir: str | Path | None = None,
    seed: int = 1,
    overwrite: bool = False,
) -> Path:
    """Write a tiny ``CLIPModel`` + CLIP tokenizer/processor to ``out_dir``; return it.

    The vision config equals the tiny LLaVA's vision tower (64 wide, 336/14, same depth) and
    ``visual_projection`` is [projection_dim=32, 64].  Given ``llava_dir``, the vision tower weights (and depth)
    are copied from that LLaVA checkpoint so the pair is consistent.
    """
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    vision_layers = 4
    llava_vision_state = None
    if llava_dir is not None:
        from transformers import LlavaForConditionalGeneration

        llava = LlavaForConditionalGeneration.from_pretrained(llava_dir)
        vcfg = llava.config.vision_config
        if (vcfg.hidden_size, vcfg.image_size, vcfg.patch_size) != (TINY_HIDDEN, IMAGE_SIZE, PATCH_SIZE):
            raise ValueError(f"{llava_dir}: vision tower is not the tiny geometry ({TINY_HIDDEN}, {IMAGE_SIZE}/{PATCH_SIZE})")
        vision_layers = vcfg.num_hidden_layers
        tower = llava.model.vision_tower
        tower = getattr(tower, "vision_model", tower)  # older transformers wrap the transformer once more
        llava_vision_state = {k: v.detach().clone() for k, v in tower.state_dict().items()}
        del llava

    out = _prepare_out(out_dir, overwrite)
    tok = clip_tokenizer()
    vision = _vision_config_dict(vision_layers)
    vision.pop("model_type")
    text = {
        "vocab_size": len(tok),
        "hidden_size": TINY_HIDDEN,
        "intermediate_size": 2 * TINY_HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 32,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    torch.manual_seed(seed)
    model = CLIPModel(config).float().eval()
    if llava_vision_state is not None:
        target = getattr(model.vision_model, "vision_model", model.vision_model)
        missing, unexpected = target.load_state_dict(llava_vision_state, strict=False)
        if unexpected or [m for m in missing if "position_ids" not in m]:
            raise RuntimeError(f"vision tower mismatch: missing={missing} unexpected={unexpected}")
    model.save_pretrained(out, safe_serialization=True)
    CLIPProcessor(image_processor=image_processor(), tokenizer=tok).save_pretrained(out)
    (out / "TINY_README.txt").write_text(
        f"lmms_tokprune tiny CLIP ({TINY_VERSION}), seed={seed}, vision from {'llava' if llava_dir else 'random'}; "
        "random weights, for tests only.\n"
    )
    return out


# --------------------------------------------------------------------------------------------- cache
def _fingerprint() -> str:
    """Changes whenever this file or the processors' module changes, so stale cached copies are rebuilt."""
    import hashlib

    digest = hashlib.sha256(Path(__file__).read_bytes() + Path(offline_processors.__file__).read_bytes())  # tokenizers live there
    return f"{TINY_VERSION} {digest.hexdigest()[:16]}"


def _cached(name: str, build) -> Path:
    root = cache_root()
    final = root / name
    marker = final / ".complete"
    fp = _fingerprint()
    if marker.exists() and marker.read_text().strip() == fp:
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        build(tmp / "d")
        (tmp / "d" / ".complete").write_text(fp + "\n")
        if marker.exists() and marker.read_text().strip() == fp:
            return final  # another process finished first
        if final.exists():  # stale (older tiny.py) or half-written: move it aside, then swap in the new copy
            os.replace(final, tmp / "stale")
        try:
            os.replace(tmp / "d", final)
        except OSError:
            if not (marker.exists() and marker.read_text().strip() == fp):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def tiny_llava_dir() -> Path:
    """The default tiny LLaVA (seed 0, 2 text layers, 4 vision layers), built once into the cache."""
    return _cached(f"tiny-llava-{TINY_VERSION}", lambda d: build_tiny_llava(d))


def tiny_clip_dir() -> Path:
    """The tiny CLIP text encoder paired with ``tiny_llava_dir()`` (vision weights copied), built once."""
    llava = tiny_llava_dir()
    return _cached(f"tiny-clip-{TINY_VERSION}", lambda d: build_tiny_clip_text_encoder(d, llava_dir=llava))
