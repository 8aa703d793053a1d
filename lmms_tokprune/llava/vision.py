"""LLaVA's CLIP forward, run block by block so we capture what methods need and stop early.

What a method needs is captured on THIS model instance only (forward hooks on the last block's
q_proj / k_proj modules, removed right after), never by patching a class, so one process can hold
several configurations. Blocks after the last one anybody needs are skipped: LLaVA itself only
uses the penultimate hidden states, so for methods that ignore the last block the features are
identical and the work is less.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from ..methods import VisionInputs


@dataclass
class VisionStates:
    """Captured CLIP states for a batch of images (all [B, 1+N', D])."""

    hidden: torch.Tensor  # penultimate block output (LLaVA's feature layer), incl. CLS
    q: Optional[torch.Tensor] = None  # last block q_proj output
    k: Optional[torch.Tensor] = None  # last block k_proj output
    last_hidden: Optional[torch.Tensor] = None  # last block output, no post-layernorm
    feature_q: Optional[torch.Tensor] = None  # q_proj output of the feature block (whose output is `hidden`)
    feature_k: Optional[torch.Tensor] = None  # k_proj output of the feature block
    kept_index: Optional[torch.Tensor] = None  # [B, 1+N'] patch positions kept by an in-CLIP stage
    token_mask: Optional[torch.Tensor] = None  # [B, 1+N'] bool: real tokens (False = padding) when counts differ per image


FLOAT32_INPUTS = ("text_embeds", "visual_projection", "feature_q", "feature_k")  # converted like the captured states


def as_vision_inputs(states: VisionStates, image_keys: Optional[List[int]] = None, **extra: Any) -> VisionInputs:
    """The method contract's inputs, built in one call from the captured states and what the engine adds (text
    guidance, projector outputs, the units' layout, valid patches, budgets). CLIP signals in float32 (method math
    never runs in fp16); `projected` stays in the LLM's dtype, as the releases read it."""
    as32 = lambda t: None if t is None else t.float()  # noqa: E731
    extra = {name: as32(value) if name in FLOAT32_INPUTS else value for name, value in extra.items()}
    return VisionInputs(as32(states.hidden), as32(states.q), as32(states.k), as32(states.last_hidden), image_keys=image_keys, **extra)


# A token filter runs inside CLIP after a block: (hidden, q, k) -> kept positions [B, 1+N'] (CLS
# first), or a pair (positions [B, W], valid [B, W] bool) when images keep different numbers of
# tokens: each row's real tokens first, padding (valid False) after. Used by the long-tail method.
TokenFilter = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]]
RAGGED_MODES = ("auto", "mask", "per_image")


def clip_parts(vision_tower: nn.Module):
    """The pieces of a transformers CLIPVisionModel; a clear error for any other tower."""
    model = getattr(vision_tower, "vision_model", vision_tower)
    needed = ("embeddings", "pre_layrnorm", "encoder")
    if not all(hasattr(model, n) for n in needed) or not hasattr(model.encoder, "layers"):
        raise ValueError(
            f"vision tower {type(vision_tower).__name__} is not a CLIP ViT (LLaVA-1.5 uses CLIPVisionModel); "
            "lmms_tokprune supports LLaVA-1.5-style checkpoints only"
        )
    return model.embeddings, model.pre_layrnorm, list(model.encoder.layers)


@contextmanager
def capture_outputs(modules: Dict[str, nn.Module]) -> Iterator[Dict[str, torch.Tensor]]:
    """Record the outputs of the given module instances during the `with` block."""
    store: Dict[str, torch.Tensor] = {}
    handles = []
    for name, module in modules.items():
        def hook(_mod, _inp, out, name=name):
            store[name] = out
        handles.append(module.register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def resolve_layer(index: int, num_layers: int) -> int:
    """A hidden_states index (HF convention: 0 = embeddings, i = after block i) -> block count."""
    resolved = index if index >= 0 else num_layers + 1 + index
    if not 1 <= resolved <= num_layers:
        raise ValueError(f"vision_feature_layer {index} is outside the {num_layers}-block tower")
    return resolved


def attention_implementation(layer: nn.Module) -> str:
    """The attention implementation a CLIP block runs with (eager when none is recorded)."""
    cfg = getattr(getattr(layer, "self_attn", None), "config", None)
    return getattr(cfg, "_attn_implementation", None) or "eager"


def key_padding_mask(valid: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """valid [B, W] bool -> a [B, 1, 1, W] key-padding mask every query shares.

    SDPA takes a boolean mask (True = attend); eager adds a float bias (0 / dtype min). Padded
    queries still see the real keys, so their rows stay finite (and are never read).
    """
    from .attention_masks import as_attention_mask

    return as_attention_mask(valid[:, None, None, :], implementation, dtype)


def _run_block(layer: nn.Module, h: torch.Tensor, token_mask: Optional[torch.Tensor], ragged: str, want_qk: bool):
    """One CLIP block over h [B, W, D]; rows with padding (token_mask False) are handled per `ragged`.

    Returns (h, q, k); q / k are the block's raw q_proj / k_proj outputs when want_qk (padded rows
    filled with zeros in per-image mode).
    """
    qk = {"q": layer.self_attn.q_proj, "k": layer.self_attn.k_proj}
    if token_mask is None or ragged == "mask":
        mask = None if token_mask is None else key_padding_mask(token_mask, attention_implementation(layer), h.dtype)
        if not want_qk:
            return layer(h, mask), None, None
        with capture_outputs(qk) as got:
            out = layer(h, mask)
        return out, got["q"], got["k"]
    # per_image: each image alone over its own real tokens (exactly what a batch of one computes)
    out = torch.zeros_like(h)
    q_all = torch.zeros_like(h) if want_qk else None
    k_all = torch.zeros_like(h) if want_qk else None
    for b, n in enumerate(token_mask.sum(dim=1).tolist()):
        x = h[b:b + 1, :n]
        if want_qk:
            with capture_outputs(qk) as got:
                out[b, :n] = layer(x, None)[0]
            q_all[b, :n], k_all[b, :n] = got["q"][0], got["k"][0]
        else:
            out[b, :n] = layer(x, None)[0]
    return out, q_all, k_all


def resolve_ragged(ragged: str, layer: nn.Module) -> str:
    """'auto' -> 'mask' where the block's attention takes a 4-D mask (sdpa, eager), else 'per_image'."""
    if ragged not in RAGGED_MODES:
        raise ValueError(f"unknown ragged mode {ragged!r}; valid: {', '.join(RAGGED_MODES)}")
    if ragged != "auto":
        return ragged
    return "mask" if attention_implementation(layer) in ("sdpa", "eager") else "per_image"


def run_clip(
    vision_tower: nn.Module,
    pixel_values: torch.Tensor,
    feature_layer: int = -2,
    need_last_block: bool = False,
    need_qk: bool = False,
    need_feature_qk: bool = False,
    token_filter: Optional[TokenFilter] = None,
    filter_after_block: int = 0,
    ragged: str = "auto",
) -> VisionStates:
    """Run CLIP; return the feature layer (incl. CLS) and, if asked, the last block's q/k/output and the feature
    block's own q/k (`need_feature_qk`: the peer methods' block 22).

    token_filter, if given, is called after block `filter_after_block` (1-based, at most the feature
    block) with that block's output and raw q/k; the tokens it keeps are the only ones the later
    blocks see. When it keeps a different number per image (it returns (positions, valid)), the later
    blocks run either on the padded batch with a key-padding mask (`ragged="mask"`) or image by image
    (`"per_image"`); "auto" picks the mask where the attention implementation takes one (sdpa,
    eager). Either way each image's real tokens get what a run of that image alone gives (up to
    floating-point rounding for "mask"), and `states.token_mask` marks the real tokens.
    """
    embeddings, pre_norm, layers = clip_parts(vision_tower)
    num_layers = len(layers)
    feature_blocks = resolve_layer(feature_layer, num_layers)
    last_needed = num_layers if (need_last_block or need_qk) else feature_blocks
    if token_filter is not None and not 1 <= filter_after_block <= feature_blocks:
        raise ValueError(
            f"in-CLIP pruning after block {filter_after_block} must come at or before the feature block {feature_blocks} "
            f"(this tower has {num_layers} blocks, features from block {feature_blocks})"
        )
    mode = resolve_ragged(ragged, layers[0])
    dtype = next(vision_tower.parameters()).dtype
    h = pre_norm(embeddings(pixel_values.to(dtype)))
    states = VisionStates(hidden=h)
    token_mask: Optional[torch.Tensor] = None
    for block_no in range(1, last_needed + 1):
        layer = layers[block_no - 1]
        want_qk = ((need_qk and block_no == num_layers) or (need_feature_qk and block_no == feature_blocks)
                   or (token_filter is not None and block_no == filter_after_block))
        h, q, k = _run_block(layer, h, token_mask, mode, want_qk)
        if token_filter is not None and block_no == filter_after_block:
            kept = token_filter(h, q, k)
            keep, valid = kept if isinstance(kept, tuple) else (kept, None)
            h = torch.gather(h, 1, keep.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
            states.kept_index = keep
            if valid is not None and not bool(valid.all()):
                token_mask = valid.to(device=h.device, dtype=torch.bool)
                states.token_mask = token_mask
        if block_no == feature_blocks:
            states.hidden = h
            if need_feature_qk:
                states.feature_q, states.feature_k = q, k
        if block_no == num_layers and need_qk:
            states.q, states.k = q, k
    if need_last_block:
        states.last_hidden = h
    return states
