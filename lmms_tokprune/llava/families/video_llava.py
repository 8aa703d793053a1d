"""Video-LLaVA (transformers `model_type` 'video_llava', e.g. LanguageBind/Video-LLaVA-7B-hf): videos and images.

Two CLIP towers at 224 px (CLS + 16 x 16 patches), one projector. A video document is read as 8 frames exactly as
lmms-eval's own `video_llava` model reads them (`llava/video.py`); the video tower runs the frames independently and
transformers' `get_video_features` projects every frame's 257 tokens, CLS included: the LLM gets per video 8 x (CLS +
256 patches) = 2,056 tokens, frames in order, each frame's CLS before its patches. An image goes through the image
tower and drops its CLS (256 tokens), as in LLaVA-1.5.

Units for the methods: a frame (and an image) is one unit of 16 x 16 patches with a CLS prefix; methods never learn
about frames. A frame's CLS is a layout token: it reaches the LLM as in the uncompressed model, is never pruned by
`fixed` nor by in-LLM methods, and is not counted as visual. Counts per video: 2,048 visual tokens in, 8 layout tokens,
8 units; per image 256, 0, 1.

Budgets: `budget=N` per video is split evenly over its 8 frames (256 -> 32 per frame; `budget_split=even`), `budget=N`
per image is N of its 256 patches; `budget_scope=unit` gives every frame N (the per-frame reading).

PruMerge on video (the paper's Table 3; shared/METHODS.md): `reference` runs the released image code with a video's 8
frames as its batch (one IQR fence pooled over the frames); PruMerge+ `reference` refuses a video (the release crashes
on a batch of frames); `fixed` is per frame adaptive. Other methods' `reference` with a batch-one release run frame by
frame. Text-guided methods (recover, cdpruner) need a text tower aligned with the video tower, which the HF checkpoint
does not ship: they are refused at load time unless `text_encoder=` is given.

Prompts: `llava_v1` (default) is Video-LLaVA's own evaluation prompt (videollava/eval/video/run_inference_video_qa.py:
the llava_v1 conversation, the frames' placeholders then "\\n" then the question); `lmms_eval` is lmms-eval's
`video_llava` literal `USER: <video>{context}? ASSISTANT:`; `chat_template` the processor's template.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence

import torch

from ...methods import CompressedImage
from ..batch import ImageTokens
from ..prompts import IMAGE_PLACEHOLDER, VICUNA_SYSTEM, llava_prompt_ids
from ..video import NUM_FRAMES, VideoClip
from ..vision import clip_parts, resolve_layer
from .base import Family, ImageUnits, UnitBatch, UnitGroup, split_budget

VIDEO_PLACEHOLDER = "<video>"
IMAGE_TOWER, VIDEO_TOWER = "image", "video"


@dataclass
class Frames:
    """A video's placement: its frames and, once the video tower has run, their CLS tokens at the feature layer."""

    count: int
    indices: Optional[List[int]] = None  # the clip's frame numbers taken
    cls: Optional[torch.Tensor] = None  # [count, D] pre-projector


class VideoLlava(Family):
    name = "video_llava"
    own_options = frozenset({"budget_scope", "budget_split"})
    refused_reference_on_video = ("prumerge_plus",)  # the release crashes on a batch of frames
    frames_as_batch = ("prumerge",)  # reference: the release with a video's frames as its batch (one pooled IQR fence)

    def __init__(self, model: torch.nn.Module, processor: Any, options: Any = None) -> None:
        super().__init__(model, processor, options)
        cfg = model.config
        self.video_token_id = int(cfg.video_token_id if getattr(cfg, "video_token_id", None) is not None else cfg.video_token_index)
        self.image_processor = processor.image_processor
        self.video_processor = processor.video_processor
        self._active = VIDEO_TOWER

    # -- parts of the model --------------------------------------------------------------
    def tower(self, name: str) -> torch.nn.Module:
        return self.model.model.video_tower if name == VIDEO_TOWER else self.model.model.image_tower

    @property
    def vision_tower(self) -> torch.nn.Module:
        """The tower of the CLIP pass under way (`vision_pass`); the video tower otherwise."""
        return self.tower(self._active)

    # -- admission -----------------------------------------------------------------------
    def admit_visual(self, visual: Any, method: Any = None) -> Any:
        if not isinstance(visual, VideoClip):
            return super().admit_visual(visual, method)
        if method is not None and method.variant == "reference" and method.name in self.refused_reference_on_video:
            raise ValueError(f"{method.name} variant=reference refuses a video: the released code crashes on a batch of frames "
                             "(it runs one image per call); use variant=fixed (per-frame adaptive)")
        return visual.read(NUM_FRAMES)

    def check_loadable(self, method: Any) -> None:
        if method.spec.needs_text_encoder and "text_encoder" not in self.options.given:
            raise ValueError(f"method {method.name!r} reads a CLIP text tower aligned with the vision tower; Video-LLaVA's "
                             "LanguageBind towers have none in the HF checkpoint: give text_encoder=<a CLIP checkpoint aligned with "
                             "them> explicitly, or pick a method without text guidance")

    # -- prompts ---------------------------------------------------------------------------
    @staticmethod
    def placeholders(visuals: Sequence[Any]) -> List[str]:
        return [VIDEO_PLACEHOLDER if isinstance(v, VideoClip) else IMAGE_PLACEHOLDER for v in visuals]

    def sample_prompt(self, context: str, visuals: Sequence[Any]) -> str:
        marks = self.placeholders(visuals)
        style = self.options.prompt_style
        found = context.count(IMAGE_PLACEHOLDER) + context.count(VIDEO_PLACEHOLDER)
        if found and found != len(marks):
            raise ValueError(f"prompt holds {found} '<image>'/'<video>' placeholders for {len(marks)} visuals")
        if style == "llava_v1":  # Video-LLaVA's eval: conv llava_v1, placeholders + "\n" + question
            body = context if found or not marks else "".join(marks) + "\n" + context
            return f"{VICUNA_SYSTEM} USER: {body} ASSISTANT:"
        if style == "lmms_eval":  # lmms-eval's video_llava: "USER: <video>{}? ASSISTANT:"
            return f"USER: {'' if found else ''.join(marks)}{context}? ASSISTANT:"
        if style == "chat_template":
            if getattr(self.processor, "chat_template", None) is None:
                raise ValueError("prompt_style=chat_template, but the checkpoint's processor has no chat_template")
            text = context.replace(IMAGE_PLACEHOLDER, "").replace(VIDEO_PLACEHOLDER, "").strip() if found else context
            content = [{"type": "video" if m == VIDEO_PLACEHOLDER else "image"} for m in marks] + [{"type": "text", "text": text}]
            return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        raise ValueError(f"unknown prompt_style {style!r}")

    def prompt_text(self, context: str, num_images: int) -> str:
        return self.sample_prompt(context, [None] * num_images)

    def prompt_ids(self, prompt: str) -> List[int]:
        """llava_v1: the original `tokenizer_image_token` ids (a video's placeholder is its frames' run of image ids there,
        one mark here); otherwise the whole text, as the processor tokenizes it. Every placeholder comes back as the image
        id (the engine expands each to its visual's tokens)."""
        if self.options.prompt_style == "llava_v1":
            return llava_prompt_ids(self.tokenizer, prompt.replace(VIDEO_PLACEHOLDER, IMAGE_PLACEHOLDER), self.image_token_id)
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return [self.image_token_id if t == self.video_token_id else t for t in ids]

    def answer_text(self, tokenizer: Any, ids: Sequence[int], until: Sequence[str]) -> str:
        """lmms_eval: what lmms-eval's video_llava returns (no stop strings; the text after the last 'ASSISTANT:');
        otherwise the house rule."""
        if self.options.prompt_style != "lmms_eval":
            return super().answer_text(tokenizer, ids, until)
        return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).split("ASSISTANT:")[-1].strip()

    # -- visuals -> units -------------------------------------------------------------------
    def plan_image(self, image: Any) -> ImageUnits:
        n = self.num_patches
        if isinstance(image, VideoClip):
            return ImageUnits(NUM_FRAMES, NUM_FRAMES * n, NUM_FRAMES, None, Frames(NUM_FRAMES, image.indices), image.size)
        return ImageUnits(1, n, size=getattr(image, "size", None))

    def units(self, images: Sequence[Any]) -> UnitBatch:
        visuals = [v.read(NUM_FRAMES) if isinstance(v, VideoClip) else v for v in images]
        if not visuals:
            return UnitBatch(torch.zeros(0), [], self.layout)
        pixels = []
        for v in visuals:  # one processor call per visual, as lmms-eval's video_llava makes it for its one video
            if isinstance(v, VideoClip):
                pixels.append(self.video_processor(videos=v.frames, return_tensors="pt")["pixel_values_videos"][0])
            else:
                out = self.image_processor(images=[self.rgb([v])[0]], return_tensors="pt")
                pixels.append(out["pixel_values"] if "pixel_values" in out else out["pixel_values_images"])
        return UnitBatch(torch.cat(pixels), [self.plan_image(v) for v in visuals], self.layout)

    # -- CLIP passes: frames through the video tower, images through the image tower ---------------------
    def unit_groups(self, batch: UnitBatch, variant: str) -> Optional[List[UnitGroup]]:
        """Each video's frames one call through the video tower (so `reference` of a method whose release pools over its
        batch sees exactly the video's frames, and any batch gives what the video alone gives); the images one call
        through the image tower."""
        groups, images, unit = [], [], 0
        for image in batch.images:
            span = list(range(unit, unit + image.units))
            if isinstance(image.placement, Frames):
                groups.append(UnitGroup(span, VIDEO_TOWER))
            else:
                images += span
            unit += image.units
        return groups + ([UnitGroup(images, IMAGE_TOWER)] if images else [])

    @contextmanager
    def vision_pass(self, batch: UnitBatch, group: UnitGroup) -> Iterator[None]:
        """Select the group's tower; for frames, record each frame's CLS at the feature layer (what the model projects)."""
        previous, self._active = self._active, group.tower
        store: List[torch.Tensor] = []
        handle = None
        if group.tower == VIDEO_TOWER:
            layers = clip_parts(self.vision_tower)[2]
            block = layers[resolve_layer(self.feature_layer, len(layers)) - 1]
            handle = block.register_forward_hook(lambda _m, _i, out: store.append((out[0] if isinstance(out, tuple) else out)[:, 0]))
        try:
            yield
        finally:
            self._active = previous
            if handle is not None:
                handle.remove()
        if group.tower == VIDEO_TOWER:
            cls = torch.cat(store)[-len(group.units):] if store else None
            if cls is None or cls.shape[0] != len(group.units):
                raise RuntimeError(f"captured {0 if cls is None else cls.shape[0]} frame CLS tokens for {len(group.units)} frames")
            self._record_cls(batch, group.units, cls)

    @staticmethod
    def _record_cls(batch: UnitBatch, units: Sequence[int], cls: torch.Tensor) -> None:
        start = 0
        for image in batch.images:
            span = range(start, start + image.units)
            if isinstance(image.placement, Frames) and span[0] in units:
                image.placement.cls = cls[[units.index(u) for u in span]]
            start += image.units

    # -- budgets -----------------------------------------------------------------------------------
    def check_budget(self, method: Any) -> None:
        """Load time: budget_scope=unit must fit one frame's 256 patches; a per-video budget is checked per document."""
        if self.options.budget_scope == "unit":
            method.check_patches(self.num_patches)

    def image_shares(self, budget: int, image: ImageUnits) -> List[int]:
        counts = image.valid_counts(self.num_patches)
        what = "video" if isinstance(image.placement, Frames) else "image"
        if self.options.budget_scope == "unit":
            if budget > self.num_patches:
                raise ValueError(f"budget={budget} per unit (budget_scope=unit) is more than a frame's {self.num_patches} patches")
            return [budget] * len(counts)
        if budget < len(counts):
            raise ValueError(f"budget={budget} is less than the {len(counts)} frames of a video (one token per frame at least); "
                             "give more, or budget_scope=unit")
        if budget > sum(counts):
            raise ValueError(f"budget={budget} is more than the {sum(counts)} patches of an {what}" if what == "image"
                             else f"budget={budget} is more than the {sum(counts)} patches of a video")
        return split_budget(budget, counts)

    def unit_budgets(self, budget: Optional[int], batch: UnitBatch) -> Optional[List[int]]:
        if budget is None:
            return None
        return [share for image in batch.images for share in self.image_shares(budget, image)]

    def max_visual_tokens(self, budget: Optional[int], image: ImageUnits) -> int:
        if budget is None:
            return image.visual_tokens_in + image.layout_tokens_in
        return sum(self.image_shares(budget, image)) + image.layout_tokens_in

    # -- re-assembly -------------------------------------------------------------------------
    def assemble(self, batch: UnitBatch, compressed: Sequence[CompressedImage], projected: Sequence[torch.Tensor]) -> List[ImageTokens]:
        out: List[ImageTokens] = []
        unit = 0
        for image in batch.images:
            comps, projs = compressed[unit:unit + image.units], projected[unit:unit + image.units]
            unit += image.units
            if not isinstance(image.placement, Frames):
                out.append(ImageTokens(projs[0], None, comps[0].num_tokens, image_tokens_in=image.visual_tokens_in))
                continue
            cls = image.placement.cls
            if cls is None:
                raise RuntimeError("the video's frame CLS tokens were not captured (the engine ran no vision_pass)")
            weight = self.projector.linear_1.weight if hasattr(self.projector, "linear_1") else next(self.projector.parameters())
            cls_tokens = self.projector(cls.to(weight.device, projs[0].dtype if projs else weight.dtype))
            pieces, flags = [], []
            for f, proj in enumerate(projs):
                pieces += [cls_tokens[f:f + 1], proj]
                flags += [torch.ones(1, dtype=torch.bool), torch.zeros(proj.shape[0], dtype=torch.bool)]
            visual = sum(c.num_tokens for c in comps)
            out.append(ImageTokens(torch.cat(pieces), torch.cat(flags), visual, image.layout_tokens_in, image_tokens_in=image.visual_tokens_in))
        return out
