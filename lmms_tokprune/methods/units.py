"""Units (one CLIP image each: a LLaVA-1.5 image, a LLaVA-NeXT base image or crop, a video frame): how many tokens
a unit keeps, and the per-patch rows of its tensors.

Layout: every pre-projector method reads the units' grid from `VisionInputs.grid` (rows x cols, CLS prefix or not),
N from `VisionInputs.num_patches` and the patch rows through `inp.patches` / `patch_rows`, never 576, a square or
"row 0 is CLS". Methods that read CLIP's CLS attention declare "cls" in their `needs`, and the registry refuses
units without a CLS token for them.

Counts: the one count rule every pre-projector method calls.

A `budget` is exact. A `ratio` is a fraction of the unit's N patches, rounded by a rule each method names
explicitly, because the releases round differently:
  FLOOR    int(n * ratio): Python's int() of the product (the baselines, PruMerge's released int(N * ratio));
  NEAREST  int(round(ratio * n)): Python's round, ties to even (DivPrune's released int(round(SUBSET_RATIO * N))).
`minimum` is the smallest count a method accepts from that rule (1 for the baselines and fixed PruMerge; 0 where
the release can keep nothing and the caller reproduces or refuses it).
"""

from __future__ import annotations

from typing import Optional

import torch

from .inputs import VisionInputs

FLOOR = "floor"
NEAREST = "nearest"
ROUNDINGS = (FLOOR, NEAREST)


def keep_count(n: int, budget: Optional[int], ratio: Optional[float], *, default_ratio: float, rounding: str, minimum: int = 1) -> int:
    """Tokens to keep out of n: `budget` when given (exact), else `ratio` (or `default_ratio`) of n rounded by
    `rounding` (FLOOR or NEAREST, module doc), at least `minimum`."""
    if budget is not None:
        return int(budget)
    fraction = default_ratio if ratio is None else ratio
    if rounding == FLOOR:
        count = int(n * fraction)
    elif rounding == NEAREST:
        count = int(round(n * fraction))
    else:
        raise ValueError(f"unknown rounding {rounding!r}; valid: {', '.join(ROUNDINGS)}")
    return max(minimum, count)


def patch_rows(inp: VisionInputs, t: torch.Tensor) -> torch.Tensor:
    """[B, (1+)N, ...] -> [B, N, ...]: the patch rows of a per-token tensor shaped like `hidden` (q, k, feature_k,
    last_hidden): without the CLS row when the units have one (inp.grid.cls)."""
    return t[:, 1:] if inp.grid.cls else t
