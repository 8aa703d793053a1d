"""LLaVA-NeXT / LLaVA-1.6 (transformers `model_type` 'llava_next'): anyres images.

An image becomes a base unit (the whole image resized to 336 px) plus a grid of 336-px crops (1x2, 2x1, 2x2, 1x3, 3x1
for the released pinpoints), each one CLIP image of 24 x 24 patches. transformers' `pack_image_features` feeds the LLM
the base unit's 576 tokens, then the crops stitched into one (24 a) x (24 b) map, cut to the image's aspect ratio
("unpadding": rows or columns that only cover the padding go) and read row by row with one `image_newline` token after
every row: 576 + H'W' visual tokens and H' layout tokens per image.

Units for the methods: the base unit (all patches valid) and every crop, whose valid patches are those unpadding keeps
(a patch that unpadding removes is never kept nor merged). Re-assembly of compressed units (`assemble`): the base
unit's tokens as the method ordered them (like LLaVA-1.5), then the crops' kept tokens in global raster order of the
unpadded grid with a newline after each row that keeps a token, then the crops' tokens that are not one patch
(merged remainders, CLS tokens), crop by crop. With every valid patch kept this is exactly `pack_image_features`.

Budgets: `budget=N` per image is split over its units (`budget_split=even`: equal shares, remainder to the first
units, each capped by its valid patches); `budget_scope=unit` gives every unit N (the releases' per-crop settings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch

from ...catalog import STAGE_PRE_PROJECTOR
from ...methods import CompressedImage
from ...methods.inputs import ROLE_EXTRA, ROLE_KEPT
from ...methods.llm_stages import no_next_release
from ..batch import ImageTokens
from .base import Family, ImageUnits, UnitBatch, split_budget


@dataclass(frozen=True)
class CropGrid:
    """Where an image's crops sit: `rows` x `cols` crops of `side` x `side` patches, and the box unpadding keeps in
    the stitched (rows*side) x (cols*side) map: rows top..bottom-1, cols left..right-1."""

    rows: int
    cols: int
    side: int
    top: int
    bottom: int
    left: int
    right: int

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def width(self) -> int:
        return self.right - self.left

    def valid(self) -> torch.Tensor:
        """[rows * cols, side * side] bool: the patches of each crop (raster order of crops) inside the box."""
        r = torch.arange(self.rows * self.side)
        c = torch.arange(self.cols * self.side)
        inside = ((r >= self.top) & (r < self.bottom))[:, None] & ((c >= self.left) & (c < self.right))[None, :]
        return inside.view(self.rows, self.side, self.cols, self.side).permute(0, 2, 1, 3).reshape(self.rows * self.cols, -1)

    def global_position(self, crop: int, index: torch.Tensor) -> torch.Tensor:
        """Patch `index` of crop `crop` -> its raster position in the stitched map (row * cols*side + col)."""
        row = (crop // self.cols) * self.side + index // self.side
        col = (crop % self.cols) * self.side + index % self.side
        return row * (self.cols * self.side) + col


def unpadded_box(height: int, width: int, grid_height: int, grid_width: int) -> Tuple[int, int, int, int]:
    """transformers' `unpad_image` on a (grid_height x grid_width) feature map of an image of height x width pixels:
    (top, bottom, left, right) of what it keeps (the same arithmetic, so the counts match the model and processor)."""
    original_aspect = width / height
    current_aspect = grid_width / grid_height
    if original_aspect > current_aspect:
        new_height = int(round(height * (grid_width / width), 7))
        padding = (grid_height - new_height) // 2
        return padding, grid_height - padding, 0, grid_width
    new_width = int(round(width * (grid_height / height), 7))
    padding = (grid_width - new_width) // 2
    return 0, grid_height, padding, grid_width - padding


# What `variant=reference` computes on LLaVA-NeXT, per method, as each release does (shared/PEERS.md "LLaVA-NeXT"):
RELEASED_VISIONZIP = "visionzip"  # per crop; the base unit's output whole, then the grid crops' dominant patches in global
#                                   raster order, their CLS tokens (crop order), their contextual tokens (crop-major)
RELEASED_SPATIAL = "spatial"  # per crop; the base unit's tokens, then the grid crops' in global raster order
#                               (both: no unpadding, no newline, `budget` per crop)
RELEASED_PACKED = "packed"  # over LLaVA-NeXT's packed sequence (base, unpadded grid, a newline per row): newlines are candidates
NEXT_RELEASES = {"visionzip": RELEASED_VISIONZIP, "vispruner": RELEASED_SPATIAL, "fastervlm": RELEASED_SPATIAL,
                 "cdpruner": RELEASED_SPATIAL, "divprune": RELEASED_PACKED, "dart": RELEASED_PACKED, "pdrop": RELEASED_PACKED}

# per-crop releases whose result for a crop depends on the image's other crops (CDPruner min-maxes its relevance over them)
JOINT_OVER_CROPS = frozenset({"cdpruner"})


class LlavaNext(Family):
    name = "llava_next"
    own_options = frozenset({"budget_scope", "budget_split"})
    release: Optional[str] = None  # variant=reference: the release's way (NEXT_RELEASES), set by check_method

    def __init__(self, model: torch.nn.Module, processor: Any, options: Any = None) -> None:
        super().__init__(model, processor, options)
        self.image_processor = processor.image_processor
        self.pinpoints = [list(p) for p in model.config.image_grid_pinpoints]
        text_type = getattr(model.config.text_config, "model_type", "llama")
        self.conversation = "mistral_instruct" if text_type == "mistral" else "vicuna_v1"

    @property
    def image_newline(self) -> torch.Tensor:
        return self.model.model.image_newline

    # -- visuals -> units -------------------------------------------------------------------
    def crop_grid(self, height: int, width: int) -> CropGrid:
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        size = self.model.config.vision_config.image_size
        rows, cols = get_anyres_image_grid_shape((height, width), self.pinpoints, size)
        side = self.layout.rows
        return CropGrid(rows, cols, side, *unpadded_box(height, width, rows * side, cols * side))

    @property
    def per_crop_release(self) -> bool:
        """variant=reference of a per-crop release (VisionZip's layout or the spatial one): no unpadding, no newline."""
        return self.release in (RELEASED_VISIONZIP, RELEASED_SPATIAL)

    def plan_image(self, image: Any) -> ImageUnits:
        width, height = image.size
        grid = self.crop_grid(height, width)
        # a per-crop release never unpads: every patch of every crop is a candidate
        valid = None if self.per_crop_release else torch.cat([torch.ones(1, self.num_patches, dtype=torch.bool), grid.valid()])
        return ImageUnits(1 + grid.rows * grid.cols, self.num_patches + grid.height * grid.width, grid.height, valid, grid, (width, height))

    def units(self, images: Sequence[Any]) -> UnitBatch:
        rgb = self.rgb(images)
        if not rgb:
            return UnitBatch(torch.zeros(0), [], self.layout)
        out = self.image_processor(images=rgb, return_tensors="pt")
        plans = [self.plan_image(im) for im in rgb]
        sizes = out["image_sizes"].tolist()
        for plan, (height, width) in zip(plans, sizes):
            if (width, height) != plan.size:
                raise ValueError(f"the processor saw a {width}x{height} image for a {plan.size[0]}x{plan.size[1]} one")
        pixels = torch.cat([out["pixel_values"][i, :plan.units] for i, plan in enumerate(plans)])
        return UnitBatch(pixels, plans, self.layout)

    # -- the method -----------------------------------------------------------------------------------
    def check_method(self, method: Any) -> None:
        """Load time: `variant=reference` runs what the method's release computes on NeXT (NEXT_RELEASES), and is refused,
        in one line, for a method whose release has no NeXT path."""
        if method.variant == "reference":
            if method.name not in NEXT_RELEASES:
                raise no_next_release(method.name)
            self.release = NEXT_RELEASES[method.name]
            self.packed_selection = self.release == RELEASED_PACKED and method.stage == STAGE_PRE_PROJECTOR
            if self.per_crop_release and "budget_scope" in self.options.given and self.options.budget_scope != "unit":
                raise ValueError(f"budget_scope={self.options.budget_scope} does not apply to {method.name} variant=reference on "
                                 "LLaVA-NeXT: its release's budget is per crop (every unit keeps budget tokens); leave budget_scope out")
        self.check_budget(method)

    def reference_calls(self, batch: UnitBatch, method: Any) -> Optional[List[int]]:
        """A per-crop release encodes an image's base + crops as one batch: one call per image where that batch changes
        what it computes (JOINT_OVER_CROPS); the others compute each crop on its own (one unit per call)."""
        return [image.units for image in batch.images] if self.per_crop_release and method.name in JOINT_OVER_CROPS else None

    # -- budgets -----------------------------------------------------------------------------------
    def check_budget(self, method: Any) -> None:
        """Load time: budget_scope=unit must fit one unit's N patches; a per-image budget is checked per document
        (what it can be split over depends on the image's size)."""
        if self.packed_selection:  # budget = tokens of the packed span, which is longer than one unit
            if "budget_scope" in self.options.given:
                raise ValueError(f"budget_scope does not apply to {method.name} variant=reference on LLaVA-NeXT: its release selects "
                                 "over the image's whole packed sequence; leave budget_scope out")
            return
        if self.options.budget_scope == "unit" or self.per_crop_release:
            method.check_patches(self.num_patches)

    def unit_budgets(self, budget: Optional[int], batch: UnitBatch) -> Optional[List[int]]:
        if budget is None or self.per_crop_release or self.packed_selection:  # a per-crop release: the method's own budget in every unit
            return None
        shares: List[int] = []
        for image in batch.images:
            shares += self.image_shares(budget, image)
        return shares

    def image_shares(self, budget: int, image: ImageUnits) -> List[int]:
        """One image's budget per unit (ValueError when it cannot be met: a clear per-document error)."""
        counts = image.valid_counts(self.num_patches)
        if self.options.budget_scope == "unit":
            short = [u for u, n in enumerate(counts) if n < budget]
            if short:
                raise ValueError(f"budget={budget} per unit (budget_scope=unit) is more than unit {short[0]}'s {counts[short[0]]} valid "
                                 f"patches (a {image.size[0]}x{image.size[1]} image: {len(counts)} units)")
            return [budget] * len(counts)
        if budget < len(counts):
            raise ValueError(f"budget={budget} is less than the {len(counts)} units of a {image.size[0]}x{image.size[1]} image "
                             "(one token per unit at least); give more, or budget_scope=unit")
        return split_budget(budget, counts)

    def max_visual_tokens(self, budget: Optional[int], image: ImageUnits) -> int:
        if self.packed_selection:  # a budget of the packed span (newlines included), or the whole span
            return budget if budget is not None else image.visual_tokens_in + image.layout_tokens_in
        if self.per_crop_release:  # budget per crop (or the method's own count: at most CLS + every patch)
            return image.units * (budget if budget is not None else self.num_patches + 1)
        if budget is None:
            return image.visual_tokens_in + image.layout_tokens_in
        total = sum(self.image_shares(budget, image))
        return total + min(total, image.layout_tokens_in)  # a newline per kept row at most

    # -- re-assembly -------------------------------------------------------------------------
    def assemble(self, batch: UnitBatch, compressed: Sequence[CompressedImage], projected: Sequence[torch.Tensor]) -> List[ImageTokens]:
        out: List[ImageTokens] = []
        unit = 0
        for image in batch.images:
            mine = list(zip(compressed[unit:unit + image.units], projected[unit:unit + image.units]))
            out.append(self.released_sequence(image, mine) if self.per_crop_release else self.image_sequence(image, mine))
            unit += image.units
        return out

    def image_sequence(self, image: ImageUnits, units: Sequence[Tuple[CompressedImage, torch.Tensor]]) -> ImageTokens:
        """Base tokens, grid tokens in global raster order with a newline after each row that keeps one, then the
        crops' tokens that are not one patch (crop order)."""
        grid: CropGrid = image.placement
        (base, base_feats), crops = units[0], units[1:]
        positions, feats, loose = [], [], []
        for crop, (comp, proj) in enumerate(crops):
            patch = comp.index >= 0
            positions.append(grid.global_position(crop, comp.index[patch].to(torch.long).cpu()))
            feats.append(proj[patch.to(proj.device)])
            loose.append(proj[~patch.to(proj.device)])
        position = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long)
        grid_feats = torch.cat(feats) if feats else base_feats[:0]
        order = torch.argsort(position, stable=True)
        position, grid_feats = position[order], grid_feats[order.to(grid_feats.device)]
        width = grid.cols * grid.side
        row = position // width
        last_of_row = torch.ones_like(row, dtype=torch.bool)
        last_of_row[:-1] = row[1:] != row[:-1]
        newline = self.image_newline.to(grid_feats.device, grid_feats.dtype)
        slots = torch.arange(row.numel()) + torch.cumsum(last_of_row.long(), 0) - last_of_row.long()  # where each grid token goes
        rows_kept = int(last_of_row.sum())
        sequence = newline.expand(row.numel() + rows_kept, -1).clone()
        sequence[slots.to(sequence.device)] = grid_feats
        is_layout = torch.ones(sequence.shape[0], dtype=torch.bool)
        is_layout[slots] = False
        extra = torch.cat(loose) if loose else base_feats[:0]
        features = torch.cat([base_feats, sequence, extra])
        layout = torch.cat([torch.zeros(base_feats.shape[0], dtype=torch.bool), is_layout, torch.zeros(extra.shape[0], dtype=torch.bool)])
        visual = base.num_tokens + sum(c.num_tokens for c, _ in crops)
        return ImageTokens(features, layout, visual, rows_kept, image_tokens_in=image.visual_tokens_in)

    def released_sequence(self, image: ImageUnits, units: Sequence[Tuple[CompressedImage, torch.Tensor]]) -> ImageTokens:
        """A per-crop release's layout (no unpadding, no newline): the base unit's output as the method ordered it, then
        the grid crops' patch tokens in global raster order of the whole (padded) stitched grid; VisionZip's layout then
        appends every grid crop's CLS token (crop order) and then every grid crop's contextual tokens (crop-major)."""
        grid: CropGrid = image.placement
        (_, base_feats), crops = units[0], units[1:]
        positions, feats, cls, contextual = [], [], [], []
        for crop, (comp, proj) in enumerate(crops):
            role = comp.role.to(proj.device)
            patch = role == ROLE_KEPT if self.release == RELEASED_VISIONZIP else comp.index.to(proj.device) >= 0
            positions.append(grid.global_position(crop, comp.index[patch.to(comp.index.device)].to(torch.long).cpu()))
            feats.append(proj[patch])
            cls.append(proj[role == ROLE_EXTRA] if self.release == RELEASED_VISIONZIP else proj[~patch])
            contextual.append(proj[(role != ROLE_KEPT) & (role != ROLE_EXTRA)] if self.release == RELEASED_VISIONZIP else proj[:0])
        position = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long)
        grid_feats = torch.cat(feats) if feats else base_feats[:0]
        grid_feats = grid_feats[torch.argsort(position, stable=True).to(grid_feats.device)]
        features = torch.cat([base_feats, grid_feats, *cls, *contextual])
        return ImageTokens(features, None, int(features.shape[0]), 0, image_tokens_in=image.visual_tokens_in)

    def packed_patches(self, image: ImageUnits, positions: torch.Tensor) -> List[torch.Tensor]:
        """Positions in the packed sequence of every valid patch (`image_sequence` with nothing dropped: the base unit's
        576, then the unpadded grid row by row, a newline after each row) -> per unit the patch indices they hold, in
        the order given (repeats kept; newline positions hold no patch)."""
        grid: CropGrid = image.placement
        n, width = self.num_patches, grid.width + 1
        positions = positions.to(torch.long).cpu()
        out = [positions[positions < n]]
        q = positions[positions >= n] - n
        row, col = q // width, q % width
        patch = col < grid.width
        g_row, g_col = grid.top + row[patch], grid.left + col[patch]
        crop = (g_row // grid.side) * grid.cols + g_col // grid.side
        index = (g_row % grid.side) * grid.side + g_col % grid.side
        out += [index[crop == c] for c in range(grid.rows * grid.cols)]
        return out
