"""Baselines every comparison needs: all tokens, random, top-k CLS attention, a uniform 2-D grid.

`ratio` keeps int(N * ratio) tokens (at least 1); `budget` keeps exactly `budget`. Kept tokens
stay in spatial (raster) order, the order LLaVA feeds them.

topk_cls: reference ranks the fp32 CLS attention with torch.topk; fixed ranks the settled float64 attention
(signals.cls_attention with dtype float64) with ties to the lower patch index, so its kept set does not depend
on the BLAS summation order. none, random and spatial read no scores.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch

from . import units
from .inputs import CompressedImage, VisionInputs
from .registry import BUDGET, RATIO, MethodSpec, Param, register
from .signals import cls_attention, signal_dtype, take_rows, top_indices

DEFAULT_RATIO = 0.25


def baseline_count(n: int, budget: Optional[int], ratio: Optional[float]) -> int:
    """The baselines' count: `budget`, else int(n * ratio) (FLOOR, at least 1; default ratio 1/4)."""
    return units.keep_count(n, budget, ratio, default_ratio=DEFAULT_RATIO, rounding=units.FLOOR, minimum=1)


def gather_sorted(inp: VisionInputs, keep: torch.Tensor) -> List[CompressedImage]:
    """keep: [B, M] patch indices -> per-image features in ascending (spatial) order."""
    keep = torch.sort(keep, dim=1).values
    feats = take_rows(inp.patches, keep)
    return [CompressedImage(features=feats[b], index=keep[b]) for b in range(keep.shape[0])]


def _none(inp: VisionInputs, variant: str, budget=None, ratio=None) -> List[CompressedImage]:
    idx = torch.arange(inp.num_patches, device=inp.hidden.device)
    return [CompressedImage(features=inp.patches[b], index=idx) for b in range(inp.batch_size)]


def _random(inp: VisionInputs, variant: str, budget=None, ratio=None, seed: int = 0) -> List[CompressedImage]:
    n = inp.num_patches
    m = baseline_count(n, budget, ratio)
    # One generator per image, seeded from (seed, image key): the draw does not depend on the
    # batch composition or the rank, so outputs match at any batch size and process count.
    rows = []
    for b in range(inp.batch_size):
        gen = torch.Generator(device="cpu").manual_seed((int(seed) * 1_000_003 + inp.key_of(b)) % (2**63 - 1))
        rows.append(torch.randperm(n, generator=gen)[:m])
    return gather_sorted(inp, torch.stack(rows).to(inp.hidden.device))


def _topk_cls(inp: VisionInputs, variant: str, budget=None, ratio=None) -> List[CompressedImage]:
    """reference: fp32 attention, torch.topk; fixed: settled float64 attention, ties to the lower patch index."""
    attn = cls_attention(inp.q, inp.k, signal_dtype(variant))
    m = baseline_count(inp.num_patches, budget, ratio)
    return gather_sorted(inp, top_indices(attn, m, variant))


def grid_indices(n: int, m: int, device: torch.device) -> torch.Tensor:
    """m patch indices spread uniformly over the sqrt(n) x sqrt(n) grid (rows x cols chosen near-square).

    The grid is rows x cols with rows*cols >= m cells centred in their strata; the first m
    cells in raster order are taken, so exactly m distinct indices come back.
    """
    side = int(round(math.sqrt(n)))
    if side * side != n:
        raise ValueError(f"spatial: {n} patches do not form a square grid")
    rows = max(1, min(side, int(math.floor(math.sqrt(m)))))
    while rows * side < m:
        rows += 1
    cols = min(side, math.ceil(m / rows))
    while rows * cols < m:
        cols += 1
    r = ((torch.arange(rows, device=device, dtype=torch.float64) + 0.5) * side / rows).floor().long()
    c = ((torch.arange(cols, device=device, dtype=torch.float64) + 0.5) * side / cols).floor().long()
    cells = (r[:, None] * side + c[None, :]).reshape(-1)
    if rows * cols > m:  # drop cells evenly rather than a whole trailing row
        pick = torch.linspace(0, rows * cols - 1, m, device=device, dtype=torch.float64).round().long()
        cells = cells[pick]
    return cells


def _spatial(inp: VisionInputs, variant: str, budget=None, ratio=None) -> List[CompressedImage]:
    m = baseline_count(inp.num_patches, budget, ratio)
    cells = grid_indices(inp.num_patches, m, inp.hidden.device)
    return gather_sorted(inp, cells.unsqueeze(0).expand(inp.batch_size, -1))


_COMMON = {"budget": BUDGET, "ratio": RATIO}

register(MethodSpec("none", _none, "all N visual tokens (the uncompressed baseline)", params={}))
register(
    MethodSpec(
        "random",
        _random,
        "uniformly random tokens, seeded per image",
        params={**_COMMON, "seed": Param(0, int, "random seed, combined with a stable per-image key", lambda v: None if v >= 0 else "must be >= 0")},
    )
)
register(MethodSpec("topk_cls", _topk_cls, "top tokens of the last CLIP block's CLS attention", params=dict(_COMMON), needs=frozenset({"qk"})))
register(MethodSpec("spatial", _spatial, "a uniform 2-D grid of patches", params=dict(_COMMON)))
