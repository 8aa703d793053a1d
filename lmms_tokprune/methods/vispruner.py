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
"""

from __future__ import annotations

from typing import List, Optional

import torch

from .baselines import gather_sorted
from .inputs import CompressedImage, VisionInputs
from .registry import REQUIRED_BUDGET, MethodSpec, Param, register
from .signals import cls_attention_per_head, take_rows

ROUND_DROP = 8  # the release removes at most 8 duplicated tokens per round
EPS = 1e-6


def _fraction(value: object) -> Optional[str]:
    return None if isinstance(value, (int, float)) and 0.0 <= float(value) <= 1.0 else "must be in [0, 1]"


def head_mean_attention(inp: VisionInputs) -> torch.Tensor:
    return cls_attention_per_head(inp.feature_q, inp.feature_k, inp.num_heads).mean(dim=1)


def descending_order(scores: torch.Tensor, variant: str) -> torch.Tensor:
    """argsort descending; reference: torch's default (unstable) sort, fixed: stable (ties to the lower position)."""
    return torch.argsort(scores, dim=-1, descending=True, stable=variant != "reference")


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

    reference computes each round's evens x odds product from the gathered rows, as the release does (same
    arithmetic, so near-ties rank the same); fixed computes the Gram matrix of all patches once and each round
    reads its block (about (N - n) / 8 rounds: one [N, N] product instead of one per round).
    """
    gram = torch.bmm(x, x.transpose(1, 2)) if variant != "reference" else None
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
        order = descending_order(similarity.max(dim=2).values, variant)
        kept_evens = order[:, drop:] if variant != "reference" else released_survivors(order, length, drop)
        residual = torch.cat([torch.gather(evens, 1, kept_evens), odds], dim=1)
    return residual


def _vispruner(inp: VisionInputs, variant: str, budget: Optional[int] = None, important_ratio: float = 0.5) -> List[CompressedImage]:
    if variant == "reference" and inp.batch_size > 1:
        raise ValueError("vispruner (reference): the released code runs one image at a time (its LLM input assembly fails at "
                         "sample 1); use variant=fixed for a batch")
    important = int(budget * important_ratio)
    order = descending_order(head_mean_attention(inp), variant)
    if budget == important:  # no diverse tokens: the release keeps the important ones only
        return gather_sorted(inp, order[:, :important])
    norm = inp.patches.norm(dim=-1, keepdim=True)
    x = inp.patches / (norm if variant == "reference" else norm.clamp_min(EPS))
    residual = diverse_rounds(x, order[:, important:], budget - important, variant)
    return gather_sorted(inp, torch.cat([order[:, :important], residual], dim=1))


def _fastervlm(inp: VisionInputs, variant: str, budget: Optional[int] = None) -> List[CompressedImage]:
    attn = head_mean_attention(inp)
    if variant == "reference":
        kept = torch.topk(attn, budget, dim=1).indices
    else:
        kept = descending_order(attn, variant)[:, :budget]
    return gather_sorted(inp, kept)


register(
    MethodSpec(
        "vispruner",
        _vispruner,
        "VisPruner: important patches by head-mean CLS attention, then diverse ones by rounds of duplicate removal",
        params={
            "budget": REQUIRED_BUDGET,
            "important_ratio": Param(0.5, float, "fraction of the budget taken by CLS attention (released default 0.5)", _fraction),
        },
        needs=frozenset({"feature_qk"}),
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
        needs=frozenset({"feature_qk"}),
    )
)
