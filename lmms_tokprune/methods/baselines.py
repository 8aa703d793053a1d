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


def grid_cells(rows: int, cols: int, m: int, device: torch.device) -> torch.Tensor:
    """m cells spread uniformly over a rows x cols grid, as raster indices r * cols + c of that grid.

    The sample is a g_r x g_c lattice with g_r * g_c >= m, shaped like the grid (g_r ~ sqrt(m * rows / cols), so a
    square grid gets a near-square lattice), each point centred in its stratum; when the lattice has more than m
    points, m are taken evenly along its raster order (rather than dropping a whole trailing row), so exactly m
    distinct cells come back (m <= rows * cols)."""
    gr = max(1, min(rows, int(math.floor(math.sqrt(m * rows / cols)))))
    while gr * cols < m:
        gr += 1
    gc = min(cols, math.ceil(m / gr))
    while gr * gc < m:
        gc += 1
    r = ((torch.arange(gr, device=device, dtype=torch.float64) + 0.5) * rows / gr).floor().long()
    c = ((torch.arange(gc, device=device, dtype=torch.float64) + 0.5) * cols / gc).floor().long()
    cells = (r[:, None] * cols + c[None, :]).reshape(-1)
    if gr * gc > m:  # drop cells evenly rather than a whole trailing row
        pick = torch.linspace(0, gr * gc - 1, m, device=device, dtype=torch.float64).round().long()
        cells = cells[pick]
    return cells


def grid_indices(n: int, m: int, device: torch.device) -> torch.Tensor:
    """m patch indices spread uniformly over the sqrt(n) x sqrt(n) grid (LLaVA-1.5's square; `grid_cells`)."""
    side = int(round(math.sqrt(n)))
    if side * side != n:
        raise ValueError(f"spatial: {n} patches do not form a square grid")
    return grid_cells(side, side, m, device)


def _spatial(inp: VisionInputs, variant: str, budget=None, ratio=None) -> List[CompressedImage]:
    """A uniform lattice over the units' rows x cols grid (inp.grid)."""
    m = baseline_count(inp.num_patches, budget, ratio)
    cells = grid_cells(inp.grid.rows, inp.grid.cols, m, inp.hidden.device)
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
register(MethodSpec("topk_cls", _topk_cls, "top tokens of the last CLIP block's CLS attention", params=dict(_COMMON), needs=frozenset({"qk", "cls"})))
register(MethodSpec("spatial", _spatial, "a uniform 2-D grid of patches", params=dict(_COMMON)))
