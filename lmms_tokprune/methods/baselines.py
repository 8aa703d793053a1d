"""Baselines every comparison needs: all tokens, random, top-k CLS attention, a uniform 2-D grid.

`ratio` keeps int(V * ratio) tokens (at least 1) of a unit's V valid patches (V = N without a valid mask); `budget`
keeps exactly `budget`, per-unit `budgets` exactly budgets[b]. Kept tokens stay in spatial (raster) order, the
order LLaVA feeds them.

topk_cls: reference ranks the fp32 CLS attention with torch.topk; fixed ranks the settled float64 attention
(signals.cls_attention with dtype float64) with ties to the lower patch index, so its kept set does not depend
on the BLAS summation order. none, random and spatial read no scores.

Valid patches (fixed; methods/units.py): none keeps exactly the valid patches in raster order (per-unit budgets
must equal them); random draws among the valid patches (the same per-unit-key generator: its permutation of all N
patches, invalid ones skipped); topk_cls ranks the valid patches only (the attention is CLIP's, over all keys);
spatial spreads its lattice over the bounding box of the valid patches, which must be a rectangle (unpadding
leaves valid rows x valid cols): the lattice of `grid_cells` for that box, shifted to its corner.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch

from . import units
from .inputs import CompressedImage, VisionInputs
from .registry import BUDGET, RATIO, READ_KEPT_ROWS, READ_LOGITS, MethodSpec, Param, register
from .signals import cls_attention, signal_dtype, take_rows, top_indices

DEFAULT_RATIO = 0.25


def gather_sorted(inp: VisionInputs, keep: torch.Tensor, counts: Optional[List[int]] = None, *, check: bool = False) -> List[CompressedImage]:
    """keep: [B, M] patch indices -> per-image features in ascending (spatial) order. counts (ragged units): unit b
    keeps the first counts[b] entries of its row (the rest is padding).

    check: the kept rows must be finite (ValueError naming `hidden` otherwise): a method that reads `hidden` only at
    its kept rows (registry.READ_KEPT_ROWS) checks them here instead of the registry scanning all of `hidden`."""
    b = keep.shape[0]
    roles = torch.zeros_like(keep)  # ROLE_KEPT: every output is one patch
    if counts is not None and any(c != keep.shape[1] for c in counts):
        n = inp.num_patches
        slot = torch.arange(keep.shape[1], device=keep.device)
        kept = slot < torch.tensor(counts, device=keep.device)[:, None]
        keep = torch.sort(torch.where(kept, keep, n), dim=1).values  # padding sorts last
        feats = take_rows(inp.patches, keep.clamp(max=n - 1))
        if check:
            _check_kept(torch.where(kept[:, :, None], feats, 0))  # padding rows are other patches: not read
        return [CompressedImage(feats[i, :c], keep[i, :c], roles[i, :c]) for i, c in enumerate(counts)]
    keep = torch.sort(keep, dim=1).values
    feats = take_rows(inp.patches, keep)
    if check:
        _check_kept(feats)
    return [CompressedImage(feats[i], keep[i], roles[i]) for i in range(b)]


def _check_kept(feats: torch.Tensor) -> None:
    if feats.is_floating_point() and not bool(torch.isfinite(feats.sum(dtype=torch.float32))):
        raise ValueError("VisionInputs.hidden contains NaN or inf (in a kept patch)")


def _none(inp: VisionInputs, variant: str) -> List[CompressedImage]:
    idx = torch.arange(inp.num_patches, device=inp.hidden.device)
    if inp.budgets is not None and list(inp.budgets) != units.valid_counts(inp):
        raise ValueError(f"none keeps every valid patch ({units.valid_counts(inp)} per unit); per-unit budgets {list(inp.budgets)} "
                         "would drop some: use a method that selects")
    if inp.valid is None:
        return [CompressedImage(features=inp.patches[b], index=idx) for b in range(inp.batch_size)]
    return [CompressedImage(features=inp.patches[b, inp.valid[b]], index=idx[inp.valid[b]]) for b in range(inp.batch_size)]


def _random(inp: VisionInputs, variant: str, budget=None, ratio=None, seed: int = 0) -> List[CompressedImage]:
    n = inp.num_patches
    counts = units.unit_counts(inp, budget, ratio, default_ratio=DEFAULT_RATIO, rounding=units.FLOOR, minimum=1)
    valid = None if inp.valid is None else inp.valid.cpu()
    # One generator per image, seeded from (seed, image key): the draw does not depend on the
    # batch composition or the rank, so outputs match at any batch size and process count.
    rows = []
    for b, m in enumerate(counts):
        gen = torch.Generator(device="cpu").manual_seed((int(seed) * 1_000_003 + inp.key_of(b)) % (2**63 - 1))
        perm = torch.randperm(n, generator=gen)
        rows.append((perm if valid is None else perm[valid[b, perm]])[:m])
    if len(set(counts)) == 1:
        return gather_sorted(inp, torch.stack(rows).to(inp.hidden.device))
    width = max(counts)
    padded = torch.stack([torch.cat([r, r.new_zeros(width - r.numel())]) for r in rows])
    return gather_sorted(inp, padded.to(inp.hidden.device), counts)


def _topk_cls(inp: VisionInputs, variant: str, budget=None, ratio=None) -> List[CompressedImage]:
    """reference: fp32 attention, torch.topk; fixed: settled float64 attention, ties to the lower patch index."""
    fixed = variant != "reference"  # fixed checks the keys through its logits and hidden at its kept rows (spec.reads)
    attn = units.masked(cls_attention(inp.q, inp.k, signal_dtype(variant), keys="k" if fixed else None), inp.valid)
    counts = units.unit_counts(inp, budget, ratio, default_ratio=DEFAULT_RATIO, rounding=units.FLOOR, minimum=1)
    return gather_sorted(inp, top_indices(attn, max(counts), variant), counts, check=fixed)


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


def valid_box(inp: VisionInputs) -> List[tuple]:
    """Per unit (top, left, rows, cols) of the bounding box of its valid patches (the whole grid without a mask);
    ValueError when the valid patches do not fill it (spatial needs unpadding's rectangle)."""
    grid = inp.grid
    if inp.valid is None:
        return [(0, 0, grid.rows, grid.cols)] * inp.batch_size
    cells = inp.valid.view(-1, grid.rows, grid.cols)
    live_rows, live_cols = cells.any(dim=2), cells.any(dim=1)
    idx_r = torch.arange(grid.rows, device=cells.device)
    idx_c = torch.arange(grid.cols, device=cells.device)
    top = torch.where(live_rows, idx_r, grid.rows).amin(dim=1)
    left = torch.where(live_cols, idx_c, grid.cols).amin(dim=1)
    height = torch.where(live_rows, idx_r + 1, 0).amax(dim=1) - top
    width = torch.where(live_cols, idx_c + 1, 0).amax(dim=1) - left
    boxes = list(zip(*torch.stack([top, left, height, width]).tolist()))
    for b, (count, (_t, _l, h, w)) in enumerate(zip(units.valid_counts(inp), boxes)):
        if count != h * w:
            raise ValueError(f"spatial: the {count} valid patches of unit {b} do not fill their {h} x {w} bounding box; spatial spreads "
                             "its grid over a rectangle of valid patches (what unpadding leaves)")
    return boxes


def _spatial(inp: VisionInputs, variant: str, budget=None, ratio=None) -> List[CompressedImage]:
    """A uniform lattice over the units' rows x cols grid (inp.grid), or over the rectangle of a unit's valid patches."""
    counts = units.unit_counts(inp, budget, ratio, default_ratio=DEFAULT_RATIO, rounding=units.FLOOR, minimum=1)
    dev = inp.hidden.device
    if inp.valid is None and len(set(counts)) == 1:
        cells = grid_cells(inp.grid.rows, inp.grid.cols, counts[0], dev)
        return gather_sorted(inp, cells.unsqueeze(0).expand(inp.batch_size, -1))
    cols = inp.grid.cols
    cache: dict = {}
    rows = []
    for (top, left, h, w), m in zip(valid_box(inp), counts):
        if (top, left, h, w, m) not in cache:
            cells = grid_cells(h, w, m, dev)
            cache[top, left, h, w, m] = (top + cells // w) * cols + left + cells % w
        rows.append(cache[top, left, h, w, m])
    width = max(counts)
    return gather_sorted(inp, torch.stack([torch.cat([r, r.new_zeros(width - r.numel())]) for r in rows]), counts)


_COMMON = {"budget": BUDGET, "ratio": RATIO}

register(MethodSpec("none", _none, "all N visual tokens (the uncompressed baseline)", params={}, unit_aware=True))
register(
    MethodSpec(
        "random",
        _random,
        "uniformly random tokens, seeded per image",
        params={**_COMMON, "seed": Param(0, int, "random seed, combined with a stable per-image key", lambda v: None if v >= 0 else "must be >= 0")},
        unit_aware=True,
    )
)
register(MethodSpec("topk_cls", _topk_cls, "top tokens of the last CLIP block's CLS attention", params=dict(_COMMON), needs=frozenset({"qk", "cls"}),
                      unit_aware=True, reads={"k": READ_LOGITS, "hidden": READ_KEPT_ROWS}))  # q: all (a NaN anywhere in q is an error: tested)
register(MethodSpec("spatial", _spatial, "a uniform 2-D grid of patches", params=dict(_COMMON), unit_aware=True))
