"""Units (one CLIP image each: a LLaVA-1.5 image, a LLaVA-NeXT base image or crop, a video frame): how many tokens
a unit keeps, which of its patches exist, and the per-patch rows of its tensors.

Layout: every pre-projector method reads the units' grid from `VisionInputs.grid` (rows x cols, CLS prefix or not),
N from `VisionInputs.num_patches` and the patch rows through `inp.patches` / `patch_rows`, never 576, a square or
"row 0 is CLS". Methods that read CLIP's CLS attention declare "cls" in their `needs`, and the registry refuses
units without a CLS token for them.

Valid patches (`VisionInputs.valid`, LLaVA-NeXT unpadding; `fixed` variants, methods registered `unit_aware`): a patch
that is not valid is never kept, never merged (not a neighbour, not in an extra / contextual token) and never counted:
adaptive counts (IQR fences, LOF fractions), ratios, strides and spreads are taken over the unit's V valid patches as
they would be over N. Signals CLIP computed over all of its tokens (the CLS softmax over 1+N keys) stay as CLIP
computed them; only selection and merging leave the invalid patches out. The registry hands methods `valid=None`
when every patch of every unit is valid, so LLaVA-1.5 runs the exact code it always ran.

Per-unit budgets (`VisionInputs.budgets`): budgets[b] is exactly unit b's token count (merged, extra and CLS tokens
count, as `budget` does), replacing the `budget` parameter (and ratio / adaptive counts) unit by unit; outputs are
ragged per unit. The methods keep their batched tensor paths (padded tensors + masks); `split_units` runs a method's
special case (budget 1) on its own sub-batch.

Counts: the one count rule every pre-projector method calls.

A `budget` is exact. A `ratio` is a fraction of the unit's N (valid) patches, rounded by a rule each method names
explicitly, because the releases round differently:
  FLOOR    int(n * ratio): Python's int() of the product (the baselines, PruMerge's released int(N * ratio));
  NEAREST  int(round(ratio * n)): Python's round, ties to even (DivPrune's released int(round(SUBSET_RATIO * N))).
`minimum` is the smallest count a method accepts from that rule (1 for the baselines and fixed PruMerge; 0 where
the release can keep nothing and the caller reproduces or refuses it).
"""

from __future__ import annotations

from typing import Callable, Hashable, List, Optional, Sequence, TypeVar

import torch

from .inputs import VisionInputs

FLOOR = "floor"
NEAREST = "nearest"
ROUNDINGS = (FLOOR, NEAREST)

T = TypeVar("T")


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


def valid_counts(inp: VisionInputs) -> List[int]:
    """V per unit: its valid patches (N each when `valid` is None)."""
    if inp.valid is None:
        return [inp.num_patches] * inp.batch_size
    return [int(c) for c in inp.valid.sum(dim=1).tolist()]


def unit_budgets(inp: VisionInputs, budget: Optional[int]) -> Optional[List[int]]:
    """The exact token count of every unit: `budgets` when given, else the `budget` parameter for each, else None."""
    if inp.budgets is not None:
        return [int(m) for m in inp.budgets]
    return None if budget is None else [int(budget)] * inp.batch_size


def unit_counts(inp: VisionInputs, budget: Optional[int], ratio: Optional[float], *, default_ratio: float, rounding: str,
                minimum: int = 1) -> List[int]:
    """keep_count per unit: budgets[b], else `budget`, else the ratio rule over the unit's valid count."""
    budgets = unit_budgets(inp, budget)
    if budgets is not None:
        return budgets
    return [keep_count(v, None, ratio, default_ratio=default_ratio, rounding=rounding, minimum=minimum) for v in valid_counts(inp)]


def valid_positions(valid: torch.Tensor) -> torch.Tensor:
    """[B, N] bool -> [B, N] long: each patch's position in its unit's list of valid patches (raster order); the
    invalid ones get the position of the next valid patch (callers mask them)."""
    return valid.long().cumsum(dim=1) - valid.long()


def masked(scores: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """Scores with the invalid patches at -inf (they rank last, after every valid one); `scores` itself when all are
    valid."""
    return scores if valid is None else scores.masked_fill(~valid, float("-inf"))


def select(inp: VisionInputs, rows: Sequence[int]) -> VisionInputs:
    """Units `rows` of `inp` as their own batch (every per-unit tensor and list sliced alike)."""
    rows = list(rows)
    if rows == list(range(inp.batch_size)):
        return inp
    if rows == list(range(rows[0], rows[0] + len(rows))):
        pick = lambda t: None if t is None else t[rows[0] : rows[0] + len(rows)]  # noqa: E731 (views)
    else:
        index = torch.tensor(rows, device=inp.hidden.device)
        pick = lambda t: None if t is None else t.index_select(0, index.to(t.device))  # noqa: E731
    at = lambda xs: None if xs is None else [xs[r] for r in rows]  # noqa: E731
    return VisionInputs(pick(inp.hidden), pick(inp.q), pick(inp.k), pick(inp.last_hidden), pick(inp.text_embeds), inp.visual_projection,
                        image_keys=at(inp.image_keys), feature_q=pick(inp.feature_q), feature_k=pick(inp.feature_k),
                        num_heads=inp.num_heads, projected=pick(inp.projected), patch_embeds=pick(inp.patch_embeds),
                        text_segments=at(inp.text_segments), layout=inp.layout, valid=pick(inp.valid), budgets=at(inp.budgets))


def split_units(inp: VisionInputs, keys: Sequence[Hashable], run: Callable[[VisionInputs, Hashable], List[T]]) -> List[T]:
    """run(sub-batch, key) once per distinct key over the units carrying it; results back in unit order (one
    call, on `inp` itself, when every unit has the same key)."""
    distinct = list(dict.fromkeys(keys))
    if len(distinct) == 1:
        return run(inp, distinct[0])
    out: List[Optional[T]] = [None] * len(keys)
    for key in distinct:
        rows = [b for b, k in enumerate(keys) if k == key]
        for b, result in zip(rows, run(select(inp, rows), key)):
            out[b] = result
    return out  # type: ignore[return-value]
