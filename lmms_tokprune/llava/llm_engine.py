"""The engine of methods that prune inside the LLM: CompressedLlava whose LLM stage is the one decoder loop.

Counts per sample (`SampleStats`, shared/PEERS.md "Equivalent tokens"):
  visual_tokens_in          576 per image;
  visual_tokens_kept        visual tokens entering the LAST decoder layer;
  visual_tokens_equivalent  visual tokens each decoder layer computes on (its input), averaged over the layers;
  layer_lengths             per decoder layer, the sequence length it processed at prefill;
  llm_prefill_tokens        mean of layer_lengths (prefill FLOPs use layer_lengths directly).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..efficiency.timing import StepClock
from ..methods import CompressedImage
from ..methods.llm_stages import LLMContext, LLMPlan, check_llm
from .batch import CompressResult, PreparedBatch
from .decoder import decoder_parts
from .engine import CompressedLlava
from .llm_pruning import GenerationOutput, generate_pruned
from .vision import run_clip


@dataclass
class LLMDetails:
    """What the LLM stage did to one sample (token maps, tests, reports)."""

    llm_prompt_length: int  # prompt length entering the LLM
    llm_kept_positions: torch.Tensor  # original prompt positions present after the last cut (-1 = inserted)
    cut_positions: List[torch.Tensor]  # the same after every cut
    visual_per_layer: List[int]
    resolved: Dict[str, Any] = field(default_factory=dict)  # the released parameters a budget resolved to
    evicted_in_decode: int = 0


class PrunedLLMLlava(CompressedLlava):
    """CompressedLlava whose LLM prefill runs the method's cuts (and decodes over each layer's kept cache)."""

    score_chunk = 256  # query rows per chunk when a cut needs every row's attention

    def __init__(self, model: torch.nn.Module, processor: Any, method: Any, **kwargs: Any) -> None:
        super().__init__(model, processor, method, **kwargs)
        decoder_parts(model)  # a Llama-style decoder whose attention takes 4-D masks
        check_llm(self.method, self.llm_context())  # layers in range, a reachable budget: fail at load time, not mid-run

    @property
    def token_budget(self) -> Optional[int]:
        """None: every patch enters the LLM (an in-LLM `budget` counts equivalent tokens, not what enters)."""
        return None

    def compress_units(self, pixel_values: torch.Tensor, keys: Sequence[int], texts: Sequence[str], valid: Optional[torch.Tensor] = None,
                       budgets: Optional[Sequence[int]] = None, calls: Optional[Sequence[int]] = None) -> CompressResult:
        """Every valid patch enters the LLM (the method acts inside it): the family's own vision features, no capture."""
        patches = run_clip(self.vision_tower, self.pixels_on_device(pixel_values), feature_layer=self.feature_layer).hidden[:, 1:].float()
        index = torch.arange(patches.shape[1], device=patches.device)
        if valid is None:
            return CompressResult([CompressedImage(patches[b], index) for b in range(patches.shape[0])])
        valid = valid.to(patches.device)
        return CompressResult([CompressedImage(patches[b][valid[b]], index[valid[b]]) for b in range(patches.shape[0])])

    def llm_context(self, batch: Optional[PreparedBatch] = None) -> LLMContext:
        """The decoder's shape and, for a batch of a multi-unit family (NeXT), each image's patch tokens per row.
        LLaVA-1.5 keeps counting images as visual tokens / 576 (per_image_llm_counts False), as before."""
        text = self.model.config.text_config
        per_image = self.family.per_image_llm_counts
        counts = None
        if batch is not None and per_image and batch.llm.image_tokens is not None:
            counts = tuple(tuple(row) for row in batch.llm.image_tokens)
        return LLMContext(text.num_hidden_layers, self.num_patches, text.num_attention_heads, image_tokens=counts, layout=per_image)

    def llm_plan(self, batch: PreparedBatch) -> LLMPlan:
        return self.method.llm_plan(self.llm_context(batch))

    def run_llm(self, batch: PreparedBatch, kwargs: Dict[str, Any], clock: Optional[StepClock]) -> torch.Tensor:
        plan = self.llm_plan(batch)
        out = generate_pruned(self.model, batch.llm.inputs_embeds, batch.llm.attention_mask, batch.llm.image_mask, plan, kwargs,
                              self.tokenizer.eos_token_id, self.pad_token_id, score_chunk=self.score_chunk,
                              on_step=clock.mark if clock is not None else None, timed=clock is not None, layout_mask=batch.llm.layout_mask)
        batch.cut_ms = out.cut_ms  # the method's own time inside the prefill (compress_ms adds it to any stage before)
        self.fill_stats(batch, out, plan)
        return out.sequences

    def fill_stats(self, batch: PreparedBatch, out: GenerationOutput, plan: LLMPlan) -> None:
        for row, st in enumerate(batch.stats):
            visual = out.visual_per_layer[row]
            st.layer_lengths = out.layer_lengths[row]
            st.llm_prefill_tokens = float(sum(st.layer_lengths)) / len(st.layer_lengths)
            st.visual_tokens_kept = visual[-1]
            st.visual_tokens_equivalent = sum(visual) / len(visual)
            st.details = self.details(batch, out, plan, row)

    def details(self, batch: PreparedBatch, out: GenerationOutput, plan: LLMPlan, row: int) -> Any:
        resolved = {k: v for k, v in plan.notes.items() if not isinstance(v, list)}
        per_row = plan.notes.get("per_row")
        if isinstance(per_row, list) and row < len(per_row):  # budgets resolved per image of this row (NeXT)
            resolved.update(per_row[row] if isinstance(per_row[row], dict) else {"per_image": per_row[row]})
        return LLMDetails(out.prompt_lengths[row], out.kept_positions[row], out.cut_positions[row], out.visual_per_layer[row],
                          resolved, out.evicted_in_decode[row])
