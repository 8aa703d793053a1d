"""VisPruner (Zhang et al., ICCV'25) and FasterVLM (its v1: FasterVLM, arXiv 2412.01818 v1); released code:
Theia-4869/VisPruner @ aefa01a and Theia-4869/FasterVLM @ f5d5f12 (llava/model/llava_arch.py encode_images).

Both read a = the head-mean of the per-head CLS attention of CLIP block 22 (`feature_q` / `feature_k`), and
keep patches only (no merging); outputs are `hidden` rows in ascending patch order.

fastervlm: kept = top-n of a (torch.topk).

vispruner, with T_imp = int(n * important_ratio), T_div = n - T_imp:
1. order = argsort(a, descending); important = order[:T_imp]; residual = order[T_imp:] (descending attention).
2. While T_div > 0: R = len(residual), r8 = min(8, R - T_div), stop when r8 <= 0. With x the L2-normalised
   pre-projector patches: evens E = residual[0::2], odds O = residual[1::2] (list positions);
   score_e = max_o x_e . x_o; E sorted by score descending, its first r8 (the most duplicated) dropped;
   residual = [the rest of E in that order] + O. The parity split changes every round because the list
   is re-ordered.
3. Kept = important + residual.

Variants: `reference` = the release: torch's unstable argsort, no eps; each round indexes the surviving evens with
a batch index expanded to R // 2 - r columns, so an odd R (odd T_imp, e.g. budget 58 @ 0.5) makes the even half
one longer than that index (IndexError) and some small budgets expand it below -1 (RuntimeError): ValueError
here; where the size-1 / size-0 index broadcasts (a late odd round) the release carries on, sometimes with
fewer tokens than the budget (reproduced: 14 @ 0.75 keeps 13); more than one image -> ValueError (the release's LLM input assembly fails at sample 1, so no batched result
exists to reproduce). `fixed` = stable sorts (ties to the lower index), eps in the norm, odd R handled, any
batch. fastervlm reference runs at any batch size (per image, as released).

Reproducibility of `reference` (issue #22, item 3): its outputs are reproducible only on the same hardware and BLAS.
The released rounds rank fp32 max-cosine scores that contain exact ties (duplicate and near-duplicate patches)
and near-ties ~1e-8 apart, which is below fp32's rounding of the dot products; which way such a pair ranks
depends on the order the BLAS kernel sums the D products in (its SIMD width and blocking), and every round
re-orders the list and re-splits its parity, so one flipped tie changes the evens and odds of every later
round and cascades into a different kept set. Running the released code on two different CPUs gave different
kept sets in 3 of our 6 test cases; on one machine, permuting the feature dimensions (which changes nothing
mathematically, only the summation order) changes reference's kept set (tests/methods/test_order_invariance.py).
The head-mean attention ranking has the same exposure on flat attention. `reference` keeps the release's fp32
arithmetic anyway (that is what produced the published numbers); compare reference outputs only across runs on the
same hardware and BLAS build.

`fixed` (both methods) is summation-order invariant: the per-head logits and the patch cosines are computed in
float64 from the fp32 inputs and settled (signals.settle: rounded to 2^-35, so exact ties stay exact ties), every
ranking is a stable sort (ties to the lower patch index / list position); permuting the feature dimensions leaves
its kept indices identical (tests/methods/test_order_invariance.py).
"""

from __future__ import annotations

from typing import List, Optional

import torch

from .baselines import gather_sorted
from .inputs import CompressedImage, VisionInputs
from .registry import REQUIRED_BUDGET, MethodSpec, Param, register
from .signals import cls_attention_per_head, cosine_gram, ranked, signal_dtype, take_rows, top_indices

ROUND_DROP = 8  # the release removes at most 8 duplicated tokens per round
EPS = 1e-6


def _fraction(value: object) -> Optional[str]:
    return None if isinstance(value, (int, float)) and 0.0 <= float(value) <= 1.0 else "must be in [0, 1]"


def head_mean_attention(inp: VisionInputs, variant: str = "reference") -> torch.Tensor:
    """[B, N] head-mean CLS attention: fp32 as released (reference), settled float64 logits (fixed)."""
    return cls_attention_per_head(inp.feature_q, inp.feature_k, inp.num_heads, signal_dtype(variant)).mean(dim=1)


def released_survivors(order: torch.Tensor, length: int, drop: int) -> torch.Tensor:
    """The evens the release keeps in a round: it indexes `order[:, drop:]` with a batch index expanded to
    length // 2 - drop columns. Equal sizes (or a size-1 index, which broadcasts; expand's -1 keeps 1) work; a
    size-0 index against one survivor keeps none; any other mismatch (an odd residual with more than one
    survivor) and a size below -1 crash the release -> ValueError."""
    survivors = order[:, drop:]
    size = length // 2 - drop
    if size < -1:
        raise ValueError(f"vispruner (reference): a round over {length} residual tokens dropping {drop} makes the released code "
                         f"expand an index to size {size} (RuntimeError); use another budget / important_ratio, or variant=fixed")
    index = 1 if size == -1 else size
    if index in (survivors.shape[1], 1):
        return survivors
    if survivors.shape[1] == 1 and index == 0:
        return survivors[:, :0]  # broadcast to nothing: the release drops every even token of this round
    raise ValueError(f"vispruner (reference): a residual of odd length {length} crashes the released code (its {survivors.shape[1]} "
                     f"surviving even tokens are indexed with {index} rows: IndexError); use another budget / important_ratio "
                     "(an even residual), or variant=fixed")


def diverse_rounds(x: torch.Tensor, residual: torch.Tensor, diverse: int, variant: str) -> torch.Tensor:
    """The rounds of step 2 over the whole batch: [B, R] residual (list order) -> [B, diverse].

    reference's result depends on the BLAS summation order of its fp32 products (module doc: exact ties and 1e-8
    near-ties, cascading re-orders); fixed's does not.

    reference: x = the L2-normalised patches; each round's evens x odds product from the gathered rows, as the
    release does (same arithmetic, so near-ties rank the same). fixed: x = the [B, N, N] cosine matrix of all
    patches (settled float64, computed once) and each round reads its block (about (N - n) / 8 rounds: one
    [N, N] product instead of one per round).
    """
    gram = x if variant != "reference" else None
    while diverse > 0:
        length = residual.shape[1]
        drop = min(ROUND_DROP, length - diverse)
        if drop <= 0:
            break
        evens, odds = residual[:, 0::2], residual[:, 1::2]
        if gram is None:
            similarity = torch.bmm(take_rows(x, evens), take_rows(x, odds).transpose(1, 2))  # [B, |E|, |O|]
        else:
            block = take_rows(gram, evens)  # [B, |E|, N], then the odd columns (faster than one 2-D fancy index)
            similarity = torch.gather(block, 2, odds[:, None, :].expand(-1, block.shape[1], -1))
        order = ranked(similarity.max(dim=2).values, variant)
        kept_evens = order[:, drop:] if variant != "reference" else released_survivors(order, length, drop)
        residual = torch.cat([torch.gather(evens, 1, kept_evens), odds], dim=1)
    return residual


def _vispruner(inp: VisionInputs, variant: str, budget: Optional[int] = None, important_ratio: float = 0.5) -> List[CompressedImage]:
    if variant == "reference" and inp.batch_size > 1:
        raise ValueError("vispruner (reference): the released code runs one image at a time (its LLM input assembly fails at "
                         "sample 1); use variant=fixed for a batch")
    important = int(budget * important_ratio)
    order = ranked(head_mean_attention(inp, variant), variant)
    if budget == important:  # no diverse tokens: the release keeps the important ones only
        return gather_sorted(inp, order[:, :important])
    if variant == "reference":
        x = inp.patches / inp.patches.norm(dim=-1, keepdim=True)
    else:  # the cosines themselves, float64 and settled, norms clamped at EPS
        x = cosine_gram(inp.patches, eps=EPS, dtype=signal_dtype(variant))
    residual = diverse_rounds(x, order[:, important:], budget - important, variant)
    return gather_sorted(inp, torch.cat([order[:, :important], residual], dim=1))


def _fastervlm(inp: VisionInputs, variant: str, budget: Optional[int] = None) -> List[CompressedImage]:
    return gather_sorted(inp, top_indices(head_mean_attention(inp, variant), budget, variant))


register(
    MethodSpec(
        "vispruner",
        _vispruner,
        "VisPruner: important patches by head-mean CLS attention, then diverse ones by rounds of duplicate removal",
        params={
            "budget": REQUIRED_BUDGET,
            "important_ratio": Param(0.5, float, "fraction of the budget taken by CLS attention (released default 0.5)", _fraction),
        },
        needs=frozenset({"feature_qk", "cls"}),
        reference_batch_one=True,
        reference_short=True,
    )
)
register(
    MethodSpec(
        "fastervlm",
        _fastervlm,
        "FasterVLM: the top patches of the head-mean CLS attention of block 22, spatial order",
        params={"budget": REQUIRED_BUDGET},
        needs=frozenset({"feature_qk", "cls"}),
    )
)
