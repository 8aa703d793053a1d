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
from typing import Callable, Dict, Iterator, List, Optional

import torch
from torch import nn


@dataclass
class VisionStates:
    """Captured CLIP states for a batch of images (all [B, 1+N', D])."""

    hidden: torch.Tensor  # penultimate block output (LLaVA's feature layer), incl. CLS
    q: Optional[torch.Tensor] = None  # last block q_proj output
    k: Optional[torch.Tensor] = None  # last block k_proj output
    last_hidden: Optional[torch.Tensor] = None  # last block output, no post-layernorm
    kept_index: Optional[torch.Tensor] = None  # [B, 1+N'] patch positions kept by an in-CLIP stage


# A token filter runs inside CLIP after a block: (hidden, q, k, block_index) -> kept positions
# [B, 1+N'] (CLS first) or None to keep all. Used by the long-tail method.
TokenFilter = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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


def run_clip(
    vision_tower: nn.Module,
    pixel_values: torch.Tensor,
    feature_layer: int = -2,
    need_last_block: bool = False,
    need_qk: bool = False,
    token_filter: Optional[TokenFilter] = None,
    filter_after_block: int = 0,
) -> VisionStates:
    """Run CLIP; return the feature layer (incl. CLS) and, if asked, the last block's q/k/output.

    token_filter, if given, is called after block `filter_after_block` (1-based) with that block's
    output and raw q/k; the tokens it keeps are the only ones the later blocks see.
    """
    embeddings, pre_norm, layers = clip_parts(vision_tower)
    num_layers = len(layers)
    feature_blocks = resolve_layer(feature_layer, num_layers)
    last_needed = num_layers if (need_last_block or need_qk) else feature_blocks
    if token_filter is not None and not 1 <= filter_after_block < feature_blocks:
        raise ValueError(f"in-CLIP pruning after block {filter_after_block} must come before the feature block {feature_blocks}")
    dtype = next(vision_tower.parameters()).dtype
    h = pre_norm(embeddings(pixel_values.to(dtype)))
    states = VisionStates(hidden=h)
    for block_no in range(1, last_needed + 1):
        layer = layers[block_no - 1]
        want_qk = (need_qk and block_no == num_layers) or (token_filter is not None and block_no == filter_after_block)
        if want_qk:
            with capture_outputs({"q": layer.self_attn.q_proj, "k": layer.self_attn.k_proj}) as got:
                h = layer(h, None)
        else:
            h = layer(h, None)
        if token_filter is not None and block_no == filter_after_block:
            keep = token_filter(h, got["q"], got["k"])  # [B, 1+N'] positions, CLS first
            h = torch.gather(h, 1, keep.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
            states.kept_index = keep
        if block_no == feature_blocks:
            states.hidden = h
        if block_no == num_layers and need_qk:
            states.q, states.k = got["q"], got["k"]
    if need_last_block:
        states.last_hidden = h
    return states
