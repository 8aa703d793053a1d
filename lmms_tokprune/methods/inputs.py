"""What a compression method receives and returns: plain tensors, no model objects.

Keeping the method interface tensor-only lets the same code run on captured CLIP states, on
hand-built test cases and on the authors' golden inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

# Roles of output tokens, for token maps and statistics (not used by the LLM).
ROLE_KEPT = 0  # a patch kept as it is (or a cluster centre that absorbed neighbours)
ROLE_RECOVERED = 1  # a patch brought back by text guidance (recover)
ROLE_MERGED = 2  # a secondary cluster centre (recover) or spatial sample (prumerge_plus)
ROLE_EXTRA = 3  # a token that is not one patch (the merged remainder)
ROLE_NAMES = {ROLE_KEPT: "kept", ROLE_RECOVERED: "recovered", ROLE_MERGED: "merged", ROLE_EXTRA: "extra"}


@dataclass(frozen=True)
class UnitLayout:
    """How the tokens of one unit lie. A unit is one CLIP image: a LLaVA-1.5 image, a LLaVA-NeXT base image or
    crop, a video frame. Its rows x cols patches are in raster order (patch p = r * cols + c); `cls`: CLIP's CLS
    token comes first in `hidden` / `q` / `k` (CLIP always computes it; whether the LLM receives it is the model
    family's business, not a method's)."""

    rows: int
    cols: int
    cls: bool = True

    @property
    def num_patches(self) -> int:
        return self.rows * self.cols

    @staticmethod
    def square(num_patches: int) -> "UnitLayout":
        """LLaVA-1.5's layout: a CLS token, then a square grid (24 x 24 = 576); a non-square count is one row."""
        side = int(round(num_patches**0.5))
        return UnitLayout(side, side) if side * side == num_patches else UnitLayout(1, num_patches)


@dataclass
class VisionInputs:
    """CLIP states of a batch of images, as captured during LLaVA's own vision forward.

    hidden: [B, 1+N, D] penultimate CLIP hidden states incl. CLS (what LLaVA projects).
    q, k: [B, 1+N, D] raw q_proj / k_proj outputs of the LAST CLIP block (None if unused).
    last_hidden: [B, 1+N, D] last CLIP block output without post-layernorm (recover).
    text_embeds: [B, Dt] CLIP text embedding after text_projection (recover).
    visual_projection: [Dt, D] CLIP visual_projection weight (recover).
    image_keys: optional stable integer per image; the `random` baseline seeds from it so a
        sample draws the same tokens whatever batch or rank it lands in.

    Peer methods (shared/PEERS.md) read, when they declare them:
    feature_q, feature_k: [B, 1+N, D] raw q_proj / k_proj outputs of the CLIP block whose OUTPUT is `hidden`
        (LLaVA-1.5: block 22 of 0..23); num_heads: that block's attention heads (16), for per-head attention.
    projected: [B, N, D_llm] mm-projector outputs of the N patches (DivPrune, CDPruner).
    patch_embeds: [B, N, Dt] CLIP visual_projection(post_layernorm(hidden[:, 1:])) (CDPruner).
    text_segments: B tensors [S_b, Dt], CLIP text_embeds of the question, one row per 77-token segment (CDPruner).

    Units (every image of the batch is one unit; LLaVA-NeXT crops and video frames are units too):
    layout: the grid of every unit of the batch (one shape per call); None = LLaVA-1.5's, a CLS token then a square
        grid of hidden.shape[1] - 1 patches (`UnitLayout.square`). N = `num_patches` everywhere.
    valid: [B, N] bool, the patches that exist (LLaVA-NeXT: those that unpadding keeps); a method never keeps nor
        merges an invalid patch. None = all valid. `fixed` only (the releases do not unpad).
    budgets: B ints, the exact token count of each unit (the engine's split of a per-image budget over its
        units); replaces the `budget` parameter unit by unit. `fixed` only.
    release_batch: `reference` only: the units are ONE call of the released code, which took them as one batch (a
        LLaVA-NeXT image's base + crops): what the release computes over its whole batch spans them (CDPruner's relevance
        min-max), and a release that fails past batch 1 only in its LLM assembly runs them. False: units of separate calls.
    """

    hidden: torch.Tensor
    q: Optional[torch.Tensor] = None
    k: Optional[torch.Tensor] = None
    last_hidden: Optional[torch.Tensor] = None
    text_embeds: Optional[torch.Tensor] = None
    visual_projection: Optional[torch.Tensor] = None
    image_keys: Optional[Sequence[int]] = None
    feature_q: Optional[torch.Tensor] = None
    feature_k: Optional[torch.Tensor] = None
    num_heads: Optional[int] = None
    projected: Optional[torch.Tensor] = None
    patch_embeds: Optional[torch.Tensor] = None
    text_segments: Optional[List[torch.Tensor]] = None
    layout: Optional[UnitLayout] = None
    valid: Optional[torch.Tensor] = None
    budgets: Optional[Sequence[int]] = None
    release_batch: bool = False

    @property
    def batch_size(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def grid(self) -> UnitLayout:
        """The units' layout (given, or LLaVA-1.5's: CLS + a square grid of the tokens after it)."""
        return self.layout if self.layout is not None else UnitLayout.square(int(self.hidden.shape[1]) - 1)

    @property
    def num_patches(self) -> int:
        """N, the patches of one unit (the one definition every method reads)."""
        return self.grid.num_patches

    @property
    def patches(self) -> torch.Tensor:
        """[B, N, D] patch features without CLS: what LLaVA feeds its projector."""
        return self.hidden[:, 1:] if self.grid.cls else self.hidden

    def image(self, b: int) -> "VisionInputs":
        """Image b alone (a batch of one), every tensor sliced the same way."""
        one = lambda t: None if t is None else t[b : b + 1]  # noqa: E731
        keys = None if self.image_keys is None else [self.image_keys[b]]
        return VisionInputs(one(self.hidden), one(self.q), one(self.k), one(self.last_hidden), one(self.text_embeds),
                            self.visual_projection, image_keys=keys, feature_q=one(self.feature_q), feature_k=one(self.feature_k),
                            num_heads=self.num_heads, projected=one(self.projected), patch_embeds=one(self.patch_embeds),
                            text_segments=None if self.text_segments is None else [self.text_segments[b]],
                            layout=self.layout, valid=one(self.valid), budgets=None if self.budgets is None else [self.budgets[b]])

    def key_of(self, b: int) -> int:
        return int(self.image_keys[b]) if self.image_keys is not None else 0


@dataclass
class CompressedImage:
    """One image's compressed visual tokens, in the order the LLM will see them.

    features: [M, D] pre-projector features.
    index: [M] long, source patch index 0..N-1, or -1 for a token that is not one patch.
    role: [M] long, ROLE_* codes (kept / recovered / merged / extra) for maps and counts.
    """

    features: torch.Tensor
    index: torch.Tensor
    role: Optional[torch.Tensor] = field(default=None)

    def __post_init__(self) -> None:
        if self.role is None:
            self.role = torch.where(self.index >= 0, ROLE_KEPT, ROLE_EXTRA).to(self.index.device)

    @property
    def num_tokens(self) -> int:
        return int(self.index.shape[0])
