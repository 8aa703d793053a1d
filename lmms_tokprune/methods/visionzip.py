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
"""

from __future__ import annotations

from typing import List, Optional

import torch

from .inputs import ROLE_EXTRA, ROLE_KEPT, ROLE_MERGED, CompressedImage, VisionInputs
from .registry import BUDGET, MethodSpec, Param, positive_int, register
from .signals import FIXED_DTYPE, cls_attention_per_head, cosine_cross, signal_dtype, take_rows, top_indices

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


def _visionzip(inp: VisionInputs, variant: str, dominant: int = DEFAULT_DOMINANT, contextual: int = DEFAULT_CONTEXTUAL,
               budget: Optional[int] = None) -> List[CompressedImage]:
    if budget is not None:
        dominant, contextual = split_budget(budget)
    n = inp.num_patches
    if dominant + contextual > 1 + n:
        raise ValueError(f"visionzip: dominant={dominant} + contextual={contextual} exceeds the {1 + n} tokens (CLS + {n} patches)")
    if variant == "reference" and contextual == 0:
        raise ValueError("visionzip (reference): contextual=0 divides by zero in the released code; use variant=fixed")
    b, _, width = inp.hidden.shape
    dev = inp.hidden.device
    kept_count = dominant - 1
    scores = cls_attention_per_head(inp.feature_q, inp.feature_k, inp.num_heads, signal_dtype(variant)).sum(dim=1)  # [B, N]
    chosen = torch.zeros(b, n, dtype=torch.bool, device=dev)
    if kept_count:
        chosen.scatter_(1, top_indices(scores, kept_count, variant), True)
    patch = torch.arange(n, device=dev).expand(b, n)
    kept = patch[chosen].view(b, kept_count)  # ascending
    rest = patch[~chosen].view(b, n - kept_count)  # ascending
    patches = inp.patches
    parts = [inp.hidden[:, :1], take_rows(patches, kept)]
    index = [torch.full((b, 1), -1, dtype=torch.long, device=dev), kept]
    role = [torch.full((b, 1), ROLE_EXTRA, dtype=torch.long, device=dev), torch.full_like(kept, ROLE_KEPT)]
    if contextual:
        remaining = n - kept_count
        step = max(1, remaining // contextual)
        target_pos = torch.arange(0, remaining, step, device=dev)[:contextual]
        is_target = torch.zeros(remaining, dtype=torch.bool, device=dev)
        is_target[target_pos] = True
        metric = take_rows(merge_metric(inp.feature_k, inp.num_heads, variant), rest)
        rest_h = take_rows(patches, rest)
        if variant == "reference":
            similarity = torch.bmm(metric[:, ~is_target], metric[:, target_pos].transpose(1, 2))  # [B, R - C, C]
        else:
            similarity = cosine_cross(metric[:, ~is_target], metric[:, target_pos], eps=EPS)
        best = similarity.argmax(dim=2, keepdim=True)  # ties: the first target
        assign = torch.zeros_like(similarity, dtype=rest_h.dtype).scatter_(2, best, 1.0)
        counts = assign.sum(dim=1).clamp(min=1).unsqueeze(-1)
        merged = rest_h[:, target_pos] + torch.bmm(assign.transpose(1, 2), rest_h[:, ~is_target]) / counts
        parts.append(merged)
        index.append(rest[:, target_pos])
        role.append(torch.full((b, len(target_pos)), ROLE_MERGED, dtype=torch.long, device=dev))
    feats, idx, rl = torch.cat(parts, dim=1), torch.cat(index, dim=1), torch.cat(role, dim=1)
    return [CompressedImage(feats[i], idx[i], rl[i]) for i in range(b)]


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
    )
)
