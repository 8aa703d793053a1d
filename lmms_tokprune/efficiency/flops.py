r"""Analytic FLOPs of LLaVA-1.5 and LLaVA-NeXT inference: LLM prefill, LLM decode, CLIP vision tower, projector.

Pure Python arithmetic (no torch, no transformers import) from a transformers config, a plain dict
(``config.json``) or a named preset (``vision_blocks_for`` alone asks the method registry, when a method is named).

Counting convention
-------------------
One multiply-add = 2 FLOPs. Only matrix multiplications are counted; element-wise work (norms,
softmax, rotary embedding, activations, residual adds, the embedding lookup) is left out — it is
below 0.5 % of the total for LLaVA-1.5. Attention is counted over the full ``s x s`` score matrix (no
causal halving), as LLM-Viewer (Yuan et al. 2024) does, the tool behind the FLOPs columns of the
Recoverable Compression, long-tail and PruMerge papers.

LLM (LLaMA/Vicuna decoder; hidden ``h``, MLP width ``f``, ``n_q`` query heads and ``n_kv`` key/value
heads of width ``d_h``, vocabulary ``V``), decoder layer ``l`` processing ``s_l`` tokens::

    linear_l    = 2 * s_l * h * (2 * n_q*d_h + 2 * n_kv*d_h)   # q, o  +  k, v projections
                + 2 * s_l * 3 * h * f                           # gate, up, down (SwiGLU MLP)
    attention_l = 2 * s_l^2 * n_q*d_h                           # Q K^T
                + 2 * s_l^2 * n_q*d_h                           # softmax(.) V
    prefill     = sum_l (linear_l + attention_l)  +  2 * h * V  # lm_head on the LAST position only

``s_l`` is the sequence length entering layer ``l`` (text + kept visual tokens), so a method that drops
tokens inside the LLM after layer ``K`` is counted with the shorter length from layer ``K+1`` on. The
``lm_head`` term covers one position: prefill needs only the last position's logits to produce the
first generated token (transformers computes just that row in ``generate``).

Decode, one generated token attending to ``T`` cached positions (the new one included)::

    decode = sum_l (2 * h * (2 * n_q*d_h + 2 * n_kv*d_h) + 2 * 3 * h * f + 4 * T_l * n_q*d_h) + 2 * h * V

CLIP vision tower (width ``D``, MLP width ``F``, patch ``p``, ``C`` channels, ``P`` patches), block ``b``
processing ``n_b`` tokens (CLS included; fewer when a method prunes inside CLIP)::

    patch_embed = 2 * P * (C * p^2) * D
    block_b     = 2 * n_b * (4 * D^2 + 2 * D * F) + 4 * n_b^2 * D
    vision      = patch_embed + sum_b block_b

``b`` runs over the blocks the engine actually runs (``llava/vision.py run_clip``): up to the feature block
(``vision_feature_layer``; LLaVA-1.5 / NeXT: -2, i.e. 23 of CLIP-L's 24 blocks), and all of them only when the
method reads the last block (its q/k or its output: ``MethodSpec.needs_qk`` / ``needs_last_block``, e.g. topk_cls,
PruMerge, Recoverable Compression, the long-tail method). ``vision_blocks=`` / ``--vision-blocks`` says which
(``"feature"`` default, ``"all"``, or a block count). The projector (LLaVA-1.5: ``mlp2x_gelu``, ``D -> h -> h``) costs
``2 * m * (D*h + h*h)`` for ``m`` visual tokens entering it (the kept tokens: methods compress the
pre-projector features).

Table 6 of Recoverable Compression (LLaVA-1.5-7B, 60 text tokens) reports the LLM prefill only:
8.5 TFLOPs at 576 visual tokens and 1.5 TFLOPs at ~10 % (58 visual tokens). This module gives
8.45 and 1.54 (``prefill_tflops_for("llava-1.5-7b", 576, 60)`` / ``(..., 58, 60)``; 1.52 at 57), i.e.
within 0.6 % and 2.4 %. The CLIP tower (0.38 TFLOPs per image) and the projector (0.024 TFLOPs at 576
tokens) are reported separately (``flops_report``); 0.38 TFLOPs is all 24 blocks, the tower up to LLaVA's
feature block (23 blocks, what runs for a method that does not read the last block) is 0.37 TFLOPs.

LLaVA-NeXT (``llava-next-7b`` = llava-hf/llava-v1.6-vicuna-7b-hf, ``llava-next-mistral-7b``, ``llava-next-13b``, or a
``llava_next`` checkpoint): an image is several CLIP passes, its *units* (the base image + each crop of its anyres grid:
3 for a 1x2 / 2x1 grid, 4 for 1x3 / 3x1, 5 for 2x2), so the tower costs ``units x`` the per-unit count above. The LLM
receives 576 base tokens + the unpadded grid's H'*W' patch tokens + H' newline tokens (*layout* tokens: in the
sequence, never through the projector); e.g. a 672x672 image: 5 units, 576 + 48*48 = 2880 patch tokens + 48 newlines.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

__all__ = [
    "LlavaFlopsConfig",
    "ProjectorConfig",
    "TextConfig",
    "VisionConfig",
    "MODEL_TYPES",
    "PRESETS",
    "clip_units",
    "flops_report",
    "from_llava_config",
    "llm_decode_flops",
    "llm_prefill_flops",
    "llava_config_for",
    "preset",
    "prefill_tflops_for",
    "projector_flops",
    "vision_blocks_for",
    "vision_flops",
]

TERA = 1e12
Number = Union[int, float]


@dataclass(frozen=True)
class TextConfig:
    """What the LLM FLOPs depend on (LLaMA-style decoder with a gated MLP)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    head_dim: Optional[int] = None  # default hidden_size // num_heads
    gated_mlp: bool = True  # SwiGLU: gate + up + down (3 matrices); False: up + down

    def __post_init__(self) -> None:
        for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"text config {key}={value!r} must be an integer >= 1")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; give head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)

    @property
    def q_width(self) -> int:
        return self.num_heads * int(self.head_dim)  # type: ignore[arg-type]

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * int(self.head_dim)  # type: ignore[arg-type]

    def linear_flops_per_token(self) -> float:
        """Projections + MLP of ONE decoder layer for one token."""
        h = self.hidden_size
        attn = 2 * h * (2 * self.q_width + 2 * self.kv_width)
        mlp = 2 * (3 if self.gated_mlp else 2) * h * self.intermediate_size
        return float(attn + mlp)


@dataclass(frozen=True)
class VisionConfig:
    """A CLIP ViT vision tower."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    # The hidden_states index the LLM is fed (LlavaConfig.vision_feature_layer, HF convention: i = after block i,
    # negative from the end): the engine runs CLIP up to that block unless the method reads the last one.
    # -1 (a bare tower: its output); LLaVA checkpoints and presets carry their own (-2).
    feature_layer: int = -1

    def __post_init__(self) -> None:
        for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size", "patch_size", "num_channels"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"vision config {key}={value!r} must be an integer >= 1")
        if isinstance(self.feature_layer, bool) or not isinstance(self.feature_layer, int) or not 1 <= self._resolve(self.feature_layer) <= self.num_layers:
            raise ValueError(f"vision config feature_layer={self.feature_layer!r} is outside the {self.num_layers}-block tower "
                             f"(an index in 1..{self.num_layers} or -1..-{self.num_layers})")

    def _resolve(self, layer: int) -> int:
        return layer if layer >= 0 else self.num_layers + 1 + layer

    @property
    def feature_blocks(self) -> int:
        """Blocks run to get the features (LLaVA's vision_feature_layer -2 on CLIP-L: 23 of 24)."""
        return self._resolve(self.feature_layer)

    def blocks_run(self, blocks: Union[None, str, int] = None) -> int:
        """Blocks the engine runs per unit: "feature" / None = up to the feature block, "all" = every block (a method
        that reads the last block's q/k or output), or a count in 1..num_layers."""
        if blocks is None or blocks == "feature":
            return self.feature_blocks
        if blocks == "all":
            return self.num_layers
        if isinstance(blocks, bool) or not isinstance(blocks, int) or not 1 <= blocks <= self.num_layers:
            raise ValueError(f"vision_blocks={blocks!r} must be 'feature', 'all' or a block count in 1..{self.num_layers}")
        return blocks

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Patches + CLS (577 for ViT-L/14 at 336 px)."""
        return self.num_patches + 1


@dataclass(frozen=True)
class ProjectorConfig:
    """The multimodal projector as a chain of Linear widths, e.g. (1024, 4096, 4096) for mlp2x_gelu."""

    dims: Tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.dims) < 2 or any(not isinstance(d, int) or d < 1 for d in self.dims):
            raise ValueError(f"projector dims {self.dims!r} must be >= 2 positive integers")

    def flops_per_token(self) -> float:
        return float(sum(2 * a * b for a, b in zip(self.dims[:-1], self.dims[1:])))


@dataclass(frozen=True)
class LlavaFlopsConfig:
    """Everything the FLOPs of one LLaVA model depend on."""

    name: str
    text: TextConfig
    vision: VisionConfig
    projector: ProjectorConfig
    # transformers model_type: 'llava' (LLaVA-1.5: one CLIP pass per image) or 'llava_next' (one per unit: the base
    # image + each crop of its anyres grid)
    model_type: str = "llava"


def _vicuna(hidden: int, inter: int, layers: int, heads: int) -> TextConfig:
    return TextConfig(hidden, inter, layers, heads, heads, 32064)


NEXT_MODEL_TYPE = "llava_next"
VIDEO_MODEL_TYPE = "video_llava"
MODEL_TYPES = ("llava", NEXT_MODEL_TYPE, VIDEO_MODEL_TYPE)


# LLaVA feeds the LLM CLIP's penultimate block (vision_feature_layer -2): 23 of the 24 blocks run unless a method reads the last
_CLIP_L_336 = VisionConfig(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, image_size=336, patch_size=14,
                           feature_layer=-2)
# Video-LLaVA's LanguageBind towers (image and video): CLIP ViT-L/14 at 224 px, CLS + 16 x 16 patches, feature layer -2
_CLIP_L_224 = VisionConfig(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, image_size=224, patch_size=14,
                           feature_layer=-2)

PRESETS: Dict[str, LlavaFlopsConfig] = {
    # llava-hf/llava-1.5-7b-hf: Vicuna-7B (vocab 32064 after adding <image> and <pad>) + CLIP ViT-L/14-336
    "llava-1.5-7b": LlavaFlopsConfig("llava-1.5-7b", _vicuna(4096, 11008, 32, 32), _CLIP_L_336, ProjectorConfig((1024, 4096, 4096))),
    "llava-1.5-13b": LlavaFlopsConfig("llava-1.5-13b", _vicuna(5120, 13824, 40, 40), _CLIP_L_336, ProjectorConfig((1024, 5120, 5120))),
    # llava-hf/llava-v1.6-vicuna-7b-hf (LLaVA-NeXT): lmsys/vicuna-7b-v1.5 (4096 wide, MLP 11008, 32 layers, 32 heads, no GQA,
    # vocab 32064) + CLIP ViT-L/14-336 (vision_feature_layer -2) + a 1024 -> 4096 -> 4096 GELU projector; the anyres grid
    # (pinpoints 336x672, 672x336, 672x672, 1008x336, 336x1008) makes an image 1 + 2..4 units, each one CLIP pass
    "llava-next-7b": LlavaFlopsConfig("llava-next-7b", _vicuna(4096, 11008, 32, 32), _CLIP_L_336, ProjectorConfig((1024, 4096, 4096)),
                                      NEXT_MODEL_TYPE),
    # llava-hf/llava-v1.6-mistral-7b-hf: Mistral-7B-Instruct-v0.2 (4096 wide, MLP 14336, 32 layers, 32 query heads and 8
    # key/value heads of 128, vocab 32064 after LLaVA's added tokens; its sliding window, if any, is >= 4096 and never
    # shortens a NeXT prompt) + the same CLIP and projector widths
    "llava-next-mistral-7b": LlavaFlopsConfig("llava-next-mistral-7b", TextConfig(4096, 14336, 32, 32, 8, 32064), _CLIP_L_336,
                                              ProjectorConfig((1024, 4096, 4096)), NEXT_MODEL_TYPE),
    # llava-hf/llava-v1.6-vicuna-13b-hf: lmsys/vicuna-13b-v1.5 (5120 wide, MLP 13824, 40 layers, 40 heads, vocab 32064)
    "llava-next-13b": LlavaFlopsConfig("llava-next-13b", _vicuna(5120, 13824, 40, 40), _CLIP_L_336, ProjectorConfig((1024, 5120, 5120)),
                                       NEXT_MODEL_TYPE),
    # LanguageBind/Video-LLaVA-7B-hf: Vicuna-7B v1.5 (vocab 32064 after <image>, <video> and <pad>) + the LanguageBind CLIP
    # ViT-L/14-224 towers; a video is 8 frames, each one CLIP pass of the video tower (units), an image one pass of the image tower
    "video-llava-7b": LlavaFlopsConfig("video-llava-7b", _vicuna(4096, 11008, 32, 32), _CLIP_L_224, ProjectorConfig((1024, 4096, 4096)),
                                       VIDEO_MODEL_TYPE),
}
_ALIASES = {
    "llava-hf/llava-1.5-7b-hf": "llava-1.5-7b",
    "liuhaotian/llava-v1.5-7b": "llava-1.5-7b",
    "llava-v1.5-7b": "llava-1.5-7b",
    "llava-hf/llava-1.5-13b-hf": "llava-1.5-13b",
    "liuhaotian/llava-v1.5-13b": "llava-1.5-13b",
    "llava-v1.5-13b": "llava-1.5-13b",
    "llava-hf/llava-v1.6-vicuna-7b-hf": "llava-next-7b",
    "liuhaotian/llava-v1.6-vicuna-7b": "llava-next-7b",
    "llava-v1.6-vicuna-7b": "llava-next-7b",
    "llava-next-vicuna-7b": "llava-next-7b",
    "llava-hf/llava-v1.6-mistral-7b-hf": "llava-next-mistral-7b",
    "liuhaotian/llava-v1.6-mistral-7b": "llava-next-mistral-7b",
    "llava-v1.6-mistral-7b": "llava-next-mistral-7b",
    "llava-hf/llava-v1.6-vicuna-13b-hf": "llava-next-13b",
    "liuhaotian/llava-v1.6-vicuna-13b": "llava-next-13b",
    "llava-v1.6-vicuna-13b": "llava-next-13b",
    "LanguageBind/Video-LLaVA-7B-hf": "video-llava-7b",
    "LanguageBind/Video-LLaVA-7B": "video-llava-7b",
}


def preset(name: str) -> LlavaFlopsConfig:
    """A named preset (`llava-1.5-7b`, `llava-1.5-13b`, `llava-next-7b`, `llava-next-mistral-7b`, `llava-next-13b`; hub ids
    of those checkpoints and `llava-v1.6-*` names are accepted too)."""
    key = _ALIASES.get(name, name)
    if key not in PRESETS:
        raise ValueError(f"unknown FLOPs preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[key]


# -- configs from transformers objects or config.json dicts ---------------------------------------
def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = cfg.get(name) if isinstance(cfg, Mapping) else getattr(cfg, name, None)
        if value is not None:
            return value
    return default


_UNGATED_MODEL_TYPES = ("gpt2", "opt", "phi", "gpt_neox")


def text_config_from(cfg: Any) -> TextConfig:
    """TextConfig from a transformers LLaMA-style config (object or dict) or a TextConfig."""
    if isinstance(cfg, TextConfig):
        return cfg
    heads = _get(cfg, "num_attention_heads", "num_heads")
    hidden = _get(cfg, "hidden_size")
    missing = [k for k, v in (("hidden_size", hidden), ("num_attention_heads", heads)) if v is None]
    if missing:
        raise ValueError(f"text config lacks {', '.join(missing)}")
    return TextConfig(
        hidden_size=int(hidden),
        intermediate_size=int(_get(cfg, "intermediate_size", default=4 * int(hidden))),
        num_layers=int(_get(cfg, "num_hidden_layers", "num_layers")),
        num_heads=int(heads),
        num_kv_heads=int(_get(cfg, "num_key_value_heads", "num_kv_heads", default=heads)),
        vocab_size=int(_get(cfg, "vocab_size")),
        head_dim=_get(cfg, "head_dim"),
        gated_mlp=str(_get(cfg, "model_type", default="llama")) not in _UNGATED_MODEL_TYPES,
    )


def vision_config_from(cfg: Any) -> VisionConfig:
    """VisionConfig from a transformers CLIPVisionConfig (object or dict) or a VisionConfig."""
    if isinstance(cfg, VisionConfig):
        return cfg
    return VisionConfig(
        hidden_size=int(_get(cfg, "hidden_size")),
        intermediate_size=int(_get(cfg, "intermediate_size")),
        num_layers=int(_get(cfg, "num_hidden_layers", "num_layers")),
        num_heads=int(_get(cfg, "num_attention_heads", "num_heads")),
        image_size=int(_get(cfg, "image_size", default=336)),
        patch_size=int(_get(cfg, "patch_size", default=14)),
        num_channels=int(_get(cfg, "num_channels", default=3)),
        feature_layer=int(_get(cfg, "feature_layer", default=-1)),
    )


def from_llava_config(cfg: Any, name: str = "") -> LlavaFlopsConfig:
    """LlavaFlopsConfig from a transformers ``LlavaConfig`` / ``LlavaNextConfig`` (or its ``config.json`` as a dict)."""
    text_cfg = _get(cfg, "text_config")
    vision_cfg = _get(cfg, "vision_config")
    if text_cfg is None or vision_cfg is None:
        raise ValueError("not a LLaVA config: it needs text_config and vision_config")
    text = text_config_from(text_cfg)
    vision = vision_config_from(vision_cfg)
    layers = _get(cfg, "vision_feature_layer", default=-2)
    n_feature_layers = len(layers) if isinstance(layers, (list, tuple)) else 1
    # the deepest feature layer is where CLIP can stop (several layers: the projector reads them all)
    deepest = max((int(x) for x in (layers if isinstance(layers, (list, tuple)) else [layers])),
                  key=lambda x: x if x >= 0 else vision.num_layers + 1 + x)
    vision = replace(vision, feature_layer=deepest)
    proj_in = vision.hidden_size * n_feature_layers
    model_type = str(_get(cfg, "model_type", default="llava"))
    return LlavaFlopsConfig(name or str(_get(cfg, "_name_or_path", default="") or model_type), text, vision,
                            ProjectorConfig((proj_in, text.hidden_size, text.hidden_size)), model_type)


def llava_config_for(source: Any) -> LlavaFlopsConfig:
    """Resolve a preset name, a checkpoint folder (its config.json), a LlavaConfig/dict, or pass through."""
    if isinstance(source, LlavaFlopsConfig):
        return source
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        if text in PRESETS or text in _ALIASES:
            return preset(text)
        config_json = os.path.join(text, "config.json")
        if os.path.isfile(config_json):
            with open(config_json) as fh:
                data = json.load(fh)
            if data.get("model_type") not in MODEL_TYPES:
                raise ValueError(f"{text!r} is a {data.get('model_type', 'unknown')!r} checkpoint; FLOPs are computed for LLaVA-1.5 "
                                 "and LLaVA-NeXT checkpoints (model_type 'llava' / 'llava_next', e.g. llava-hf/llava-1.5-7b-hf, "
                                 "llava-hf/llava-v1.6-vicuna-7b-hf)")
            return from_llava_config(data, name=text)
        raise ValueError(f"{text!r} is neither a FLOPs preset nor a checkpoint folder with config.json; "
                         f"valid presets: {', '.join(PRESETS)}")
    return from_llava_config(source)


# -- the counts ----------------------------------------------------------------------------------
def _per_layer(values: Union[Number, Sequence[Number]], n_layers: int, what: str, unit: str) -> Sequence[float]:
    """One number -> the same for every layer; a sequence must have one entry per layer."""
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        seq: Sequence[Number] = [values] * n_layers
    else:
        seq = list(values)
        if len(seq) != n_layers:
            raise ValueError(f"{what}: got {len(seq)} per-{unit} values for {n_layers} {unit}s")
    for value in seq:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{what}: token counts must be finite numbers >= 0, got {value!r}")
    return [float(v) for v in seq]


def llm_prefill_flops(text_cfg: Any, layer_seq_lens: Union[Number, Sequence[Number]], lm_head: bool = True) -> float:
    """LLM prefill FLOPs; ``layer_seq_lens`` = tokens entering each decoder layer (one number = all layers).

    ``lm_head=True`` adds the logits of the last position (what prefill needs for the first token).
    """
    text = text_config_from(text_cfg)
    lengths = _per_layer(layer_seq_lens, text.num_layers, "llm_prefill_flops", "layer")
    per_token = text.linear_flops_per_token()
    total = sum(s * per_token + 4.0 * s * s * text.q_width for s in lengths)
    if lm_head and lengths and lengths[-1] > 0:
        total += 2.0 * text.hidden_size * text.vocab_size
    return float(total)


def llm_decode_flops(text_cfg: Any, kv_len: Union[Number, Sequence[Number]], layers: Optional[int] = None, lm_head: bool = True) -> float:
    """FLOPs of generating ONE token that attends to ``kv_len`` cached positions (new one included).

    ``kv_len`` may be per layer (in-LLM pruning leaves shorter caches in later layers). ``layers``
    counts only the first ``layers`` decoder layers (default: all).
    """
    text = text_config_from(text_cfg)
    if layers is None:
        layers = text.num_layers
    if isinstance(layers, bool) or not isinstance(layers, int) or not 0 <= layers <= text.num_layers:
        raise ValueError(f"llm_decode_flops: layers={layers!r} must be an integer in [0, {text.num_layers}]")
    lengths = _per_layer(kv_len, layers, "llm_decode_flops", "layer")
    per_token = text.linear_flops_per_token()
    total = sum(per_token + 4.0 * t * text.q_width for t in lengths)
    if lm_head:
        total += 2.0 * text.hidden_size * text.vocab_size
    return float(total)


def vision_flops(vision_cfg: Any, block_token_counts: Optional[Union[Number, Sequence[Number]]] = None, patch_embed: bool = True,
                 blocks: Union[None, str, int] = None) -> float:
    """CLIP tower FLOPs of ONE unit (image / crop) over the blocks that run; ``block_token_counts`` = tokens (CLS
    included) entering each block (default: all 577 in every block).

    ``blocks`` = the blocks run (``VisionConfig.blocks_run``): default up to the feature block, ``"all"`` when the method
    reads the last block; a per-block ``block_token_counts`` list with ``blocks`` left out says it by its length."""
    vision = vision_config_from(vision_cfg)
    if blocks is None and block_token_counts is not None and not isinstance(block_token_counts, (int, float)):
        block_token_counts = list(block_token_counts)
        n_blocks = len(block_token_counts)
        if not 1 <= n_blocks <= vision.num_layers:
            raise ValueError(f"vision_flops: got {n_blocks} per-block values for a {vision.num_layers}-block tower")
    else:
        n_blocks = vision.blocks_run(blocks)
    counts = _per_layer(vision.num_tokens if block_token_counts is None else block_token_counts, n_blocks, "vision_flops", "block")
    d, f = vision.hidden_size, vision.intermediate_size
    total = 0.0
    for n in counts:
        total += 2.0 * n * (4 * d * d + 2 * d * f) + 4.0 * n * n * d
    if patch_embed:
        total += 2.0 * vision.num_patches * vision.num_channels * vision.patch_size**2 * d
    return float(total)


def vision_blocks_for(method: Optional[str], given: Union[None, str, int] = None) -> Union[None, str, int]:
    """The CLIP blocks the engine runs for `method` (``llava/vision.py run_clip``): ``"all"`` when the method reads the
    last block (its q/k or its output: ``MethodSpec.needs_qk`` / ``needs_last_block``), else ``"feature"``; an explicit
    ``given`` wins, and no method leaves it to the default. (The one import of the method registry here, made only
    when a method is named.)"""
    if given is not None or method is None:
        return given
    from ..methods import get_method

    spec = get_method(method)
    return "all" if (spec.needs_qk or spec.needs_last_block) else "feature"


def projector_flops(projector_cfg: Any, visual_tokens: Number) -> float:
    """Projector FLOPs for ``visual_tokens`` tokens entering it."""
    proj = projector_cfg if isinstance(projector_cfg, ProjectorConfig) else ProjectorConfig(tuple(int(d) for d in projector_cfg))
    if isinstance(visual_tokens, bool) or not isinstance(visual_tokens, (int, float)) or visual_tokens < 0:
        raise ValueError(f"projector_flops: visual_tokens must be a number >= 0, got {visual_tokens!r}")
    return float(visual_tokens) * proj.flops_per_token()


def _sequence(visual_tokens: Number, text_tokens: Number, layout_tokens: Number = 0) -> Number:
    for key, value in (("visual_tokens", visual_tokens), ("text_tokens", text_tokens), ("layout_tokens", layout_tokens)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
    return visual_tokens + layout_tokens + text_tokens


def prefill_tflops_for(config_or_preset: Any, visual_tokens: Number, text_tokens: Number,
                       layer_seq_lens: Optional[Sequence[Number]] = None, layout_tokens: Number = 0) -> float:
    """LLM prefill TFLOPs (the papers' convention: LLM only) for a preset name, checkpoint folder,
    LlavaConfig or LlavaFlopsConfig. ``layer_seq_lens`` overrides the constant length
    ``visual_tokens + layout_tokens + text_tokens`` per layer (in-LLM pruning); ``layout_tokens`` = the tokens the LLM
    receives that are not patches (LLaVA-NeXT's newline tokens)."""
    cfg = llava_config_for(config_or_preset)
    seq = _sequence(visual_tokens, text_tokens, layout_tokens)
    lengths: Union[Number, Sequence[Number]] = seq if layer_seq_lens is None else layer_seq_lens
    return llm_prefill_flops(cfg.text, lengths) / TERA


def _count_arg(name: str, value: Optional[int]) -> Optional[int]:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def clip_units(cfg: LlavaFlopsConfig, units: Optional[int] = None, images: Optional[int] = None) -> int:
    """CLIP passes the vision tower makes: ``units`` (LLaVA-NeXT: the base image + each crop of every image, e.g. 5 for
    one image on a 2x2 grid); ``images`` is the same count on LLaVA-1.5 (one pass per image), where giving both with
    different values is an error. On LLaVA-NeXT an image count alone does not say how many passes: ``units`` is
    needed. Neither: 1."""
    units, images = _count_arg("units", units), _count_arg("images", images)
    if cfg.model_type == NEXT_MODEL_TYPE:
        if units is None and images is not None:
            raise ValueError(f"{cfg.name} is a LLaVA-NeXT model: an image is 1 + its crops CLIP passes (units); give units "
                             "(e.g. 5 for one image on a 2x2 grid, 3 for 1x2) instead of images")
        if units is not None and images is not None and units < images:
            raise ValueError(f"units={units} is fewer than images={images}: every LLaVA-NeXT image is at least its base unit")
        return 1 if units is None else units
    if cfg.model_type == VIDEO_MODEL_TYPE:  # a video is 8 units (frames through the video tower), an image 1
        if units is not None and images is not None and units < images:
            raise ValueError(f"units={units} is fewer than images={images}: every Video-LLaVA image is one unit, a video 8")
        return units if units is not None else (images if images is not None else 1)
    if units is not None and images is not None and units != images:
        raise ValueError(f"units={units} and images={images}: on {cfg.name} (LLaVA-1.5) a unit is an image; give one of them")
    return units if units is not None else (images if images is not None else 1)


def flops_report(config_or_preset: Any, visual_tokens: Number, text_tokens: Number,
                 layer_seq_lens: Optional[Sequence[Number]] = None,
                 vision_block_tokens: Optional[Sequence[Number]] = None, images: Optional[int] = None,
                 vision_blocks: Union[None, str, int] = None, units: Optional[int] = None,
                 layout_tokens: Number = 0) -> Dict[str, Any]:
    """All the numbers `lmms-tokprune flops --json` prints (TFLOPs unless named otherwise).

    ``prefill_tflops`` = LLM prefill only (Table 6 convention) over ``visual_tokens + layout_tokens + text_tokens``
    (``layout_tokens``: LLaVA-NeXT's newline tokens, which enter the LLM but not the projector);
    ``total_prefill_tflops`` adds the CLIP tower (``units`` CLIP passes, see ``clip_units``: LLaVA-1.5 one per image,
    LLaVA-NeXT the base image + each crop) and the projector (``visual_tokens`` tokens); decode is per generated
    token at a KV length equal to the prefill sequence (last layer's length when the LLM prunes).
    ``vision_blocks``: the CLIP blocks that run (``"feature"`` default: up to the feature block, as the engine runs
    it; ``"all"`` for a method that reads the last block; a count); a ``vision_block_tokens`` list left alone says
    it by its length.
    """
    cfg = llava_config_for(config_or_preset)
    seq = _sequence(visual_tokens, text_tokens, layout_tokens)
    n_units = clip_units(cfg, units, images)
    if vision_blocks is None and vision_block_tokens is not None:
        blocks_run = len(list(vision_block_tokens))
    else:
        blocks_run = cfg.vision.blocks_run(vision_blocks)
    lengths: Union[Number, Sequence[Number]] = seq if layer_seq_lens is None else list(layer_seq_lens)
    llm = llm_prefill_flops(cfg.text, lengths) / TERA
    per_unit = vision_flops(cfg.vision, vision_block_tokens, blocks=blocks_run) / TERA
    vision = n_units * per_unit
    projector = projector_flops(cfg.projector, visual_tokens) / TERA
    kv = lengths if layer_seq_lens is not None else seq
    out: Dict[str, Any] = {
        "model": cfg.name,
        "model_type": cfg.model_type,
        "visual_tokens": visual_tokens,
        "layout_tokens": layout_tokens,
        "text_tokens": text_tokens,
        "sequence_length": seq,
        "prefill_tflops": llm,
        "llm_prefill_tflops": llm,
        "vision_tflops": vision,
        "vision_tflops_per_unit": per_unit,
        "units": n_units,
        "projector_tflops": projector,
        "total_prefill_tflops": llm + vision + projector,
        "decode_tflops_per_token": llm_decode_flops(cfg.text, kv) / TERA,
        "llm_layers": cfg.text.num_layers,
        "vision_blocks": blocks_run,
        "convention": "multiply-add = 2 FLOPs; matmuls only; full (non-causal) attention scores; lm_head on the last position",
    }
    if layer_seq_lens is not None:
        out["layer_seq_lens"] = list(layer_seq_lens)
        out["mean_layer_seq_len"] = sum(layer_seq_lens) / len(layer_seq_lens)
    if images is not None:
        out["images"] = images
    if vision_block_tokens is not None:
        out["vision_block_tokens"] = list(vision_block_tokens)
    out["config"] = {"text": asdict(cfg.text), "vision": asdict(cfg.vision), "projector": list(cfg.projector.dims)}
    return out
