"""FastV (Chen et al., ECCV'24; released code: pkunlp-icler/FastV @ d165972, its LlamaModel.forward and the
lmms-eval kv-cache variant src/FastV/lmms-eval/fastv_kvcache.py). One cut before decoder layer `k`:

1. Row: the last prompt token; layer k-1's attention on its input (q / k after rotary), softmax per head over
   every valid key, head mean; columns: the image span.
2. Kept: the top-`rank` image tokens (topk); system and text tokens always stay; sequence order.
3. Original rotary positions kept (gaps); layers < k cache everything, layers >= k the kept sequence; a decoded
   token's position = original length + t.

`rank` counts the image tokens kept of one image (576 for LLaVA-1.5); a document with m images keeps m * rank.
`budget=n` (equivalent visual tokens, input counting): eq = (k*N + (L-k)*rank) / L -> the nearest rank (ties to
fewer tokens); for k = 2, L = 32: 192 / 128 / 64 -> rank 166 / 98 / 30; reachable (2N + (L-2)) / L .. N.

Images of other sizes (LLaVA-NeXT: N_i = 576 + H'W' patch tokens, `LLMContext.image_tokens`): image i keeps
rank_i = min(rank, N_i) (`rank` stays a token count per image); `budget=n` resolves per image, rank_i = the nearest
of (k*N_i + (L-k)*rank_i) / L to n, clamped into that image's reachable range (the achieved equivalent is
reported); the row keeps sum_i rank_i of its whole visual span, ranked together (layout tokens always stay).

Variants: `reference` = the release: the softmax in fp32, cast to the model dtype, heads averaged in that dtype,
torch.topk; sample 0's choice for every row (its map and its slots), and a ValueError when rows differ in layout
(the release uses sample 0's image offsets for all). Not reproduced: the paper implementation's re-selection at
every decode step without a KV cache (we decode over the prefill's kept cache, as the kv-cache variant does: same
prefill, same first token), that file's doubled layer-(k-1) cache (no output change), and the scripts' SYS_LENGTH
36 for some tasks. `fixed` = per row (its own last token and image span), fp32 scores, stable ties (the earlier
position wins).
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch

from .llm_stages import (
    Cut,
    CutDecision,
    InLLMMethod,
    LLMContext,
    LLMPlan,
    budget_error,
    check_rows,
    floor_error,
    in_llm_only,
    nearest_increasing,
    planned_equivalent,
    refuse_reference_layout,
    refuse_reference_next,
    top_slots,
)
from .registry import EQUIVALENT_BUDGET, MethodSpec, Param, positive_int, register


def equivalent(k: int, rank: int, n: int, layers: int) -> float:
    """Input-counted equivalent visual tokens of one cut before layer k keeping `rank` of n."""
    return planned_equivalent([k], [rank], n, layers)


def resolve_rank(budget: int, k: int, n: int, layers: int, clamp: bool = False) -> int:
    """The rank (1..n) whose equivalent is nearest to the budget (ties to fewer tokens); outside the reachable range a
    ValueError, or with `clamp` the nearest end (an image of another size than the budget was checked for)."""
    low, high = equivalent(k, 1, n, layers), equivalent(k, n, n, layers)
    if not clamp and not low <= budget <= high:
        raise budget_error("fastv", budget, low, high, f"k={k}: a smaller k lowers the floor, k=1 reaches {equivalent(1, 1, n, layers):.2f}")
    return nearest_increasing(lambda r: equivalent(k, r, n, layers), 1, n, (budget * layers - k * n) / (layers - k), budget)


def last_token_scores(view: Any, variant: str) -> torch.Tensor:
    """[B, W] the last prompt token's head-mean attention at the previous layer (cast points per variant)."""
    rows = torch.full((view.hidden.shape[0], 1), view.hidden.shape[1] - 1, dtype=torch.long, device=view.hidden.device)
    probs = view.attention("prev", rows)[:, :, 0]  # [B, H, W] float32
    if variant == "reference":
        return probs.to(view.model_dtype).mean(dim=1)
    return probs.mean(dim=1)


def same_layout(view: Any) -> bool:
    return bool((view.valid == view.valid[:1]).all() and (view.image == view.image[:1]).all())


def _check(context: LLMContext, variant: str = "fixed", k: int = 2, rank: int = 288, budget: Optional[int] = None) -> None:
    layers, n = context.num_layers, context.num_patches
    if not 1 <= k < layers:
        raise ValueError(f"fastv: k={k} must be within 1..{layers - 1} (a cut before decoder layer k of the {layers})")
    refuse_reference_next("fastv", variant, context)
    if context.varied:  # images of N or more patches: only a budget below the smallest image's floor fails them all
        floor = equivalent(k, 1, n, layers)
        if budget is not None and budget < floor:
            raise floor_error("fastv", budget, floor, n, f"k={k}: a smaller k lowers the floor, k=1 reaches {equivalent(1, 1, n, layers):.2f}")
        return
    if budget is not None:
        rank = resolve_rank(budget, k, n, layers)
    if rank > n:
        raise ValueError(f"fastv: rank={rank} is more than the {n} image tokens of an image")


def image_ranks(images: Tuple[int, ...], k: int, rank: int, budget: Optional[int], layers: int) -> List[int]:
    """Per image of N_i patch tokens: min(rank, N_i), or the rank resolved from the budget for N_i (clamped)."""
    return [resolve_rank(budget, k, n, layers, clamp=True) if budget is not None else min(rank, n) for n in images]


def _plan(context: LLMContext, variant: str = "fixed", k: int = 2, rank: int = 288, budget: Optional[int] = None) -> LLMPlan:
    layers, n = context.num_layers, context.num_patches
    if budget is not None and not context.varied:
        rank = resolve_rank(budget, k, n, layers)
    per_row: Optional[List[dict]] = None
    if context.image_tokens is not None:
        per_row = []
        for images in context.image_tokens:
            ranks = image_ranks(tuple(images), k, rank, budget, layers)
            per_row.append({"rank": ranks, "visual_tokens_equivalent": planned_equivalent([k], [sum(ranks)], sum(images), layers)})

    def decide(view: Any) -> CutDecision:
        refuse_reference_layout("fastv", variant, view)
        images = view.image & view.valid
        if variant == "reference" and view.hidden.shape[0] > 1 and not same_layout(view):
            raise ValueError("fastv (reference): the released code takes sample 0's image offsets for every row; these rows differ in "
                             "layout (padding or image position); run batch_size=1 or variant=fixed")
        scores = last_token_scores(view, variant)
        visual = images.sum(dim=1).tolist()
        if per_row is None:
            counts = [min(rank * -(-int(m) // n), int(m)) for m in visual]  # m images -> m * rank
        else:
            check_rows(context, view)
            counts = [min(sum(per_row[b]["rank"]), int(m)) for b, m in enumerate(visual)]
        if variant == "reference":  # sample 0 decides, its slots for every row
            chosen = top_slots(scores[:1], images[:1], counts[:1], variant).expand_as(images)
        else:
            chosen = top_slots(scores, images, counts, variant)
        return CutDecision((view.valid & ~view.image) | chosen)

    notes: dict = {"k": k} if context.varied else {"k": k, "rank": rank, "visual_tokens_equivalent": equivalent(k, rank, n, layers)}
    if per_row is not None:
        notes["per_row"] = per_row  # per batch row: each image's rank, the row's planned equivalent
    return LLMPlan([Cut(k, decide)], "original", notes=notes)


register(
    MethodSpec(
        "fastv",
        in_llm_only("fastv"),
        "FastV: one cut before decoder layer k keeping the image tokens the last prompt token attends to most (layer k-1)",
        params={
            "k": Param(2, int, "the cut is before decoder layer k (1 <= k < L; released default 2)", positive_int),
            "rank": Param(288, int, "image tokens kept per image (released default 288 = 50%)", positive_int),
            "budget": EQUIVALENT_BUDGET,
        },
        budget_sets=("rank",),
        plan=InLLMMethod(_check, _plan),
        reference_batch_one=True,
    )
)
