"""What a model family is to the engine (ToMe's one file per backend): everything that differs between LLaVA-1.5,
LLaVA-NeXT and Video-LLaVA, so the engine and the methods never learn about crops or frames.

A family owns, for its checkpoints:
- the model's parts the engine calls (CLIP tower, projector, token embeddings, the `<image>` id, the feature layer);
- visuals -> units: one CLIP image per unit (a LLaVA-1.5 image; a NeXT base image or crop), their pixels in one batch,
  the units' grid (`UnitLayout`) and valid patches, and per image what the uncompressed model feeds the LLM;
- the prompt of each `prompt_style` (the conversation its own repository evaluates with);
- projection + re-assembly: the compressed units of an image -> the LLM's tokens for it, in the family's layout,
  with layout tokens (NeXT newlines) marked;
- counting: visual tokens in, layout tokens, units.
Where a method acts (before the projector / in the LLM) stays the engine's axis; the family is the other axis.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, List, Optional, Sequence

import torch

from ...methods import CompressedImage, UnitLayout
from ..batch import ImageTokens
from ..images import check_complete, to_rgb
from ..prompts import build_prompt, llava_prompt_ids
from ..video import VideoClip

BUDGET_SCOPES = ("image", "unit")
BUDGET_SPLITS = ("even",)


@dataclass
class ImageUnits:
    """One image as its family cuts it into units, and what the uncompressed model gives the LLM for it."""

    units: int  # CLIP images (LLaVA-1.5: 1; NeXT: base + crops)
    visual_tokens_in: int  # patch tokens the uncompressed model feeds the LLM
    layout_tokens_in: int = 0  # tokens it feeds that are not patches (NeXT newlines)
    valid: Optional[torch.Tensor] = None  # [units, N] bool: patches that exist (NeXT unpadding); None = all
    placement: Any = None  # the family's own note on how the units return to the LLM (NeXT: the crop grid)
    size: Optional[tuple] = None  # (width, height) of the image as given

    def valid_counts(self, num_patches: int) -> List[int]:
        if self.valid is None:
            return [num_patches] * self.units
        return [int(n) for n in self.valid.sum(dim=1).tolist()]


@dataclass
class UnitBatch:
    """The units of a batch of images: their pixels in one tensor (units of image 0 first) and per image its units."""

    pixel_values: torch.Tensor  # [sum of units, 3, H, W]
    images: List[ImageUnits]
    layout: UnitLayout

    @property
    def valid(self) -> Optional[torch.Tensor]:
        """[units, N] bool over the whole batch, or None when every patch of every unit is valid."""
        if all(im.valid is None for im in self.images):
            return None
        n = self.layout.num_patches
        return torch.cat([im.valid if im.valid is not None else torch.ones(im.units, n, dtype=torch.bool) for im in self.images])

    def unit_image(self) -> List[int]:
        """The image index of every unit."""
        return [i for i, im in enumerate(self.images) for _ in range(im.units)]


@dataclass
class UnitGroup:
    """Units the engine runs through one CLIP tower in one method call (`Family.unit_groups`): their indices in the
    batch and the tower's name (the family's own)."""

    units: List[int]
    tower: str


@dataclass
class FamilyOptions:
    """The engine options a family reads (validated before; options that do not apply are refused when given)."""

    prompt_style: str = "llava_v1"
    pad_to_square: bool = True
    budget_scope: str = "image"
    budget_split: str = "even"
    given: frozenset = field(default_factory=frozenset)  # the option names the user set explicitly


def split_budget(total: int, capacities: Sequence[int]) -> List[int]:
    """`budget_split=even`: `total` tokens over units of the given capacities (valid patches): equal shares, the
    remainder to the first units, each capped by its capacity; what a capped unit cannot take goes to the next units
    with room, in order. ValueError when the units cannot hold `total`."""
    room = sum(capacities)
    if total > room:
        raise ValueError(f"budget={total} is more than the image's {room} valid patches over {len(capacities)} units")
    shares = [0] * len(capacities)
    left, open_units = total, [u for u, c in enumerate(capacities) if c > 0]
    while left > 0 and open_units:
        base, extra = divmod(left, len(open_units))
        for rank, u in enumerate(open_units):
            give = min(base + (1 if rank < extra else 0), capacities[u] - shares[u])
            shares[u] += give
            left -= give
        open_units = [u for u in open_units if shares[u] < capacities[u]]
    return shares


class Family:
    """The family interface (see the module docstring). Subclasses: `families/llava15.py`, `families/llava_next.py`."""

    name = "family"
    # engine options only this family reads; given explicitly on another family they are refused
    own_options: frozenset = frozenset()
    # in-LLM plans get each image's patch tokens per row (images differ in size); False: they count images as
    # visual tokens / N, as LLaVA-1.5 always has (its CI baseline depends on it: SparseVLM on two-image documents)
    per_image_llm_counts = True

    def __init__(self, model: torch.nn.Module, processor: Any, options: Optional[FamilyOptions] = None) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.options = options or FamilyOptions()
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id if getattr(cfg, "image_token_id", None) is not None else cfg.image_token_index)
        self.feature_layer = cfg.vision_feature_layer
        if not isinstance(self.feature_layer, int) or cfg.vision_feature_select_strategy != "default":
            raise ValueError(f"only checkpoints with one vision_feature_layer and strategy 'default' are supported ({self.name})")

    # -- parts of the model --------------------------------------------------------------
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
    def layout(self) -> UnitLayout:
        """The grid of one unit: CLS + (image_size / patch_size)^2 patches."""
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        return UnitLayout(side, side)

    @property
    def num_patches(self) -> int:
        return self.layout.num_patches

    # -- prompts ---------------------------------------------------------------------------
    conversation = "vicuna_v1"  # the original repository's conversation for prompt_style=llava_v1

    def prompt_text(self, context: str, num_images: int) -> str:
        return build_prompt(self.options.prompt_style, self.processor, context, num_images, self.conversation)

    def sample_prompt(self, context: str, visuals: Sequence[Any]) -> str:
        """The prompt of one document from its visuals (a family with several kinds of visual places each its own way)."""
        return self.prompt_text(context, len(visuals))

    def answer_text(self, tokenizer: Any, ids: Sequence[int], until: Sequence[str]) -> str:
        """The answer of generated ids: decoded, cut at the task's stop strings, stripped."""
        text = tokenizer.decode(ids, skip_special_tokens=True)
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text.strip()

    # -- admission / load-time checks --------------------------------------------------------
    def admit_visual(self, visual: Any, method: Any = None) -> Any:
        """One visual of a document, checked and decoded (ValueError / OSError: one line on what is wrong)."""
        if isinstance(visual, VideoClip):
            raise ValueError(f"{self.name} checkpoints take images; this document gives a video ({os.path.basename(visual.path)}): "
                             "a Video-LLaVA checkpoint (model_type 'video_llava') reads videos")
        check_complete(visual)
        return to_rgb(visual)

    def check_loadable(self, method: Any) -> None:
        """Load time, before anything else loads for the method (a text tower): a method the family cannot serve at
        all is refused with one line (nothing to refuse here)."""

    def prompt_ids(self, prompt: str) -> List[int]:
        """llava_v1: the ids the original code makes (`tokenizer_image_token`); otherwise the processor's whole-text
        tokenization (what transformers / lmms-eval's llava_hf feed)."""
        if self.options.prompt_style == "llava_v1":
            return llava_prompt_ids(self.tokenizer, prompt, self.image_token_id)
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    # -- visuals -> units -------------------------------------------------------------------
    def units(self, images: Sequence[Any]) -> UnitBatch:
        raise NotImplementedError

    def plan_image(self, image: Any) -> ImageUnits:
        """What an image will become, from its size alone (admission, before any pixels are prepared)."""
        raise NotImplementedError

    def unit_keys(self, image_keys: Sequence[int], batch: UnitBatch) -> List[int]:
        """A stable key per unit (seeds `random`): an image's own key when it is one unit, else derived from it."""
        out: List[int] = []
        for key, image in zip(image_keys, batch.images):
            out += [int(key)] if image.units == 1 else [(int(key) * 1_000_003 + u) % (2**63 - 1) for u in range(image.units)]
        return out

    def check_method(self, method: Any) -> None:
        """Load time (the engine calls it once with its bound method): what this family can run of it, its budget first."""
        self.check_budget(method)

    def check_budget(self, method: Any) -> None:
        """Load time: the method's `budget` must fit a unit's N patches (one unit per image here)."""
        method.check_patches(self.num_patches)

    def unit_budgets(self, budget: Optional[int], batch: UnitBatch) -> Optional[List[int]]:
        """The exact token count of every unit for a per-image `budget` (None: the method's own count per unit)."""
        return None

    # a reference variant whose release selects over the LLM's packed visual sequence of the image (NeXT DivPrune): the
    # units go through unchanged, the family assembles them, and the engine runs the method on the assembled tokens
    packed_selection = False

    def reference_calls(self, batch: UnitBatch, method: Any) -> Optional[List[int]]:
        """For a reference variant: the units of each call its release makes, in order (None: one unit per call)."""
        return None

    def max_visual_tokens(self, budget: Optional[int], image: ImageUnits) -> int:
        """Tokens one image can feed the LLM at most (admission against the context): its budget, else everything."""
        return (budget if budget is not None else image.visual_tokens_in) + image.layout_tokens_in

    # -- CLIP passes -------------------------------------------------------------------------
    def unit_groups(self, batch: UnitBatch, variant: str) -> Optional[List[UnitGroup]]:
        """How the engine splits a batch's units into CLIP + method calls; None: one call, the family's one tower."""
        return None

    @contextmanager
    def vision_pass(self, batch: UnitBatch, group: UnitGroup) -> Iterator[None]:
        """Around the CLIP + method call of one group (`unit_groups`): selects its tower."""
        yield

    # -- re-assembly -------------------------------------------------------------------------
    def assemble(self, batch: UnitBatch, compressed: Sequence[CompressedImage], projected: Sequence[torch.Tensor]) -> List[ImageTokens]:
        """Per image, its tokens for the LLM from its units' compressed outputs and their projections."""
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------------------------
    @staticmethod
    def rgb(images: Sequence[Any]) -> List[Any]:
        return [to_rgb(im) for im in images]
