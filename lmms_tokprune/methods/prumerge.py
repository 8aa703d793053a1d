"""PruMerge and PruMerge+ (Shang et al.; released code: 42Shawn/LLaVA-PruMerge, clip_encoder.py).

prumerge: k = IQR outliers of the CLS attention a (adaptive) or int(N * ratio); the top-k in
descending attention order become cluster centres, each merged with its `num_neighbors` nearest
(key cosine) among the other kept tokens and the pruned patches (merge.py); one extra token
sum_j a_j h_j over the pruned patches is appended last. Count = k + 1.

prumerge_plus: as prumerge, plus a 1-D raster stride sample s = int(int(1/ratio)/3), ratio =
k/N, candidates 0, s, 2s, ... < N - 1 minus the kept ones, appended ascending after the top-k
as extra centres (role "merged"). Count = k + added + 1.

Variants (see shared/METHODS.md):
  reference  the released code: one IQR fence over the WHOLE batch (every image gets the same
             k = int(N * count / (B * N))), torch.topk tie order, k = 0 gives only the extra
             token (prumerge). PruMerge+ adaptive raises ValueError where the released code
             crashes: batch > 1, k = 0 (1/0), ratio > 1/3 (stride 0). PruMerge+ with
             adaptive=false follows the released non-adaptive branch, which differs from the
             adaptive one: stride int(1/ratio) from offset int(stride/2), no removal of kept
             patches (duplicate centres), the released complement quirk (duplicates make it
             drop the smallest pruned patches), and it only runs when that sequence has
             exactly k entries (ValueError otherwise).
  fixed      per-image fence and counts (padded batched ops, any batch size), k >= 1,
             stride >= 1, ties broken towards the lower patch index (a stable sort, so the
             result does not depend on the batch), the adaptive-branch stride rule in both
             modes, num_neighbors capped at N - 1. For one tie-free image fixed == reference.
             Every pick (the IQR fence, the top-k, the PruMerge+ sample rule) is taken on settled
             float64 attention logits (signals.settle), so the kept patches do not depend on the
             BLAS summation order; what only shapes the merged features stays as released (fp32
             key cosines for the neighbours, ties to the earlier candidate; the fp32 attention as
             weights).

`ratio` only applies with adaptive=false (default 1/8 there); giving it with adaptive=true is
an error rather than silently ignored.

Matched budget (`budget=N`, both variants, replaces the adaptive / ratio rule):
  prumerge       k = N - 1 top-attention centres + the extra token.
  prumerge_plus  M = N - 1 centres. Per image, take the largest top-k size k* in [1, M] whose
                 stride sample (ratio k*/N, stride >= 1) leaves k* + added <= M, keep that
                 sample, then fill the remaining M - added centre slots with the highest-
                 attention patches outside the sample (so the top-k* are kept and the top
                 part grows). If no k* fits (M <= 3), all M centres are top-attention.
                 Plus the extra token: exactly N.
  budget = 1 (both): the top-attention patch with every other patch merged into it, h_c + sum_{j != c} a_j h_j
                 (merge.single_token: no room for an extra token, so its sum joins the one centre).

Units (fixed; methods/units.py): with valid patches, a unit's IQR fence is taken over its V valid patches, the top-k
and every centre are valid, `ratio` keeps int(V * ratio), PruMerge+'s ratio is k / V and its stride runs over the
unit's valid list (valid-list positions 0, s, 2s, ... < V - 1), and only valid patches are neighbours or in the
extra token (the merge pool); the CLS attention stays CLIP's (softmax over all keys). budgets[b] works as `budget`
unit by unit (budget-1 units get the single token, in their own sub-batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import units
from .inputs import ROLE_EXTRA, ROLE_KEPT, ROLE_MERGED, CompressedImage, VisionInputs
from .merge import knn_merge, reference_complement, single_token
from .outliers import iqr_outliers
from .registry import BUDGET, RATIO, MethodSpec, Param, non_negative, positive_int, register
from .signals import FIXED_DTYPE, cls_attention, top_indices, top_rank

REFERENCE_RATIO = 1.0 / 8.0  # the released default reduction_ratio when adaptive is off


@dataclass
class Selection:
    """Centres per image in output order (padded) and how many of them are top-k / spatial."""

    centres: torch.Tensor  # [B, M] patch indices; slots past kept + spatial are padding
    kept: list[int]  # per image: leading top-attention centres
    spatial: list[int]  # per image: stride-sampled centres after them
    pool: torch.Tensor | None = None  # [B, N] bool; None = every patch takes part


def ranks(order: torch.Tensor) -> torch.Tensor:
    """Inverse permutation: [B, N] order -> [B, N] position of each patch in it."""
    pos = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, pos)


def stride_of(k: torch.Tensor, n: int | torch.Tensor) -> torch.Tensor:
    """PruMerge+ stride int(int(1/ratio)/3) with ratio = k/n, in float64 exactly as Python does (n: N, or each
    unit's valid count V, broadcast against k)."""
    ratio = k.to(torch.float64) / (n if isinstance(n, int) else n.to(torch.float64))
    return torch.floor(torch.floor(1.0 / ratio) / 3.0).long()


def stride_mask(stride: torch.Tensor, n: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[...] strides -> bool [..., N]: raster positions 0, s, 2s, ... < N - 1 (N - 1 never sampled).
    valid [B, N] (strides [B]): the same stride over each unit's list of valid patches (raster order): valid-list
    positions 0, s, 2s, ... < V - 1, as if those V patches were the whole image."""
    s = stride.clamp(min=1).unsqueeze(-1)
    if valid is None:
        p = torch.arange(n, device=stride.device)
        return (p % s == 0) & (p < n - 1)
    vpos = units.valid_positions(valid)
    return valid & (vpos % s == 0) & (vpos < valid.sum(dim=1, keepdim=True) - 1)


def layout(rank: torch.Tensor, kept: torch.Tensor, spatial: torch.Tensor) -> torch.Tensor:
    """Order patches: kept by rank (descending attention), then spatial ascending, then the rest."""
    n = rank.shape[1]
    p = torch.arange(n, device=rank.device)
    key = torch.where(kept, rank, torch.where(spatial, n + p, 3 * n + p))
    return torch.argsort(key, dim=1)


def adaptive_counts(attn: torch.Tensor, whisker: float, variant: str, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """IQR outlier count per image -> (k [B], reference ratio). Reference pools the batch into
    one fence: ratio = count / (B*N), every image gets k = int(N * ratio). fixed with `valid`: each unit's fence
    over its valid patches, which alone can be outliers."""
    b, n = attn.shape
    if variant == "reference":
        count = int(iqr_outliers(attn.reshape(1, -1), whisker).sum())
        ratio = count / (b * n)
        return torch.full((b,), int(n * ratio), dtype=torch.long, device=attn.device), ratio
    k = iqr_outliers(attn, whisker, mask=valid).sum(dim=1).clamp(min=1)
    return k, float("nan")


def ratio_count(n: int, ratio: float | None, variant: str) -> int:
    """Top-k size for adaptive=false: int(N * ratio) (the released formula), >= 1 when fixed."""
    return units.keep_count(n, None, ratio, default_ratio=REFERENCE_RATIO, rounding=units.FLOOR, minimum=0 if variant == "reference" else 1)


def _check_ratio_mode(method: str, adaptive: bool, ratio: float | None) -> None:
    if adaptive and ratio is not None:
        raise ValueError(
            f"{method}: ratio={ratio} applies only with adaptive=false (adaptive=true picks k by the IQR rule); "
            "pass adaptive=false with ratio, or budget=N for an exact token count"
        )


def _check_neighbours(method: str, variant: str, n: int, num_neighbors: int) -> None:
    if variant == "reference" and n - 1 < num_neighbors:
        raise ValueError(
            f"{method} (reference): only {n - 1} merge candidates for num_neighbors={num_neighbors} "
            f"(the released code crashes with fewer than {num_neighbors + 1} tokens); use variant=fixed"
        )


def top_selection(attn: torch.Tensor, k: torch.Tensor, variant: str) -> Selection:
    """Centres = top-k_b by attention (descending), padded to max k."""
    counts = k.tolist()
    kmax = max(counts)
    return Selection(top_indices(attn, kmax, variant), counts, [0] * len(counts))


def plus_selection(attn: torch.Tensor, k: torch.Tensor, stride: torch.Tensor, variant: str, valid: torch.Tensor | None = None) -> Selection:
    """PruMerge+ adaptive rule: top-k_b, then stride samples not already kept, ascending (attn: invalid patches at
    -inf, valid: their stride runs over the valid list)."""
    n = attn.shape[1]
    rank = top_rank(attn, k, variant)
    kept = rank < n
    spatial = stride_mask(stride, n, valid) & ~kept
    counts = torch.stack([k, spatial.sum(dim=1)]).tolist()
    width = max(a + s for a, s in zip(*counts))
    return Selection(layout(rank, kept, spatial)[:, :width], counts[0], counts[1])


def plus_budget_selection(attn: torch.Tensor, centres: torch.Tensor, variant: str, valid: torch.Tensor | None = None) -> Selection:
    """Budget rule for PruMerge+ (module docstring): exactly centres[b] centres for unit b.

    For every top-k size k in [1, M] the stride sample's overlap with the top-k is a prefix count
    along the attention order, so each distinct stride (a few dozen) costs one cumsum over [B, N].
    valid (fixed): attn holds the invalid patches at -inf (last in the order); ratios and strides are taken over
    each unit's V valid patches and its stride runs over its valid list (stride_mask).
    """
    b, n = attn.shape
    order = top_indices(attn, n, variant)
    rank = ranks(order)
    v = torch.full((b,), n, device=attn.device) if valid is None else valid.sum(dim=1)
    ks = torch.arange(1, int(centres.max()) + 1, device=attn.device)
    strides = stride_of(ks[:, None], v[None, :]).clamp(min=1)  # [M, B]
    uniq, which = torch.unique(strides, return_inverse=True)
    pos = order if valid is None else units.valid_positions(valid).gather(1, order)  # valid-list position, attention order
    in_sample = (pos[None] % uniq[:, None, None] == 0) & (pos[None] < (v - 1)[None, :, None])  # [S, B, N]
    if valid is not None:
        in_sample &= valid.gather(1, order)[None]
    unit = torch.arange(b, device=attn.device)
    overlap = in_sample.cumsum(dim=-1)[which, unit[None, :], (ks - 1)[:, None]]  # [M, B]: samples among the top-k
    added = (v[None, :] - 2) // uniq[which] + 1 - overlap
    fits = (ks[:, None] <= centres[None, :]) & (ks[:, None] + added <= centres[None, :])
    kstar = torch.where(fits, ks[:, None], 0).max(dim=0).values  # [B]; 0 = nothing fits
    sample = stride_mask(strides[(kstar - 1).clamp(min=0), unit], n, valid)
    spatial = sample & (rank >= kstar[:, None]) & (kstar[:, None] > 0)
    n_spatial = spatial.sum(dim=1)
    nonspatial_rank = ranks(layout(rank, ~spatial, spatial))  # position among non-spatial by rank
    kept = ~spatial & (nonspatial_rank < (centres - n_spatial)[:, None])
    counts = torch.stack([centres - n_spatial, n_spatial]).tolist()
    return Selection(layout(rank, kept, spatial)[:, : int(centres.max())], counts[0], counts[1])


def plus_reference_training_branch(attn: torch.Tensor, ratio: float) -> Selection:
    """Released adaptive=false branch: top-k ++ arange(int(step/2), N-1, step), duplicates kept."""
    b, n = attn.shape
    k = int(n * ratio)
    step = int(1 / ratio)
    seq = torch.arange(int(step / 2), n - 1, step, device=attn.device)
    if seq.numel() != k or k == 0:
        raise ValueError(
            f"prumerge_plus (reference, adaptive=false): ratio={ratio} gives k={k} top tokens but {seq.numel()} "
            f"stride samples (stride {step}); the released code only runs when they are equal and k >= 1; use variant=fixed"
        )
    if 2 * k > n:
        raise ValueError(
            f"prumerge_plus (reference, adaptive=false): ratio={ratio} gives {2 * k} centres for {n} patches; use variant=fixed"
        )
    idx = torch.cat([top_indices(attn, k, "reference"), seq.expand(b, -1)], dim=1)
    compl = reference_complement(idx, n)
    pool = torch.zeros(b, n, dtype=torch.bool, device=attn.device)
    pool.scatter_(1, idx, True).scatter_(1, compl, True)
    return Selection(idx, [k] * b, [k] * b, pool)


def assemble(sel: Selection, merged: torch.Tensor, extra: torch.Tensor, num_patches: int | list[int], variant: str = "reference") -> list[CompressedImage]:
    """Per image: centres (kept, then spatial) in selection order, then the extra token.

    fixed: when every patch is a centre (PruMerge+ at stride 1) the extra token sums over nothing;
    it is dropped so an image never yields more tokens than patches (reference keeps the zero token).
    num_patches: N, or each unit's valid count.
    """
    outs = []
    dev = merged.device
    limits = num_patches if isinstance(num_patches, list) else [num_patches] * len(sel.kept)
    for b, (nk, ns) in enumerate(zip(sel.kept, sel.spatial)):
        m = nk + ns
        if variant == "fixed" and m >= limits[b]:
            role = torch.cat([torch.full((nk,), ROLE_KEPT, device=dev), torch.full((ns,), ROLE_MERGED, device=dev)]).long()
            outs.append(CompressedImage(merged[b, :m], sel.centres[b, :m].clone(), role))
            continue
        role = torch.cat(
            [
                torch.full((nk,), ROLE_KEPT, device=dev),
                torch.full((ns,), ROLE_MERGED, device=dev),
                torch.full((1,), ROLE_EXTRA, device=dev),
            ]
        ).long()
        index = torch.cat([sel.centres[b, :m], torch.full((1,), -1, dtype=torch.long, device=dev)])
        outs.append(CompressedImage(torch.cat([merged[b, :m], extra[b : b + 1]]), index, role))
    return outs


def merge_selection(inp: VisionInputs, attn: torch.Tensor, sel: Selection, num_neighbors: int, variant: str = "reference") -> list[CompressedImage]:
    """Run the shared kNN merge over the selected centres and build the outputs (attn: the merge weights)."""
    counts = torch.tensor([a + s for a, s in zip(sel.kept, sel.spatial)], device=attn.device)
    merged, extra = knn_merge(inp.patches, attn, units.patch_rows(inp, inp.k), sel.centres, counts, num_neighbors, pool=sel.pool, variant=variant)
    return assemble(sel, merged, extra, units.valid_counts(inp), variant)


def attention_signals(inp: VisionInputs, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(merge weights, ranking scores): the fp32 CLS attention as released for both in reference; fixed ranks
    the settled float64 attention instead (same values up to fp32 rounding, summation-order free)."""
    attn = cls_attention(inp.q, inp.k)
    return attn, attn if variant == "reference" else cls_attention(inp.q, inp.k, FIXED_DTYPE)


def _prumerge(
    inp: VisionInputs,
    variant: str,
    adaptive: bool = True,
    ratio: float | None = None,
    whisker: float = 1.5,
    num_neighbors: int = 32,
    budget: int | None = None,
) -> list[CompressedImage]:
    _check_ratio_mode("prumerge", adaptive, ratio)
    budgets = units.unit_budgets(inp, budget)
    if budgets is not None and 1 in budgets and set(budgets) != {1}:  # budget-1 units: their own token rule
        return units.split_units(inp, [m == 1 for m in budgets], lambda sub, _: _prumerge(sub, variant, adaptive, ratio, whisker, num_neighbors, budget))
    attn, scores = attention_signals(inp, variant)
    valid = inp.valid
    if budgets is not None and budgets[0] == 1:
        return single_token(inp.patches, attn, variant, scores, valid)
    n = inp.num_patches
    _check_neighbours("prumerge", variant, n, num_neighbors)
    if budgets is not None:
        k = torch.tensor(budgets, dtype=torch.long, device=attn.device) - 1
    elif adaptive:
        k = adaptive_counts(scores, whisker, variant, valid)[0]
    else:
        k = torch.tensor([ratio_count(v, ratio, variant) for v in units.valid_counts(inp)], dtype=torch.long, device=attn.device)
    sel = top_selection(units.masked(scores, valid), k, variant)
    sel.pool = valid
    return merge_selection(inp, attn, sel, num_neighbors, variant)


def _plus_adaptive_reference(attn: torch.Tensor, whisker: float) -> Selection:
    """Released adaptive branch with its crash cases turned into ValueErrors."""
    b, _n = attn.shape
    if b > 1:
        raise ValueError("prumerge_plus (reference): the released code only runs with batch size 1; use variant=fixed")
    k, ratio = adaptive_counts(attn, whisker, "reference")
    if ratio == 0.0:
        raise ValueError(
            "prumerge_plus (reference): the IQR rule found no outliers (k=0; the released code divides by zero); use variant=fixed"
        )
    stride = int(int(1 / ratio) / 3)
    if stride == 0:
        raise ValueError(
            f"prumerge_plus (reference): ratio={ratio:.4f} > 1/3 gives stride 0 (the released code crashes); use variant=fixed"
        )
    sel = plus_selection(attn, k, torch.full_like(k, stride), "reference")
    if sel.spatial[0] == 0:
        raise ValueError("prumerge_plus (reference): every stride sample is already kept (the released code crashes); use variant=fixed")
    return sel


def _prumerge_plus(
    inp: VisionInputs,
    variant: str,
    adaptive: bool = True,
    ratio: float | None = None,
    whisker: float = 1.5,
    num_neighbors: int = 32,
    budget: int | None = None,
) -> list[CompressedImage]:
    _check_ratio_mode("prumerge_plus", adaptive, ratio)
    budgets = units.unit_budgets(inp, budget)
    if budgets is not None and 1 in budgets and set(budgets) != {1}:  # budget-1 units: their own token rule
        return units.split_units(inp, [m == 1 for m in budgets],
                                 lambda sub, _: _prumerge_plus(sub, variant, adaptive, ratio, whisker, num_neighbors, budget))
    attn, scores = attention_signals(inp, variant)
    valid = inp.valid
    if budgets is not None and budgets[0] == 1:
        return single_token(inp.patches, attn, variant, scores, valid)
    n = inp.num_patches
    _check_neighbours("prumerge_plus", variant, n, num_neighbors)
    if budgets is not None:
        sel = plus_budget_selection(units.masked(scores, valid), torch.tensor(budgets, device=attn.device) - 1, variant, valid)
    elif variant == "reference" and adaptive:
        sel = _plus_adaptive_reference(attn, whisker)
    elif variant == "reference":
        sel = plus_reference_training_branch(attn, REFERENCE_RATIO if ratio is None else ratio)
    else:
        counts = units.valid_counts(inp)
        k = (
            adaptive_counts(scores, whisker, variant, valid)[0]
            if adaptive
            else torch.tensor([ratio_count(v, ratio, variant) for v in counts], dtype=torch.long, device=attn.device)
        )
        v = n if valid is None else torch.tensor(counts, device=attn.device)
        sel = plus_selection(units.masked(scores, valid), k, stride_of(k, v).clamp(min=1), variant, valid)
    sel.pool = valid if sel.pool is None else sel.pool
    return merge_selection(inp, attn, sel, num_neighbors, variant)


def _params() -> dict:
    return {
        "adaptive": Param(True, bool, "k = number of IQR upper-fence outliers of the CLS attention; false: k = int(N * ratio)"),
        "ratio": Param(
            None, float, f"fraction of the N patches kept as top-k when adaptive=false (default {REFERENCE_RATIO})", RATIO.check
        ),
        "whisker": Param(1.5, float, "IQR fence multiplier: outlier if a > Q3 + whisker * (Q3 - Q1)", non_negative),
        "num_neighbors": Param(32, int, "kNN size: patches merged into each centre (key cosine)", positive_int),
        "budget": BUDGET,
    }


register(
    MethodSpec(
        "prumerge",
        _prumerge,
        "PruMerge: IQR-adaptive top CLS-attention tokens, kNN-merged, plus one extra token",
        params=_params(),
        needs=frozenset({"qk", "cls"}),
        unit_aware=True,
    )
)
register(
    MethodSpec(
        "prumerge_plus",
        _prumerge_plus,
        "PruMerge+: PruMerge plus 1-D raster stride samples as extra centres",
        params=_params(),
        needs=frozenset({"qk", "cls"}),
        reference_batch_one=True,
        unit_aware=True,
    )
)
