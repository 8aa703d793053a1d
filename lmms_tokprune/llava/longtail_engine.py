"""LongtailLlava: the long-tail method's two stages inside LLaVA-1.5 (re-implementation, no reference code).

Stage 1 runs INSIDE CLIP: after block `clip_layer` (1-based; paper: "after the third layer") the
long-tail split of that block's CLS attention (`methods.longtail.stage1_keep`, the same pure
function `compress("longtail", ...)` uses) picks the patches; CLS and the kept patches (spatial
order) are the only tokens the later blocks process, so images in a batch carry different token
counts (padded with a key-padding mask, or run image by image; each image gets what a run of it
alone gives). LLaVA's feature layer (penultimate block) of the kept patches is what the projector
gets.

Stage 2 runs inside the LLM on the one decoder loop (`llm_pruning`): H2O heavy hitters + recent window over the
visual + text span, one cut before `llm_layer` (`methods.longtail.h2o_plan`).

Counts per sample (`SampleStats`):
  visual_tokens_in    576 per image;
  visual_tokens_kept  visual tokens that entered the LLM after stage 1 AND survived the prefill
                      pruning of stage 2 (the set the first answer token is decoded over; tokens
                      evicted later while generating, `decode_eviction`, are not subtracted --
                      see `stats[b].details.evicted_in_decode`);
  layer_lengths       per decoder layer, the sequence length it processed at prefill (the full
                      prompt for layers < llm_layer, the kept tokens from llm_layer on);
  llm_prefill_tokens  mean of layer_lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence

import torch

from ..efficiency.timing import StepClock
from ..methods import BoundMethod, CompressedImage
from ..methods.llm_stages import LLMPlan
from ..methods.longtail import stage1_keep
from .batch import CompressResult, PreparedBatch
from .decoder import decoder_parts
from .llm_engine import PrunedLLMLlava
from .llm_pruning import GenerationOutput
from .vision import clip_parts, resolve_layer, run_clip


@dataclass
class LongtailDetails:
    """What the two stages did to one sample (for token maps, tests and statistics)."""

    stage1_counts: List[int]  # patches kept by stage 1, per image
    llm_prompt_length: int  # prompt length entering the LLM (after stage 1)
    llm_kept_positions: torch.Tensor  # prompt positions (0-based) surviving the prefill pruning
    visual_kept: int  # visual tokens among them
    heavy: int
    recent: int
    evicted_in_decode: int = 0


def pack_kept(kept: Sequence[torch.Tensor], device: torch.device):
    """Per-image kept patch indices -> (positions [B, W] in the 1+N CLIP sequence, CLS first; valid [B, W])."""
    width = 1 + max(int(k.numel()) for k in kept)
    positions = torch.zeros(len(kept), width, dtype=torch.long, device=device)
    valid = torch.zeros(len(kept), width, dtype=torch.bool, device=device)
    for row, idx in enumerate(kept):
        n = int(idx.numel())
        positions[row, 1:1 + n] = idx.to(device) + 1
        valid[row, : 1 + n] = True
    return positions, valid


class LongtailLlava(PrunedLLMLlava):
    """The in-LLM engine with the long-tail split inside CLIP (stage 1) before its H2O cut (stage 2)."""

    ragged = "auto"  # how later CLIP blocks run images with different token counts (see vision.run_clip)

    def __init__(self, model: torch.nn.Module, processor: Any, method: BoundMethod, **kwargs: Any) -> None:
        super().__init__(model, processor, method, **kwargs)
        self.params: Mapping[str, Any] = method.params
        num_blocks = len(clip_parts(self.vision_tower)[2])
        feature_block = resolve_layer(self.feature_layer, num_blocks)
        if not 1 <= self.params["clip_layer"] <= feature_block:
            raise ValueError(
                f"longtail: clip_layer={self.params['clip_layer']} must be within 1..{feature_block} "
                f"(the vision tower has {num_blocks} blocks and LLaVA takes features after block {feature_block})"
            )
        decoder_parts(model)  # checks the attention implementation takes 4-D masks (the plan checked llm_layer)

    @property
    def token_budget(self) -> Optional[int]:
        """Stage 1's `budget` bounds the patches entering the LLM (per image; split over a NeXT image's units)."""
        return self.method.budget

    # -- stage 1 ---------------------------------------------------------------------------
    def compress_units(self, pixel_values: torch.Tensor, keys: Sequence[int], texts: Sequence[str], valid: Optional[torch.Tensor] = None,
                       budgets: Optional[Sequence[int]] = None, calls: Optional[Sequence[int]] = None) -> CompressResult:
        params = self.params
        clock = StepClock(self.device) if self.measure_latency else None

        def token_filter(hidden: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
            if clock is not None:
                clock.mark()
            _, kept = stage1_keep(q, k, valid=None if valid is None else valid.to(q.device), budgets=budgets, **params)
            packed = pack_kept(kept, hidden.device)
            if clock is not None:
                clock.mark()  # stage 1 only (the LLM stage is inside prefill)
            return packed

        states = run_clip(
            self.vision_tower,
            self.pixels_on_device(pixel_values),
            feature_layer=self.feature_layer,
            token_filter=token_filter,
            filter_after_block=params["clip_layer"],
            ragged=self.ragged,
        )
        hidden = states.hidden.float()
        out = []
        for row in range(hidden.shape[0]):
            n = int(states.token_mask[row].sum()) if states.token_mask is not None else hidden.shape[1]
            out.append(CompressedImage(features=hidden[row, 1:n], index=states.kept_index[row, 1:n] - 1))
        return CompressResult(out, clock.elapsed_ms() if clock is not None else 0.0)

    # -- stage 2 ---------------------------------------------------------------------------
    def plan(self, batch: PreparedBatch) -> LLMPlan:
        return self.llm_plan(batch)

    def details(self, batch: PreparedBatch, out: GenerationOutput, plan: LLMPlan, row: int) -> Any:
        return LongtailDetails(
            stage1_counts=[c.num_tokens for c in batch.compressed[row]],
            llm_prompt_length=out.prompt_lengths[row],
            llm_kept_positions=out.kept_positions[row],
            visual_kept=out.visual_per_layer[row][-1],
            heavy=plan.notes["heavy"][row],
            recent=plan.notes["recent"][row],
            evicted_in_decode=out.evicted_in_decode[row],
        )
