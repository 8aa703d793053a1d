"""CompressedLlava: generation for a LLaVA-family model with a compression method between CLIP and the LLM.

Flow per batch: images -> the family's units (pinned preprocessing; a LLaVA-1.5 image is one unit, a NeXT image its
base + crops) -> CLIP (captures what the method needs) -> `methods.compress` on the units (pure tensors) -> projector
-> the family re-assembles each image's tokens (NeXT: base, grid, newlines) -> left-padded LLM prefill + generate.
Nothing here is specific to lmms-eval, and nothing here knows a family's layout (families/).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..efficiency.flops import from_llava_config, llm_prefill_flops
from ..efficiency.timing import StepClock, StepTimer, peak_memory_mb, reset_peak_memory
from ..methods import BoundMethod, CompressedImage, UnitLayout, VisionInputs
from ..methods.units import select as select_units
from .assemble import build_llm_inputs
from .batch import BatchOutput, CompressResult, DocumentError, ImageTokens, LLMInputs, PreparedBatch, Sample, SampleStats
from .families import Family, FamilyOptions, UnitBatch, open_family
from .prompts import IMAGE_PLACEHOLDER
from .text_guide import cdpruner_text
from .vision import VisionStates, as_vision_inputs, run_clip

GENERATION_KEYS = ("max_new_tokens", "temperature", "do_sample", "num_beams", "top_p", "top_k", "repetition_penalty", "length_penalty")


def clean_generation_kwargs(gen_kwargs: Dict[str, Any], default_max_new_tokens: int = 1024) -> Dict[str, Any]:
    """Keep the generation options transformers understands; lmms-eval extras (until, image_aspect_ratio...) go."""
    out = {k: gen_kwargs[k] for k in GENERATION_KEYS if k in gen_kwargs and gen_kwargs[k] is not None}
    out.setdefault("max_new_tokens", default_max_new_tokens)
    out["max_new_tokens"] = int(out["max_new_tokens"])
    temperature = float(out.pop("temperature", 0.0) or 0.0)
    do_sample = bool(out.get("do_sample", False)) and temperature > 0
    out["do_sample"] = do_sample
    if do_sample:
        out["temperature"] = temperature
    else:
        out.pop("top_p", None)
        out.pop("top_k", None)
    if "num_beams" in out:
        out["num_beams"] = int(out["num_beams"])
    return out


class CompressedLlava:
    """A loaded LLaVA-family model + processor with one compression configuration; `family` (from the checkpoint's
    model_type unless given) says how images become units and units become the LLM's tokens."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        method: BoundMethod,
        prompt_style: str = "llava_v1",
        pad_to_square: bool = True,
        text_guide: Optional[Any] = None,
        measure_latency: bool = False,
        family: Optional[Family] = None,
    ) -> None:
        self.family = family or open_family(model, processor, FamilyOptions(prompt_style=prompt_style, pad_to_square=pad_to_square))
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.method = method
        self.spec = method.spec
        self.prompt_style = self.family.options.prompt_style
        self.text_guide = text_guide
        self.image_token_id = self.family.image_token_id
        self.feature_layer = self.family.feature_layer
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else (getattr(model.config, "pad_token_id", None) or 0))
        self.flops_config = from_llava_config(model.config)
        self.measure_latency = measure_latency  # model_args measure_latency=true
        self.family.check_method(method)  # a budget no image can meet, a variant the family has no release of: load time

    # -- parts of the model (the family knows where they are) --------------------------------
    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.family.vision_tower

    @property
    def projector(self) -> torch.nn.Module:
        return self.family.projector

    @property
    def embed_tokens(self) -> torch.nn.Module:
        return self.family.embed_tokens

    @property
    def images(self) -> Any:
        """The family's image preparer (LLaVA-1.5: pad to square + CLIP processor -> one unit per image)."""
        return self.family.images

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def vision_dtype(self) -> torch.dtype:
        """The dtype the CLIP tower runs in (recorded in every sample's provenance)."""
        return next(self.vision_tower.parameters()).dtype

    def pixels_on_device(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels on the device in the LLM's dtype, as LLaVA's own eval (`images.to(dtype=torch.float16)`) and lmms-eval's
        llava_hf hand them to the model; the tower then casts them to its own dtype (an fp32 tower sees fp16-rounded
        pixels when the model runs in fp16, exactly as there)."""
        return pixel_values.to(self.device, self.embed_tokens.weight.dtype)

    # -- prompts -----------------------------------------------------------------------------
    def prompt_text(self, sample: Sample) -> str:
        return self.family.sample_prompt(sample.context, sample.images)

    def prompt_ids(self, sample: Sample, prompt: str) -> List[int]:
        """The family's ids for the prompt style, with exactly one `<image>` id per image."""
        ids = self.family.prompt_ids(prompt)
        found = sum(1 for t in ids if t == self.image_token_id)
        if found != len(sample.images):
            raise ValueError(f"tokenized prompt holds {found} image tokens for {len(sample.images)} images ({IMAGE_PLACEHOLDER!r} must be one token)")
        return ids

    # -- admission -----------------------------------------------------------------------------
    @property
    def max_positions(self) -> int:
        """The positions the LLM was trained for: a longer prompt is refused, not run."""
        return int(getattr(self.model.config.text_config, "max_position_embeddings", 0) or 2**31)

    @property
    def token_budget(self) -> Optional[int]:
        """Tokens per image entering the LLM that the method guarantees (its `budget` before the LLM; None: no bound)."""
        return self.method.budget

    def max_visual_tokens(self, image: Optional[Any] = None) -> int:
        """Tokens one image can contribute at most (patch + layout tokens): the budget, else everything its units give."""
        if image is None:
            return self.token_budget or self.num_patches
        return self.family.max_visual_tokens(self.token_budget, self.family.plan_image(image))

    def admit(self, sample: Sample) -> Sample:
        """Check one document before it joins a batch; returns it with its images decoded to RGB.

        DocumentError names what is wrong: an image that cannot be decoded (or only partly: truncated files),
        a prompt whose placeholders do not match its images, or a prompt that needs more positions than the
        LLM has even with the method's largest output (the budget, else everything) per image.
        """
        images = []
        for i, image in enumerate(sample.images):
            try:
                images.append(self.family.admit_visual(image, self.method))
            except (ValueError, OSError) as err:
                raise DocumentError(f"image {i}: {err}") from None
        admitted = Sample(sample.context, images, list(sample.image_keys))
        try:
            ids = self.prompt_ids(admitted, self.prompt_text(admitted))
            per_image = [self.max_visual_tokens(im) for im in images]
        except ValueError as err:
            raise DocumentError(str(err)) from None
        need = len(ids) - len(images) + sum(per_image)
        if need > self.max_positions:
            shown = f"{len(images)} image(s) x {per_image[0]}" if len(set(per_image)) == 1 else f"images of {'+'.join(map(str, per_image))}"
            raise DocumentError(f"the prompt needs up to {need} positions ({shown} visual "
                                f"tokens + {len(ids) - len(images)} text tokens); the LLM has {self.max_positions}")
        return admitted

    # -- CLIP + the method -------------------------------------------------------------------
    def compress_images(self, pixel_values: torch.Tensor, keys: Sequence[int], texts: Sequence[str]) -> CompressResult:
        """CLIP forward with capture, then the method on the captured states (float32): one unit per row of
        `pixel_values` in the family's layout, every patch valid, the method's own budget."""
        return self.compress_units(pixel_values, keys, texts)

    def compress_units(self, pixel_values: torch.Tensor, keys: Sequence[int], texts: Sequence[str], valid: Optional[torch.Tensor] = None,
                       budgets: Optional[Sequence[int]] = None, calls: Optional[Sequence[int]] = None) -> CompressResult:
        """CLIP over the units, then the method on their captured states (float32); `valid` [U, N] and `budgets` [U]
        per unit when the family has them (NeXT unpadding, a per-image budget split over its crops). `calls`: for a
        reference variant whose release sees one call at a time, the units of each released call in order (a NeXT
        image's base + crops, `release_batch`); None: one unit per call."""
        states = run_clip(
            self.vision_tower,
            self.pixels_on_device(pixel_values),
            feature_layer=self.feature_layer,
            need_last_block=self.spec.needs_last_block,
            need_qk=self.spec.needs_qk,
            need_feature_qk="feature_qk" in self.spec.needs,
        )
        inputs = self.method_inputs(states, list(keys), texts, valid, budgets)
        clock = StepClock(self.device) if self.measure_latency else None
        if clock is not None:
            clock.mark()
        if self.method.variant == "reference" and self.spec.reference_batch_one and calls is not None:  # one released call each
            starts = [sum(calls[:c]) for c in range(len(calls))]
            outs = [out for start, size in zip(starts, calls)
                    for out in self.method(dataclasses.replace(select_units(inputs, range(start, start + size)), release_batch=True))]
        elif self.method.variant == "reference" and self.spec.reference_batch_one:  # the release sees one image per call
            outs = [out for b in range(inputs.batch_size) for out in self.method(inputs.image(b))]
        else:
            outs = self.method(inputs)
        if clock is None:
            return CompressResult(outs)
        clock.mark()
        return CompressResult(outs, clock.elapsed_ms())

    def guidance_texts(self, samples: Sequence[Sample], prompts: Sequence[str]) -> List[str]:
        """One text per image for the methods that read CLIP text: CDPruner's question (its loader's stripping), or
        recover's (its question, or with text_source=reference the released first prompt line)."""
        contexts = [s.context for s in samples for _ in s.images]
        if "text_segments" in self.spec.needs:
            return [cdpruner_text(c) for c in contexts]
        if "text" in self.spec.needs and self.text_guide is not None:
            return self.text_guide.texts_for(contexts, [p for s, p in zip(samples, prompts) for _ in s.images])
        return []

    def method_inputs(self, states: VisionStates, keys: List[int], texts: Sequence[str], valid: Optional[torch.Tensor] = None,
                      budgets: Optional[Sequence[int]] = None) -> VisionInputs:
        """Exactly what the method declares it reads (`needs` in its MethodSpec), CLIP signals in float32, the units'
        layout: built once, in one call."""
        needs = self.spec.needs
        if self.spec.needs_text_encoder and self.text_guide is None:
            raise ValueError(f"method {self.method.name!r} needs a CLIP text encoder (model_args text_encoder=...)")
        extra: Dict[str, Any] = {}
        if "text" in needs:
            extra["text_embeds"], extra["visual_projection"] = self.text_guide.embed(texts)
        patches = states.hidden[:, 1:]
        if "feature_qk" in needs:
            extra.update(feature_q=states.feature_q, feature_k=states.feature_k, num_heads=int(self.model.config.vision_config.num_attention_heads))
        if "projected" in needs:  # the projector is per token: what the LLM would receive for every patch
            extra["projected"] = self.projector(patches.to(self.embed_tokens.weight.dtype))
        if "patch_embeds" in needs:
            norm = getattr(self.vision_tower, "vision_model", self.vision_tower).post_layernorm  # CLIP's final LayerNorm, in fp32
            normed = torch.nn.functional.layer_norm(patches.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
            extra["patch_embeds"] = torch.nn.functional.linear(normed, self.text_guide.visual_projection.float())
        if "text_segments" in needs:
            extra["text_segments"] = self.text_guide.segments(texts)
        return as_vision_inputs(states, keys, layout=self.family.layout, valid=valid, budgets=budgets, **extra)

    # -- everything up to the LLM --------------------------------------------------------------
    def prepare(self, samples: Sequence[Sample]) -> PreparedBatch:
        """Prompts -> the family's units -> CLIP + method -> projection + re-assembly -> padded LLM inputs, and the counts."""
        prompts = [self.prompt_text(s) for s in samples]
        ids = [self.prompt_ids(s, p) for s, p in zip(samples, prompts)]
        batch = self.family.units([im for s in samples for im in s.images])
        compressed, compress_ms = self.compress_batch(batch, samples, prompts)
        tokens = self.image_tokens(batch, compressed)
        if self.family.packed_selection:
            tokens, compressed = self.select_packed(batch, tokens, compressed)
        llm = self.llm_inputs(samples, ids, tokens)
        return PreparedBatch(llm=llm, stats=self.sample_stats(samples, batch, tokens, llm), compressed=self.per_sample(samples, batch, compressed),
                             compress_ms=compress_ms)

    def compress_batch(self, batch: UnitBatch, samples: Sequence[Sample], prompts: Sequence[str]) -> CompressResult:
        """The method on every unit of the batch (image keys and guidance texts repeated per unit)."""
        if not batch.images:
            return CompressResult([])
        if self.family.packed_selection:  # the method runs on the assembled sequence (select_packed)
            return CompressResult(self.all_valid_patches(batch.pixel_values, batch.valid))
        image_keys = [k for s in samples for k in (s.image_keys or [0] * len(s.images))]
        texts = self.guidance_texts(samples, prompts)
        owner = batch.unit_image()
        keys = self.family.unit_keys(image_keys, batch)
        calls = self.family.reference_calls(batch, self.method) if self.method.variant == "reference" else None
        groups = self.family.unit_groups(batch, self.method.variant)
        if groups is None:
            return self.compress_units(batch.pixel_values, keys, [texts[i] for i in owner] if texts else [], batch.valid,
                                       self.family.unit_budgets(self.token_budget, batch), calls)
        return self.compress_groups(batch, groups, keys, [texts[i] for i in owner] if texts else [])

    def compress_groups(self, batch: UnitBatch, groups: Sequence[Any], keys: Sequence[int], texts: Sequence[str]) -> CompressResult:
        """The family's CLIP passes, one CLIP + method call each (Video-LLaVA: a video's frames through the video tower,
        the images through the image tower); the outputs back in unit order."""
        valid, budgets = batch.valid, self.family.unit_budgets(self.token_budget, batch)
        outs: List[Any] = [None] * len(keys)
        elapsed = 0.0
        for group in groups:
            pick = list(group.units)
            with self.family.vision_pass(batch, group):
                got = self.compress_units(batch.pixel_values[pick], [keys[u] for u in pick], [texts[u] for u in pick] if texts else [],
                                          None if valid is None else valid[pick], None if budgets is None else [budgets[u] for u in pick])
            for u, out in zip(pick, got.images):
                outs[u] = out
            elapsed += got.compress_ms
        return CompressResult(outs, elapsed)

    def all_valid_patches(self, pixel_values: torch.Tensor, valid: Optional[torch.Tensor]) -> List[CompressedImage]:
        """Every valid patch of every unit, uncompressed (the family's own vision features, no capture)."""
        patches = run_clip(self.vision_tower, self.pixels_on_device(pixel_values), feature_layer=self.feature_layer).hidden[:, 1:].float()
        index = torch.arange(patches.shape[1], device=patches.device)
        if valid is None:
            return [CompressedImage(patches[b], index) for b in range(patches.shape[0])]
        valid = valid.to(patches.device)
        return [CompressedImage(patches[b][valid[b]], index[valid[b]]) for b in range(patches.shape[0])]

    def select_packed(self, batch: UnitBatch, tokens: Sequence[ImageTokens], compressed: Sequence[CompressedImage]) -> tuple:
        """A release that selects over the LLM's packed visual sequence (NeXT DivPrune's `reference`): the method on the
        batch's first image's assembled tokens (one unit of L tokens, no CLS; `projected` = those LLM inputs, layout
        tokens as candidates), and the same positions of every image, as the release applies sample 0's window to every
        row: ValueError when an image's sequence has another length. Kept layout tokens stay layout tokens. Returns the
        selected tokens per image and, per unit, the patches they hold (`family.packed_patches`; maps and reports)."""
        if not tokens:
            return list(tokens), list(compressed)
        length = int(tokens[0].features.shape[0])
        if any(int(t.features.shape[0]) != length for t in tokens):
            sizes = sorted({int(t.features.shape[0]) for t in tokens})
            raise ValueError(f"{self.method.name} (reference): the release selects over sample 0's packed window and applies it to every "
                             f"image; these images pack to {sizes} tokens, so no window fits them all; run batch_size=1 (one image per "
                             "document) or variant=fixed")
        first = tokens[0].features[None]
        index = self.method(VisionInputs(first, projected=first, layout=UnitLayout(1, length, cls=False)))[0].index
        out, units, unit = [], [], 0
        for t, image in zip(tokens, batch.images):
            layout = t.layout[index.to(t.layout.device)] if t.layout is not None else None
            newlines = int(layout.sum()) if layout is not None else 0
            out.append(ImageTokens(t.features[index.to(t.features.device)], layout, int(index.numel()) - newlines, newlines, t.image_tokens_in))
            for u, patches in enumerate(self.family.packed_patches(image, index)):
                every = compressed[unit + u]  # all valid patches, ascending
                rows = torch.searchsorted(every.index.cpu(), patches).to(every.index.device)
                units.append(CompressedImage(every.features[rows], every.index[rows]))
            unit += image.units
        return out, units

    def image_tokens(self, batch: UnitBatch, compressed: Sequence[CompressedImage]) -> List[ImageTokens]:
        """Projection (one call over every kept token of the batch) and the family's re-assembly, per image."""
        projected: List[torch.Tensor] = []
        if compressed:
            flat = torch.cat([c.features for c in compressed], dim=0).to(self.device, self.embed_tokens.weight.dtype)
            projected = list(torch.split(self.projector(flat), [c.num_tokens for c in compressed]))
        return self.family.assemble(batch, compressed, projected)

    def llm_inputs(self, samples: Sequence[Sample], ids: Sequence[Sequence[int]], tokens: Sequence[ImageTokens]) -> LLMInputs:
        per_sample: List[List[ImageTokens]] = []
        start = 0
        for s in samples:
            per_sample.append(list(tokens[start:start + len(s.images)]))
            start += len(s.images)
        llm = build_llm_inputs(self.embed_tokens, ids, self.image_token_id, self.pad_token_id, per_sample)
        too_long = [b for b, n in enumerate(llm.lengths) if n > self.max_positions]
        if too_long:  # the admission bound held for all but an unusual method output: the harness isolates the sample
            raise DocumentError(f"sample {too_long[0]} of the batch has {llm.lengths[too_long[0]]} prompt positions; the LLM has {self.max_positions}")
        return llm

    def sample_stats(self, samples: Sequence[Sample], batch: UnitBatch, tokens: Sequence[ImageTokens], llm: LLMInputs) -> List[SampleStats]:
        """Counts per sample (DESIGN.md): patch tokens in and kept (merged / extra count), layout tokens, units, LLM length."""
        stats, start = [], 0
        for s, length in zip(samples, llm.lengths):
            images, mine = batch.images[start:start + len(s.images)], tokens[start:start + len(s.images)]
            kept = sum(t.visual for t in mine)
            stats.append(SampleStats(visual_tokens_in=sum(im.visual_tokens_in for im in images), visual_tokens_kept=kept,
                                     llm_prefill_tokens=float(length), visual_tokens_equivalent=float(kept),  # every layer sees them
                                     layout_tokens=sum(t.layout_count for t in mine), units=sum(im.units for im in images)))
            start += len(s.images)
        return stats

    def per_sample(self, samples: Sequence[Sample], batch: UnitBatch, compressed: Sequence[CompressedImage]) -> List[List[CompressedImage]]:
        """The compressed units of each sample, in order."""
        out, unit, image = [], 0, 0
        for s in samples:
            units = sum(im.units for im in batch.images[image:image + len(s.images)])
            out.append(list(compressed[unit:unit + units]))
            unit, image = unit + units, image + len(s.images)
        return out

    @property
    def num_patches(self) -> int:
        vc = self.model.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2

    def prefill_tflops(self, st: SampleStats) -> float:
        """Analytic LLM prefill TFLOPs from the model config and the actual per-layer lengths."""
        lengths = st.layer_lengths if st.layer_lengths is not None else st.llm_prefill_tokens
        return llm_prefill_flops(self.flops_config.text, lengths) / 1e12

    def run_llm(self, batch: PreparedBatch, kwargs: Dict[str, Any], clock: Optional[StepClock]) -> torch.Tensor:
        """LLM prefill + decoding; returns the new token ids [B, T_new]. Subclasses prune inside."""
        extra = {"logits_processor": [StepTimer(clock)]} if clock is not None else {}
        return self.model.generate(
            inputs_embeds=batch.llm.inputs_embeds,
            attention_mask=batch.llm.attention_mask,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            **kwargs,
            **extra,
        )

    @torch.inference_mode()
    def generate(self, samples: Sequence[Sample], gen_kwargs: Dict[str, Any]) -> BatchOutput:
        """Greedy/sampled generation; returns the new token ids per sample (EOS and padding cut)."""
        clock = StepClock(self.device) if self.measure_latency else None
        if clock is not None:
            reset_peak_memory(self.device)
            clock.mark()
        batch = self.prepare(samples)
        if clock is not None:
            clock.mark()
        kwargs = clean_generation_kwargs(gen_kwargs)
        out = self.run_llm(batch, kwargs, clock)
        eos = self.tokenizer.eos_token_id
        results: List[List[int]] = []
        for b, row in enumerate(out.tolist()):
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            results.append(row)
            st = batch.stats[b]
            st.output_tokens = len(row)
            st.prefill_tflops = self.prefill_tflops(st)
        if clock is not None:
            latency = self.latency_of(clock, batch.compress_ms, batch.cut_ms)
            for st in batch.stats:
                st.latency = dict(latency)
        return BatchOutput(results, batch.stats)

    def latency_of(self, clock: StepClock, compress_ms: float, cut_ms: float = 0.0) -> Dict[str, float]:
        """Marks: [start, inputs ready, step 1, step 2, ...] -> per-batch latency figures (ms). compress_ms = the method's
        whole own time (before the LLM + its cuts inside it), cut_ms = the part inside the prefill."""
        steps = len(clock) - 2
        out = {
            "compress_ms": compress_ms + cut_ms,
            "cut_ms": cut_ms,
            "vision_and_compress_ms": clock.elapsed_ms(0, 1),
            "prefill_ms": clock.elapsed_ms(1, 2) if steps >= 1 else 0.0,
            "ttft_ms": clock.elapsed_ms(0, 2) if steps >= 1 else 0.0,
            "decode_ms_per_token": clock.elapsed_ms(2, -1) / (steps - 1) if steps >= 2 else 0.0,
        }
        peak = peak_memory_mb(self.device)
        if peak is not None:
            out["peak_memory_mb"] = peak
        return out

