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

Units (fixed; methods/units.py): with valid patches both rank the valid patches only (the attention stays CLIP's);
VisPruner's residual is the unit's valid patches after its important ones and its rounds run per unit on padded
lists (`fixed_rounds`). budgets[b] replaces `budget` unit by unit (T_imp = int(budgets[b] * important_ratio)).
"""

from __future__ import annotations

from typing import List, Optional

import torch

from . import units
from .baselines import gather_sorted
from .inputs import CompressedImage, VisionInputs
from .registry import READ_CLS_ROW, READ_KEPT_ROWS, READ_LOGITS, REQUIRED_BUDGET, MethodSpec, Param, register
from .signals import cls_attention_per_head, cosine_gram, ranked, signal_dtype, take_rows, top_indices

ROUND_DROP = 8  # the release removes at most 8 duplicated tokens per round
EPS = 1e-6


def _fraction(value: object) -> Optional[str]:
    return None if isinstance(value, (int, float)) and 0.0 <= float(value) <= 1.0 else "must be in [0, 1]"


def head_mean_attention(inp: VisionInputs, variant: str = "reference") -> torch.Tensor:
    """[B, N] head-mean CLS attention: fp32 as released (reference), settled float64 logits (fixed, which checks
    feature_k through them: MethodSpec.reads)."""
    keys = None if variant == "reference" else "feature_k"
    return cls_attention_per_head(inp.feature_q, inp.feature_k, inp.num_heads, signal_dtype(variant), keys=keys).mean(dim=1)


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


def diverse_rounds(x: torch.Tensor, residual: torch.Tensor, diverse: int) -> torch.Tensor:
    """reference's rounds of step 2 (one image): [1, R] residual (list order) -> [1, diverse].

    Its result depends on the BLAS summation order of its fp32 products (module doc: exact ties and 1e-8
    near-ties, cascading re-orders). x = the L2-normalised patches; each round's evens x odds product from the
    gathered rows, as the release does (same arithmetic, so near-ties rank the same).
    """
    while diverse > 0:
        length = residual.shape[1]
        drop = min(ROUND_DROP, length - diverse)
        if drop <= 0:
            break
        evens, odds = residual[:, 0::2], residual[:, 1::2]
        similarity = torch.bmm(take_rows(x, evens), take_rows(x, odds).transpose(1, 2))  # [B, |E|, |O|]
        order = ranked(similarity.max(dim=2).values, "reference")
        residual = torch.cat([torch.gather(evens, 1, released_survivors(order, length, drop)), odds], dim=1)
    return residual


def fixed_rounds(gram: torch.Tensor, residual: torch.Tensor, lengths: List[int], diverse: List[int]) -> torch.Tensor:
    """fixed's rounds of step 2 over every unit at once: residual [B, W] (list order; unit b's first lengths[b]
    entries, the rest padding) -> [B, W'] whose first diverse[b] entries are unit b's diverse tokens.

    gram = the [B, N, N] cosine matrix of all patches (settled float64, computed once); each round reads its
    evens x odds block (about (N - n) / 8 rounds: one [N, N] product instead of one per round). Each unit runs
    its own rounds (drop_b = min(8, L_b - T_b)); a unit that is done (drop_b <= 0) only has its list re-ordered
    (evens by score, then odds), never shortened, and its order no longer matters (outputs are sorted). Padded
    evens score -inf (after every real even: stable order), padded odds are never a maximum. The per-unit counts
    are host integers (no device syncs per round)."""
    dev = residual.device
    lengths = [length if t > 0 else 0 for length, t in zip(lengths, diverse)]
    while True:
        drops = [max(0, min(ROUND_DROP, length - t)) for length, t in zip(lengths, diverse)]
        if not any(drops):
            break
        evens, odds = residual[:, 0::2], residual[:, 1::2]
        n_even, n_odd = [(length + 1) // 2 for length in lengths], [length // 2 for length in lengths]
        block = take_rows(gram, evens)  # [B, |E|, N], then the odd columns (faster than one 2-D fancy index)
        similarity = torch.gather(block, 2, odds[:, None, :].expand(-1, block.shape[1], -1))
        ragged = min(n_odd) < odds.shape[1] or min(n_even) < evens.shape[1]
        e_slot = torch.arange(evens.shape[1], device=dev)[None, :]
        o_slot = torch.arange(odds.shape[1], device=dev)[None, :]
        e_count, o_count = torch.tensor(n_even, device=dev)[:, None], torch.tensor(n_odd, device=dev)[:, None]
        if ragged:
            similarity = similarity.masked_fill((o_slot >= o_count)[:, None, :], float("-inf"))
        score = similarity.max(dim=2).values
        if ragged:
            score = score.masked_fill(e_slot >= e_count, float("-inf"))
        sorted_evens = torch.gather(evens, 1, ranked(score, "fixed"))
        kept_evens = [max(0, e - d) for e, d in zip(n_even, drops)]
        new_lengths = [k + o for k, o in zip(kept_evens, n_odd)]
        if not ragged and len(set(drops)) == 1:  # every unit drops alike: one slice, as one image would
            residual = torch.cat([sorted_evens[:, drops[0] :], odds], dim=1)
            lengths = new_lengths
            continue
        width = max(new_lengths)  # one column past the end (`width`) takes every dropped or padded entry
        drop_t = torch.tensor(drops, device=dev)[:, None]
        pos_e = torch.where((e_slot >= drop_t) & (e_slot < e_count), e_slot - drop_t, width)
        pos_o = torch.where(o_slot < o_count, torch.tensor(kept_evens, device=dev)[:, None] + o_slot, width)
        out = residual.new_zeros(residual.shape[0], width + 1)
        residual = out.scatter_(1, pos_e, sorted_evens).scatter_(1, pos_o, odds)[:, :width]
        lengths = new_lengths
    return residual


def _vispruner(inp: VisionInputs, variant: str, budget: Optional[int] = None, important_ratio: float = 0.5) -> List[CompressedImage]:
    if variant == "reference" and inp.batch_size > 1:
        raise ValueError("vispruner (reference): the released code runs one image at a time (its LLM input assembly fails at "
                         "sample 1); use variant=fixed for a batch")
    if variant == "reference":
        important = int(budget * important_ratio)
        order = ranked(head_mean_attention(inp, variant), variant)
        if budget == important:  # no diverse tokens: the release keeps the important ones only
            return gather_sorted(inp, order[:, :important])
        x = inp.patches / inp.patches.norm(dim=-1, keepdim=True)
        residual = diverse_rounds(x, order[:, important:], budget - important)
        return gather_sorted(inp, torch.cat([order[:, :important], residual], dim=1))
    # fixed: every unit at once, each with its own budget and valid patches (padded lists, per-unit lengths)
    n = inp.num_patches
    dev = inp.hidden.device
    budgets = units.unit_budgets(inp, budget)
    importants = [int(m * important_ratio) for m in budgets]
    order = ranked(units.masked(head_mean_attention(inp, variant), inp.valid), variant)  # invalid patches last
    lengths = [v - i for v, i in zip(units.valid_counts(inp), importants)]
    diverse = [m - i for m, i in zip(budgets, importants)]
    imp = torch.tensor(importants, device=dev)
    if len(set(importants)) == 1:
        residual = order[:, importants[0] : importants[0] + max(lengths)]
    else:
        residual = order.gather(1, (imp[:, None] + torch.arange(max(lengths), device=dev)[None, :]).clamp(max=n - 1))
    gram = cosine_gram(inp.patches, eps=EPS, dtype=signal_dtype(variant))  # the cosines, float64 and settled, norms clamped at EPS
    residual = fixed_rounds(gram, residual, lengths, diverse)
    keep = torch.cat([order[:, : max(importants)], residual], dim=1)
    slot_i = torch.arange(max(importants), device=dev)[None, :] < imp[:, None]
    slot_d = torch.arange(residual.shape[1], device=dev)[None, :] < torch.tensor(diverse, device=dev)[:, None]
    keep = torch.sort(torch.where(torch.cat([slot_i, slot_d], dim=1), keep, n), dim=1).values  # padding (n) last
    return gather_sorted(inp, keep, budgets)


def _fastervlm(inp: VisionInputs, variant: str, budget: Optional[int] = None) -> List[CompressedImage]:
    budgets = units.unit_budgets(inp, budget)
    keep = top_indices(units.masked(head_mean_attention(inp, variant), inp.valid), max(budgets), variant)
    return gather_sorted(inp, keep, budgets, check=variant != "reference")  # fixed reads hidden at its kept rows only


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
        unit_aware=True,
        reads={"feature_q": READ_CLS_ROW, "feature_k": READ_LOGITS},
    )
)
register(
    MethodSpec(
        "fastervlm",
        _fastervlm,
        "FasterVLM: the top patches of the head-mean CLS attention of block 22, spatial order",
        params={"budget": REQUIRED_BUDGET},
        needs=frozenset({"feature_qk", "cls"}),
        unit_aware=True,
        reads={"feature_q": READ_CLS_ROW, "feature_k": READ_LOGITS, "hidden": READ_KEPT_ROWS},
    )
)
