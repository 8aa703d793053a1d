"""CompressedLlava: LLaVA-1.5 generation with a compression method between CLIP and the LLM.

Flow per batch: images -> pinned preprocessing -> CLIP (captures what the method needs) ->
`methods.compress` (pure tensors) -> projector -> variable-length visual tokens per sample ->
left-padded LLM prefill + generate. Nothing here is specific to lmms-eval.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from ..efficiency.flops import from_llava_config, llm_prefill_flops
from ..efficiency.timing import StepClock, StepTimer, peak_memory_mb, reset_peak_memory
from ..methods import BoundMethod, CompressedImage, VisionInputs
from .assemble import build_llm_inputs
from .batch import BatchOutput, CompressResult, DocumentError, PreparedBatch, Sample, SampleStats
from .images import ImagePreparer, check_complete, to_rgb
from .prompts import IMAGE_PLACEHOLDER, build_prompt, llava_prompt_ids
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
    """A loaded LLaVA-1.5 model + processor with one compression configuration."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        method: BoundMethod,
        prompt_style: str = "llava_v1",
        pad_to_square: bool = True,
        text_guide: Optional[Any] = None,
        measure_latency: bool = False,
    ) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.method = method
        self.spec = method.spec
        self.prompt_style = prompt_style
        self.images = ImagePreparer(processor.image_processor, pad_to_square)
        self.text_guide = text_guide
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id if getattr(cfg, "image_token_id", None) is not None else cfg.image_token_index)
        self.feature_layer = cfg.vision_feature_layer
        if not isinstance(self.feature_layer, int) or cfg.vision_feature_select_strategy != "default":
            raise ValueError("only LLaVA-1.5-style checkpoints (one vision_feature_layer, strategy 'default') are supported")
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else (getattr(cfg, "pad_token_id", None) or 0))
        self.flops_config = from_llava_config(cfg)
        self.measure_latency = measure_latency  # model_args measure_latency=true
        method.check_patches(self.num_patches)

    # -- parts of the HF model -------------------------------------------------------------
    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    @property
    def projector(self) -> torch.nn.Module:
        return self.model.model.multi_modal_projector

    @property
    def embed_tokens(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

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

    # -- stages ----------------------------------------------------------------------------
    def prompt_text(self, sample: Sample) -> str:
        return build_prompt(self.prompt_style, self.processor, sample.context, len(sample.images))

    def prompt_ids(self, sample: Sample, prompt: str) -> List[int]:
        """llava_v1: the ids LLaVA's own code makes (`tokenizer_image_token`); chat_template: the processor's whole-text
        tokenization (what transformers / lmms-eval's llava_hf feed)."""
        if self.prompt_style == "llava_v1":
            ids = llava_prompt_ids(self.tokenizer, prompt, self.image_token_id)
        else:
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        found = sum(1 for t in ids if t == self.image_token_id)
        if found != len(sample.images):
            raise ValueError(f"tokenized prompt holds {found} image tokens for {len(sample.images)} images ({IMAGE_PLACEHOLDER!r} must be one token)")
        return ids

    @property
    def max_positions(self) -> int:
        """The positions the LLM was trained for: a longer prompt is refused, not run."""
        return int(getattr(self.model.config.text_config, "max_position_embeddings", 0) or 2**31)

    def max_visual_tokens(self) -> int:
        """Visual tokens one image can contribute at most: the budget, else all N patches."""
        return self.method.budget or self.num_patches

    def admit(self, sample: Sample) -> Sample:
        """Check one document before it joins a batch; returns it with its images decoded to RGB.

        DocumentError names what is wrong: an image that cannot be decoded (or only partly: truncated files),
        a prompt whose placeholders do not match its images, or a prompt that needs more positions than the
        LLM has even with the method's largest output (the budget, else N) per image.
        """
        images = []
        for i, image in enumerate(sample.images):
            try:
                check_complete(image)
                images.append(to_rgb(image))
            except (ValueError, OSError) as err:
                raise DocumentError(f"image {i}: {err}") from None
        admitted = Sample(sample.context, images, list(sample.image_keys))
        try:
            ids = self.prompt_ids(admitted, self.prompt_text(admitted))
        except ValueError as err:
            raise DocumentError(str(err)) from None
        need = len(ids) - len(images) + self.max_visual_tokens() * len(images)
        if need > self.max_positions:
            raise DocumentError(f"the prompt needs up to {need} positions ({len(images)} image(s) x {self.max_visual_tokens()} visual "
                                f"tokens + {len(ids) - len(images)} text tokens); the LLM has {self.max_positions}")
        return admitted

    def compress_images(self, pixel_values: torch.Tensor, keys: Sequence[int], texts: Sequence[str]) -> CompressResult:
        """CLIP forward with capture, then the method on the captured states (float32)."""
        states = run_clip(
            self.vision_tower,
            self.pixels_on_device(pixel_values),
            feature_layer=self.feature_layer,
            need_last_block=self.spec.needs_last_block,
            need_qk=self.spec.needs_qk,
            need_feature_qk="feature_qk" in self.spec.needs,
        )
        inputs = self.method_inputs(states, list(keys), texts)
        clock = StepClock(self.device) if self.measure_latency else None
        if clock is not None:
            clock.mark()
        if self.method.variant == "reference" and self.spec.reference_batch_one:  # the release sees one image per call
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

    def method_inputs(self, states: VisionStates, keys: List[int], texts: Sequence[str]) -> VisionInputs:
        """Exactly what the method declares it reads, CLIP signals in float32 (`needs` in its MethodSpec)."""
        needs = self.spec.needs
        if self.spec.needs_text_encoder and self.text_guide is None:
            raise ValueError(f"method {self.method.name!r} needs a CLIP text encoder (model_args text_encoder=...)")
        text_embeds = vis_proj = None
        if "text" in needs:
            text_embeds, vis_proj = self.text_guide.embed(texts)
        inputs = as_vision_inputs(states, text_embeds, vis_proj, keys)
        patches = states.hidden[:, 1:]
        if "feature_qk" in needs:
            inputs.feature_q, inputs.feature_k = states.feature_q.float(), states.feature_k.float()
            inputs.num_heads = int(self.model.config.vision_config.num_attention_heads)
        if "projected" in needs:  # the projector is per token: what the LLM would receive for every patch
            inputs.projected = self.projector(patches.to(self.embed_tokens.weight.dtype))
        if "patch_embeds" in needs:
            norm = getattr(self.vision_tower, "vision_model", self.vision_tower).post_layernorm  # CLIP's final LayerNorm, in fp32
            normed = torch.nn.functional.layer_norm(patches.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
            inputs.patch_embeds = torch.nn.functional.linear(normed, self.text_guide.visual_projection.float())
        if "text_segments" in needs:
            inputs.text_segments = self.text_guide.segments(texts)
        return inputs

    def prepare(self, samples: Sequence[Sample]) -> PreparedBatch:
        """Everything up to the LLM: prompts, images, compression, projection, padded embeddings."""
        prompts = [self.prompt_text(s) for s in samples]
        ids = [self.prompt_ids(s, p) for s, p in zip(samples, prompts)]
        all_images = [im for s in samples for im in s.images]
        keys = [k for s in samples for k in (s.image_keys or [0] * len(s.images))]
        texts = self.guidance_texts(samples, prompts)
        compressed: List[CompressedImage] = []
        compress_ms = 0.0
        if all_images:
            pixel_values = self.images.prepare(all_images)
            compressed, compress_ms = self.compress_images(pixel_values, keys, texts)
        dtype = self.embed_tokens.weight.dtype
        projected: List[torch.Tensor] = []
        if compressed:
            flat = torch.cat([c.features for c in compressed], dim=0).to(self.device, dtype)
            projected = list(torch.split(self.projector(flat), [c.num_tokens for c in compressed]))
        per_sample_feats: List[List[torch.Tensor]] = []
        per_sample_comp: List[List[CompressedImage]] = []
        start = 0
        num_patches = self.num_patches
        stats = []
        for s in samples:
            n = len(s.images)
            per_sample_feats.append(projected[start:start + n])
            per_sample_comp.append(compressed[start:start + n])
            kept = sum(c.num_tokens for c in compressed[start:start + n])
            stats.append(SampleStats(visual_tokens_in=num_patches * n, visual_tokens_kept=kept, llm_prefill_tokens=0.0,
                                     visual_tokens_equivalent=float(kept)))  # before the LLM: every layer sees the kept tokens
            start += n
        llm = build_llm_inputs(self.embed_tokens, ids, self.image_token_id, self.pad_token_id, per_sample_feats)
        too_long = [b for b, n in enumerate(llm.lengths) if n > self.max_positions]
        if too_long:  # the admission bound held for all but an unusual method output: the harness isolates the sample
            raise DocumentError(f"sample {too_long[0]} of the batch has {llm.lengths[too_long[0]]} prompt positions; the LLM has {self.max_positions}")
        for st, length in zip(stats, llm.lengths):
            st.llm_prefill_tokens = float(length)
        return PreparedBatch(llm=llm, stats=stats, compressed=per_sample_comp, compress_ms=compress_ms)

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

