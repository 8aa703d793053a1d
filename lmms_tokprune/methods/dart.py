"""DART (Wen et al., EMNLP'25; code read at xqy1111111/DART @ 5a19452, the upstream ZichenWen1/DART's last code
commit: llava/model/language_model/modeling_llama_self.py). One cut before decoder layer `k`, no attention:

1. Keys: layer k-1's post-rotary keys (its cache entries), heads concatenated; features f = the decoder's final
   RMSNorm (with its weight) of layer k-1's output.
2. Pivots: the top `pivot_image_token` image tokens by the L1 norm of their keys, and the top `pivot_text_token`
   of the tokens after the image span (question and " ASSISTANT:") by the same, as original prompt positions.
3. t = max_num_trunction // (p_img + p_txt). Pool = the image tokens minus the image pivots, ascending.
4. Visit the pivots in the order of `list(set(image_pivots + text_pivots))` (CPython's set order of those ints:
   hash-slot order, neither sorted nor insertion); each pivot takes the t pool tokens of LOWEST cosine(f_pivot, f_j)
   (topk of the negated cosine), which leave the pool. The order matters: sorted order keeps a different set.
5. Kept image tokens = image pivots + picks = p_img + P * t (132 for "128"); text pivots are text and stay.
   Sequence order; original positions; layers < k cache everything; decoding at original length + t.

`max_num_trunction` counts one image; a document with m images takes m times as many picks (the same pivots).
Images of other sizes (LLaVA-NeXT, `LLMContext.image_tokens`): image i contributes M_i = max_num_trunction picks,
or with `budget=n` (per image) the M_i = P * t_i whose (k*N_i + (L-k)*(p_img + P*t_i)) / L is nearest to n (clamped
into that image's range); the row's pivots share t = sum_i M_i // P picks each over the row's whole visual span
(one set of pivots per row, as for LLaVA-1.5 documents with several images). Text pivots come from the text after
the last image token; layout tokens are neither pool nor text and always stay.
`budget=n` (equivalent visual tokens): kept = p_img + P * t, eq = (k*N + (L-k)*kept) / L, the nearest t in
[0, (N - p_img) // P]: 192 / 128 / 64 -> max_num_trunction 160 / 96 / 24 (kept 164 / 100 / 28). The paper's
"DART 128" keeps 132 = 159.75 equivalent tokens. (The scripts' reduction ratio 0.778 is used only when
max_num_trunction is None, never from their CLI: not exposed.)

LLaVA-NeXT, `reference` (the release's '1.6' path, `text_length` set): one cut over the packed image span of L tokens
(base, unpadded grid, a newline per row -- the newlines are ordinary candidates and pivots), TOKEN_TOPK =
int(min(R, L - 4) // 8) picks per pivot with R = `retain_token_num_for_llava_next` (320), so kept = 4 pivots + 8 *
TOKEN_TOPK (324); `max_num_trunction` is ignored there, as released, and `budget=` is refused (nothing maps to it).
Counts: kept newlines are layout tokens, not visual ones.

Variants: `reference` = the release: batch 1 only (it asserts it: ValueError for more), torch.topk, the set order;
where the release crashes (fewer text tokens than text pivots, P * t above the pool) -> ValueError.
`fixed` = per row, pivots visited in selection order (image pivots by descending L1 norm, then text), ties to the
lower position, and guards: fewer text tokens than pivots takes what there is, a pool that runs out stops.
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch
import torch.nn.functional as F

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
    on_next,
    planned_equivalent,
    refuse_reference_layout,
    refuse_reference_next,
)
from .registry import EQUIVALENT_BUDGET, MethodSpec, Param, positive_int, register
from .signals import top_indices

EXTEND = "a smaller k or fewer pivot_image_token lower the floor"
NEXT_RETAIN = 320  # the release's retain_token_num_for_llava_next


def resolve_truncation(budget: int, k: int, n: int, layers: int, p_img: int, p_txt: int, clamp: bool = False) -> int:
    """max_num_trunction = P * t for the t in 0..(n - p_img) // P whose equivalent is nearest to the budget (ties to
    fewer tokens); outside the reachable range a ValueError, or with `clamp` the nearest end."""
    pivots = p_img + p_txt
    top = max(0, (n - p_img) // pivots)

    def value(t: int) -> float:
        return planned_equivalent([k], [p_img + pivots * t], n, layers)

    if not clamp and not value(0) <= budget <= value(top):
        raise budget_error("dart", budget, value(0), value(top), EXTEND)
    guess = ((budget * layers - k * n) / (layers - k) - p_img) / pivots
    return nearest_increasing(value, 0, top, guess, budget) * pivots


def _top(scores: torch.Tensor, count: int, variant: str) -> torch.Tensor:
    return top_indices(scores, min(count, int(scores.numel())), variant)


def row_selection(keys: torch.Tensor, feats: torch.Tensor, slots_image: torch.Tensor, slots_text: torch.Tensor, orig: torch.Tensor,
                  p_img: int, p_txt: int, per_pivot: int, variant: str) -> torch.Tensor:
    """One row: the image slots kept (pivots + picks). keys / feats [W, *]; slots_* the candidate slots ascending."""
    l1 = keys.float().abs().sum(dim=-1) if variant != "reference" else keys.norm(p=1, dim=-1)
    image_piv = slots_image[_top(l1[slots_image], p_img, variant)]
    text_piv = slots_text[_top(l1[slots_text], p_txt, variant)]
    if variant == "reference":  # CPython's set order of the original positions, as the release iterates it
        by_pos = {int(orig[s]): int(s) for s in torch.cat([image_piv, text_piv]).tolist()}
        order = [by_pos[p] for p in list(set(int(orig[s]) for s in image_piv.tolist() + text_piv.tolist()))]
    else:
        order = image_piv.tolist() + text_piv.tolist()
    chosen = set(image_piv.tolist())
    pool = [int(s) for s in slots_image.tolist() if int(s) not in chosen]
    f = feats if variant == "reference" else feats.float()
    for pivot in order:
        if not pool or per_pivot <= 0:
            break
        candidates = torch.tensor(pool, device=feats.device)
        similarity = F.cosine_similarity(f[pivot][None, :], f[candidates], dim=-1)
        take = _top(-similarity, per_pivot, variant)
        picked = set(candidates[take].tolist())
        chosen |= picked
        pool = [s for s in pool if s not in picked]
    return torch.tensor(sorted(chosen), dtype=torch.long, device=feats.device)


def _check(context: LLMContext, variant: str = "fixed", k: int = 2, max_num_trunction: int = 128, pivot_image_token: int = 4,
           pivot_text_token: int = 4, retain_token_num_for_llava_next: int = NEXT_RETAIN, budget: Optional[int] = None) -> None:
    layers, n = context.num_layers, context.num_patches
    if not 1 <= k < layers:
        raise ValueError(f"dart: k={k} must be within 1..{layers - 1} (a cut before decoder layer k of the {layers})")
    if variant == "reference" and on_next(context):  # the release's LLaVA-NeXT path (module doc)
        if budget is not None:
            raise ValueError("dart (reference) on LLaVA-NeXT: the release keeps 4 pivots + 8 * (min(retain_token_num_for_llava_next, "
                             "L - 4) // 8) of the packed span (max_num_trunction is ignored there), so budget= has nothing to set; "
                             "give retain_token_num_for_llava_next, or use variant=fixed for a budget")
        return
    refuse_reference_next("dart", variant, context)
    if context.varied:  # images of N or more patches: only a budget below the smallest image's floor fails them all
        floor = planned_equivalent([k], [pivot_image_token], n, layers)
        if budget is not None and budget < floor:
            raise floor_error("dart", budget, floor, n, EXTEND)
        return
    if budget is not None:
        max_num_trunction = resolve_truncation(budget, k, n, layers, pivot_image_token, pivot_text_token)
    if variant == "fixed" and pivot_image_token + max_num_trunction > n:
        raise ValueError(f"dart: pivot_image_token + max_num_trunction = {pivot_image_token + max_num_trunction} exceeds the {n} image tokens")
    _check_pool(variant, max_num_trunction, pivot_image_token, pivot_text_token, n, 1)


def _check_pool(variant: str, max_num_trunction: int, p_img: int, p_txt: int, n: int, m: int) -> None:
    """The release's last pivot takes topk(t) of what is left: a pool shorter than t crashes there, so refuse."""
    pivots = p_img + p_txt
    per_pivot = (max_num_trunction * m) // pivots
    if variant == "reference" and pivots * per_pivot > m * n - p_img:
        raise ValueError(f"dart (reference): {pivots} pivots x {per_pivot} picks exceed the {m * n - p_img} image tokens "
                         f"left after the pivots (the release's topk crashes); lower max_num_trunction or use variant=fixed")


def next_picks_per_pivot(span: int, retain: int, p_img: int, p_txt: int) -> int:
    """The release on LLaVA-NeXT: TOKEN_TOPK = int(min(retain, L - p_img) // (p_img + p_txt)) picks per pivot over a packed
    image span of L tokens (newlines included)."""
    return int(min(retain, span - p_img) // (p_img + p_txt))


def _next_reference_plan(k: int, p_img: int, p_txt: int, retain: int) -> LLMPlan:
    """reference on LLaVA-NeXT: one cut before layer k over the packed span (base, unpadded grid, newlines: all candidates),
    TOKEN_TOPK = next_picks_per_pivot per pivot, the release's set order; batch 1 (it asserts it)."""
    def decide(view: Any) -> CutDecision:
        if view.hidden.shape[0] > 1:
            raise ValueError("dart (reference): the released code asserts batch size 1; run batch_size=1 or variant=fixed")
        keys, feats = view.keys("prev"), view.final_norm(view.hidden)
        keep = view.valid & ~view.image
        slots = torch.arange(view.hidden.shape[1], device=view.hidden.device)
        span = slots[view.image[0] & view.valid[0]]
        if span.numel():
            after = slots[view.valid[0] & ~view.image[0] & (slots > span[-1])]
            if after.numel() < p_txt:
                raise ValueError(f"dart (reference): only {after.numel()} text tokens after the image for pivot_text_token={p_txt}; "
                                 "use variant=fixed")
            per_pivot = next_picks_per_pivot(int(span.numel()), retain, p_img, p_txt)
            keep[0, row_selection(keys[0], feats[0], span, after, view.orig[0], p_img, p_txt, per_pivot, "reference")] = True
        return CutDecision(keep)

    return LLMPlan([Cut(k, decide)], "original", notes={"k": k, "retain_token_num_for_llava_next": retain}, layout_candidates=True)


def _plan(context: LLMContext, variant: str = "fixed", k: int = 2, max_num_trunction: int = 128, pivot_image_token: int = 4,
          pivot_text_token: int = 4, retain_token_num_for_llava_next: int = NEXT_RETAIN, budget: Optional[int] = None) -> LLMPlan:
    layers, n = context.num_layers, context.num_patches
    if variant == "reference" and on_next(context):
        return _next_reference_plan(k, pivot_image_token, pivot_text_token, retain_token_num_for_llava_next)
    if budget is not None and not context.varied:
        max_num_trunction = resolve_truncation(budget, k, n, layers, pivot_image_token, pivot_text_token)
    pivots = pivot_image_token + pivot_text_token
    per_row: Optional[List[dict]] = None
    if context.image_tokens is not None:
        per_row = []
        for images in context.image_tokens:
            picks = [resolve_truncation(budget, k, size, layers, pivot_image_token, pivot_text_token, clamp=True) if budget is not None
                     else max_num_trunction for size in images]
            kept = min(pivot_image_token + pivots * (sum(picks) // pivots), sum(images)) if images else 0
            per_row.append({"max_num_trunction": picks, "visual_tokens_equivalent": planned_equivalent([k], [kept], sum(images), layers)})

    def decide(view: Any) -> CutDecision:
        refuse_reference_layout("dart", variant, view)
        batch = view.hidden.shape[0]
        if variant == "reference" and batch > 1:
            raise ValueError("dart (reference): the released code asserts batch size 1; run batch_size=1 or variant=fixed")
        check_rows(context, view)
        keys = view.keys("prev")
        feats = view.final_norm(view.hidden)
        keep = view.valid & ~view.image
        slots = torch.arange(view.hidden.shape[1], device=view.hidden.device)
        for b in range(batch):
            images = slots[view.image[b] & view.valid[b]]
            if not images.numel():
                continue
            after = slots[view.valid[b] & ~view.image[b] & ~view.layout[b] & (slots > images[-1])]
            if variant == "reference" and after.numel() < pivot_text_token:
                raise ValueError(f"dart (reference): only {after.numel()} text tokens after the image for pivot_text_token="
                                 f"{pivot_text_token}; use variant=fixed")
            if per_row is None:
                m = -(-int(images.numel()) // n)  # images in this document
                _check_pool(variant, max_num_trunction, pivot_image_token, pivot_text_token, n, m)
                per_pivot = (max_num_trunction * m) // pivots
            else:
                per_pivot = sum(per_row[b]["max_num_trunction"]) // pivots
            keep[b, row_selection(keys[b], feats[b], images, after, view.orig[b], pivot_image_token, pivot_text_token, per_pivot, variant)] = True
        return CutDecision(keep)

    kept = pivot_image_token + pivots * (max_num_trunction // pivots)
    notes: dict = {"k": k} if context.varied else {"k": k, "max_num_trunction": max_num_trunction,
                                                   "visual_tokens_equivalent": planned_equivalent([k], [kept], n, layers)}
    if per_row is not None:
        notes["per_row"] = per_row  # per batch row: each image's max_num_trunction, the row's planned equivalent
    return LLMPlan([Cut(k, decide)], "original", notes=notes)


register(
    MethodSpec(
        "dart",
        in_llm_only("dart"),
        "DART: one cut before decoder layer k keeping pivots (key L1 norm) and the tokens least similar to each pivot",
        params={
            "k": Param(2, int, "the cut is before decoder layer k (released default 2)", positive_int),
            "max_num_trunction": Param(128, int, "picks over all pivots per image (released default 128)", positive_int),
            "pivot_image_token": Param(4, int, "image pivots (released default 4)", positive_int),
            "pivot_text_token": Param(4, int, "text pivots after the image (released default 4)", positive_int),
            "retain_token_num_for_llava_next": Param(NEXT_RETAIN, int, "reference on LLaVA-NeXT: R, picks = 8 * (min(R, L - 4) // 8) over "
                                                     f"the packed span (released default {NEXT_RETAIN}; fixed and LLaVA-1.5 ignore it)",
                                                     positive_int),
            "budget": EQUIVALENT_BUDGET,
        },
        budget_sets=("max_num_trunction",),
        plan=InLLMMethod(_check, _plan),
        reference_batch_one=True,
    )
)
