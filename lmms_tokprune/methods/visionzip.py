"""VisionZip (Yang et al., CVPR'25; released code: dvlab-research/VisionZip @ 3151f6d, visionzip/utils.py).

Inputs: `feature_q` / `feature_k` (raw q_proj / k_proj outputs of CLIP block 22, whose output is `hidden`),
`num_heads`, `hidden`. With dominant = D + 1 (it counts the CLS token) and contextual = C:

1. s = per-head CLS attention (signals.cls_attention_per_head) summed over the heads [N]; the D dominant
   patches are the top-D of s.
2. Dominant tokens: CLS (hidden[0]), then the D patches in ascending patch order.
3. The R = N - D other patches, ascending. Merge metric: feature_k split into heads and averaged over
   them (raw, unscaled), L2-normalised.
4. Targets: remaining-list positions 0, step, 2*step, ... (the first C), step = max(1, R // C): a 1-D stride
   over the raster list, not a grid and not similarity.
5. Every other remaining token joins the target of highest metric cosine (ties: the earlier target);
   contextual token = h_target + (sum of member h) / max(count, 1) -- the target PLUS the mean of its members.
6. Output [CLS, D patches, C contextual tokens in target order]; index -1 for CLS (role extra), the patch
   for the dominant ones (kept), the target's patch for the contextual ones (merged).

`budget=n` (exact n tokens): contextual = floor(5n/32), dominant = n - contextual (64 = 54 + 10, 128 = 108 + 20,
192 = 162 + 30: the README's 54+10 and LightCompress' ratio). The released entry point's defaults are
dominant 191, contextual 30 (221 tokens).

Variants: `reference` = the released tensor path (batched, per image), torch.topk's tie order, no eps in the
norm; C = 0 (the release divides by zero) is a ValueError. `fixed` = the same with C = 0 allowed (no
contextual tokens), ties to the lower patch index, eps in the norm, and both rankings (the dominant top-D, each
token's target) on settled float64 scores (per-head logits, metric cosines; signals.settle), so the selection does
not depend on the BLAS summation order; the merged features stay in the inputs' dtype. dominant + contextual > 1 + N (the
release's shape mismatch) is a ValueError in both. The release's class-level monkey patches and its eager
attention in all 24 blocks are how it gets these tensors, not what it computes: we capture them per instance.

Units (fixed; methods/units.py): with valid patches the dominant patches are the top-D valid ones, the remaining list
is the unit's other valid patches (R_b = V_b - D), its stride step = max(1, R_b // C) and only valid patches are
targets or members; dominant + contextual must fit the unit's 1 + V_b tokens. budgets[b] splits as `budget` does,
unit by unit (a budget under 7 has no contextual token). Units are padded lists with per-unit counts, all at once.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from . import units
from .inputs import ROLE_EXTRA, ROLE_KEPT, ROLE_MERGED, CompressedImage, VisionInputs
from .registry import BUDGET, READ_CLS_ROW, READ_LOGITS, MethodSpec, Param, positive_int, register
from .signals import FIXED_DTYPE, cls_attention_per_head, cosine_cross, signal_dtype, take_rows, top_rank

DEFAULT_DOMINANT = 191
DEFAULT_CONTEXTUAL = 30
EPS = 1e-6


def split_budget(budget: int) -> tuple:
    """budget n -> (dominant, contextual) = (n - floor(5n/32), floor(5n/32))."""
    contextual = 5 * budget // 32
    return budget - contextual, contextual


def merge_metric(feature_k: torch.Tensor, num_heads: int, variant: str) -> torch.Tensor:
    """[B, 1+N, D] raw keys -> [B, N, D/H]: the head-mean of the patch keys; reference L2-normalises it (no eps),
    fixed returns it raw in float64, image by image (the cosines are taken by signals.cosine_cross, eps in the norm)."""
    b, t, d = feature_k.shape
    if variant != "reference":
        return torch.stack([feature_k[i, 1:].to(FIXED_DTYPE).reshape(t - 1, num_heads, d // num_heads).mean(dim=1) for i in range(b)])
    metric = feature_k[:, 1:].reshape(b, t - 1, num_heads, d // num_heads).mean(dim=2)
    return metric / metric.norm(dim=-1, keepdim=True)


def unit_splits(inp: VisionInputs, dominant: int, contextual: int, budget: Optional[int], variant: str) -> List[Tuple[int, int]]:
    """(dominant, contextual) per unit: split_budget of its budget (budgets[b], or `budget`), else the parameters;
    each must fit the unit's CLS + valid patches."""
    budgets = units.unit_budgets(inp, budget)
    splits = [split_budget(m) for m in budgets] if budgets is not None else [(dominant, contextual)] * inp.batch_size
    n = inp.num_patches
    for u, ((dom, ctx), v) in enumerate(zip(splits, units.valid_counts(inp))):
        if dom + ctx > 1 + v:
            where = f"the {1 + n} tokens (CLS + {n} patches)" if v == n else f"unit {u}'s {1 + v} tokens (CLS + {v} valid patches)"
            raise ValueError(f"visionzip: dominant={dom} + contextual={ctx} exceeds {where}")
        if variant == "reference" and ctx == 0:
            raise ValueError("visionzip (reference): contextual=0 divides by zero in the released code; use variant=fixed")
    return splits


def compact(keep: torch.Tensor, width: int) -> torch.Tensor:
    """bool [B, L] -> [B, width] long: each row's True positions ascending, then padding (its other positions)."""
    p = torch.arange(keep.shape[1], device=keep.device)
    return torch.argsort(torch.where(keep, p, keep.shape[1] + p), dim=1)[:, :width]


def _visionzip(inp: VisionInputs, variant: str, dominant: int = DEFAULT_DOMINANT, contextual: int = DEFAULT_CONTEXTUAL,
               budget: Optional[int] = None) -> List[CompressedImage]:
    """Every unit at once; ragged units (valid patches, per-unit budgets) are padded lists with per-unit counts."""
    splits = unit_splits(inp, dominant, contextual, budget, variant)
    n = inp.num_patches
    dev = inp.hidden.device
    valid = inp.valid
    doms = [dom - 1 for dom, _ in splits]  # D_b patches (the CLS token counts as dominant)
    ctxs = [ctx for _, ctx in splits]
    rests = [v - d for v, d in zip(units.valid_counts(inp), doms)]  # R_b remaining valid patches
    keys = None if variant == "reference" else "feature_k"  # fixed checks feature_k through its logits (spec.reads)
    scores = cls_attention_per_head(inp.feature_q, inp.feature_k, inp.num_heads, signal_dtype(variant), keys=keys).sum(dim=1)  # [B, N]
    chosen = top_rank(units.masked(scores, valid), torch.tensor(doms, device=dev), variant) < n
    kept = compact(chosen, max(doms))  # ascending
    rest = compact(~chosen if valid is None else valid & ~chosen, max(rests))  # ascending
    patches = inp.patches
    kept_h = take_rows(patches, kept)
    merged = targets = None
    cmax = max(ctxs)
    if cmax:
        r_b = torch.tensor(rests, device=dev)[:, None]
        c_b = torch.tensor(ctxs, device=dev)[:, None]
        step = (r_b // c_b.clamp(min=1)).clamp(min=1)
        t = torch.arange(rest.shape[1], device=dev)
        is_target = (t % step == 0) & (t // step < c_b) & (t < r_b)  # remaining-list positions 0, step, ... (first C_b)
        mmax = max(r - c for r, c in zip(rests, ctxs))
        target_pos = compact(is_target, cmax)
        member_pos = compact(~is_target & (t < r_b), mmax)
        metric = take_rows(merge_metric(inp.feature_k, inp.num_heads, variant), rest)
        rest_h = take_rows(patches, rest)
        member_metric, target_metric = take_rows(metric, member_pos), take_rows(metric, target_pos)
        if variant == "reference":
            similarity = torch.bmm(member_metric, target_metric.transpose(1, 2))  # [B, R - C, C]
        else:
            similarity = cosine_cross(member_metric, target_metric, eps=EPS)
        ragged = len(set(ctxs)) > 1 or len(set(rests)) > 1
        if ragged:  # padded targets never win, padded members join nothing
            similarity = similarity.masked_fill(torch.arange(cmax, device=dev)[None, None, :] >= c_b[:, :, None], float("-inf"))
        best = similarity.argmax(dim=2, keepdim=True)  # ties: the first target
        assign = torch.zeros_like(similarity, dtype=rest_h.dtype).scatter_(2, best, 1.0)
        if ragged:
            assign = assign * (torch.arange(mmax, device=dev)[None, :] < (r_b - c_b))[:, :, None].to(assign.dtype)
        counts = assign.sum(dim=1).clamp(min=1).unsqueeze(-1)
        merged = take_rows(rest_h, target_pos) + torch.bmm(assign.transpose(1, 2), take_rows(rest_h, member_pos)) / counts
        targets = rest.gather(1, target_pos)
    minus_one = torch.full((1,), -1, dtype=torch.long, device=dev)
    outs = []
    for i, (d, c) in enumerate(zip(doms, ctxs)):
        feats = [inp.hidden[i, :1], kept_h[i, :d]] + ([merged[i, :c]] if c else [])
        index = [minus_one, kept[i, :d]] + ([targets[i, :c]] if c else [])
        role = [torch.tensor([ROLE_EXTRA], device=dev), torch.full((d,), ROLE_KEPT, dtype=torch.long, device=dev)]
        role += [torch.full((c,), ROLE_MERGED, dtype=torch.long, device=dev)] if c else []
        outs.append(CompressedImage(torch.cat(feats), torch.cat(index), torch.cat(role)))
    return outs


def _non_negative_int(value: object) -> Optional[str]:
    return None if isinstance(value, int) and value >= 0 else "must be an integer >= 0"


register(
    MethodSpec(
        "visionzip",
        _visionzip,
        "VisionZip: CLS + dominant patches (head-summed CLS attention of block 22) + contextual tokens merged onto 1-D stride targets",
        params={
            "dominant": Param(DEFAULT_DOMINANT, int, "dominant tokens, the CLS token included (released default 191)", positive_int),
            "contextual": Param(DEFAULT_CONTEXTUAL, int, "contextual (merged) tokens (released default 30; 0 only in fixed)", _non_negative_int),
            "budget": BUDGET,
        },
        needs=frozenset({"feature_qk", "cls"}),
        budget_sets=("dominant", "contextual"),
        unit_aware=True,
        reads={"feature_q": READ_CLS_ROW, "feature_k": READ_LOGITS},
    )
)
